"""What the backend did to each graph it compiled: the answer to "did it really prune?"."""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

SHOWN_LAYOUTS = 8  # pruning entries printed by str(); a serving stream brings many


@dataclass
class PruningEntry:
    """One layout a pruned prefill ran on (the first call that brought it; ``calls`` counts them all)."""

    graph: int
    layer: int
    visual_tokens: int  # T of the sample with the most visual tokens
    kept: int  # its k
    seq_len_before: int  # N
    seq_len_after: int  # n'
    seq_len_padded: int  # what n' would be had the padding stayed: max_b(N - T_b + k_b)
    samples: list[list[int]] = field(default_factory=list)  # a ragged batch: [T_b, k_b] per sample
    calls: int = 1


@dataclass
class Report:
    """Accumulates over every graph one backend instance compiles.

    ``graphs``: how many graphs the backend saw. ``pruning``: one entry per layout a pruned
    prefill ran on (graph, visual tokens per sample, sequence lengths), recorded when the call
    runs: one compiled graph serves every image size. ``pruned_calls``: prefill calls that pruned.
    ``attention_rewrites``: SDPA calls of pruned prefills turned into biased attention.
    ``decode_rewrites``: attention calls of decode graphs over a pruned layer's cache (a
    ``CompactKV``, whose own attention adds the anchors' bias).
    ``handoffs``: graphs that merged image features but ran no decoder, so handed their visual
    mask on to the graph that does (Dynamo split a forward between them).
    ``variants``: per graph that may receive merged embeddings from an earlier graph, its
    compiled variants: "unpruned" (calls that carried no visual mask) and the input that carried one.
    ``kernel``: the attention kernel used. ``skipped``: why a graph was left as it was.
    ``fallbacks``: graphs compiled as Dynamo gave them after a rewrite failed (to be made, to
    compile, or on its first run) or met an image merge the passes do not know.
    ``unpruned_images``: image prompts that reached no pruned graph, found at run time.
    ``passes``: per graph (and variant), its kind and, per pass, what it counted and its wall
    time in ms (``ms``: the pass and the checks after it); ``inner_compile_ms``, the inner
    compiler's time on it.
    """

    config: dict
    graphs: int = 0
    pruning: list[PruningEntry] = field(default_factory=list)
    pruned_calls: int = 0
    attention_rewrites: int = 0
    decode_rewrites: int = 0
    handoffs: int = 0
    variants: dict[int, list[str]] = field(default_factory=dict)
    kernel: str | None = None
    skipped: list[str] = field(default_factory=list)
    fallbacks: list[int] = field(default_factory=list)
    unpruned_images: list[str] = field(default_factory=list)
    passes: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    compile_seconds: float = 0.0

    @property
    def pruned(self) -> bool:
        return bool(self.pruning)

    def record_prefill(self, graph: int, layer: int, samples: list[list[int]], seq_len: int, kept_len: int) -> None:
        """A pruned prefill call: each sample's [T_b, k_b], and N -> n'."""
        self.pruned_calls += 1
        widest = max(samples, key=lambda s: s[0])
        ragged = samples if len({t for t, _ in samples}) > 1 else []
        padded = max(seq_len - t + k for t, k in samples)
        entry = PruningEntry(graph, layer, widest[0], widest[1], seq_len, kept_len, padded, ragged, calls=0)
        same = next((p for p in self.pruning if dataclasses.replace(p, calls=0) == entry), None)
        if same is None:
            self.pruning.append(entry)
            same = entry
        same.calls += 1

    def pass_ms(self) -> dict[int, float]:
        """Wall time of the passes per graph (all its variants together), in ms."""
        totals: dict[int, float] = {}
        for entry in self.passes:
            ms = sum(v.get("ms", 0.0) for v in entry.values() if isinstance(v, dict))
            totals[entry["graph"]] = totals.get(entry["graph"], 0.0) + ms
        return totals

    def ms_per_pass(self) -> dict[str, float]:
        """Wall time of each pass summed over every graph (and variant) compiled, in ms."""
        totals: dict[str, float] = {}
        for entry in self.passes:
            for name, counts in entry.items():
                if isinstance(counts, dict) and "ms" in counts:
                    totals[name] = round(totals.get(name, 0.0) + counts["ms"], 3)
        return totals

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [f"era_compile report: {self.graphs} graph(s) compiled in {self.compile_seconds:.1f} s"]
        shown = self.pruning[:SHOWN_LAYOUTS]
        for p in shown:
            tokens = (
                f"{p.visual_tokens} visual tokens -> {p.kept} kept"
                if not p.samples
                else "visual tokens -> kept per sample " + ", ".join(f"{t}->{k}" for t, k in p.samples)
            )
            calls = f" ({p.calls} calls)" if p.calls > 1 else ""
            padding = f" ({p.seq_len_padded} had the padding stayed)" if p.seq_len_padded != p.seq_len_after else ""
            lines.append(
                f"  graph {p.graph}: pruned at layer {p.layer}: {tokens}; sequence {p.seq_len_before} -> "
                f"{p.seq_len_after}{padding}{calls}"
            )
        if len(self.pruning) > len(shown):
            lines.append(
                f"  ... {len(self.pruning) - len(shown)} more layout(s); {self.pruned_calls} pruned prefill "
                "calls in all (to_dict() has every one)"
            )
        lines.append(
            f"  attention rewrites: {self.attention_rewrites} in prefill, {self.decode_rewrites} over a "
            f"cache (kernel: {self.kernel or '-'})"
        )
        if self.handoffs:
            lines.append(
                f"  {self.handoffs} graph(s) merged the image without a decoder layer and handed the "
                "visual mask on to the next graph"
            )
        for graph, variants in self.variants.items():
            if len(variants) > 1:
                lines.append(f"  graph {graph}: {len(variants)} variants ({', '.join(variants)})")
        timed = self.pass_ms()
        if timed:
            busiest = sorted(timed.items(), key=lambda kv: -kv[1])[:3]
            lines.append(
                "  pass time: "
                + ", ".join(f"graph {g} {ms:.1f} ms" for g, ms in busiest)
                + f" (all graphs {sum(timed.values()):.1f} ms; per pass: era-compile explain)"
            )
        for s in self.skipped:
            lines.append(f"  skipped: {s}")
        if self.fallbacks:
            lines.append(f"  fell back (compiled unmodified): graph {', '.join(str(g) for g in self.fallbacks)}")
        for image in self.unpruned_images:
            lines.append(f"  NOT PRUNED: {image}")
        for n in self.notes:
            lines.append(f"  note: {n}")
        if not self.pruning:
            lines.append("  NOTE: no graph was pruned")
        return "\n".join(lines)


# Which report ``last_report`` and ``report_of`` answer with (the modules weakly: a report outlives
# its model only while someone holds it).
_last: Report | None = None
_by_module: weakref.WeakKeyDictionary[torch.nn.Module, Report] = weakref.WeakKeyDictionary()


def set_last(report: Report) -> None:
    global _last
    _last = report


def last_report() -> Report | None:
    """The report of the compiled model that most recently compiled a graph or ran a pruned
    prefill (None before any compile). With several compiled models in a process,
    ``report_of(model)`` names the one you mean."""
    return _last


def register_model(module: torch.nn.Module, report: Report) -> None:
    """``module`` (a frame's ``self`` that Dynamo compiled a graph of) belongs to ``report``'s model
    (the latest compile of it wins: a model compiled again reports afresh)."""
    _by_module[module] = report


def report_of(model: torch.nn.Module) -> Report | None:
    """The report of the compiled model ``model`` is (or holds one of the modules of), or None if
    no era backend has compiled a graph of it."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"report_of expects a torch.nn.Module, got {type(model).__name__}")
    model = getattr(model, "_orig_mod", model)  # torch.compile(model) returns a wrapper around it
    found = _by_module.get(model)
    if found is None:
        found = next((_by_module[m] for m in model.modules() if m in _by_module), None)
    return found
