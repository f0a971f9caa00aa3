"""The pass manager: per graph kind an ordered list of passes, run with their contracts checked.

    prepared = prepare(gm, config, graph_index)        # a copy, normalised, classified
    result = run_passes(prepared, config, example_inputs)  # the kind's passes on it

``prepare`` copies the graph Dynamo handed over (the original stays intact for the fallback),
runs ``normalize`` on the copy and asks ``kinds.classify`` what it is. ``run_passes`` then runs
``PIPELINES[kind]``. Around every pass:

* its declared ``requires`` are checked before it runs (``MissingRecord`` names what is
  missing), and its record is checked against what it ``provides``;
* wall time (``PassTiming``: the pass, and the upkeep after it), into the report;
* provenance: every node the pass inserted carries ``meta["era_pass"]`` (its name);
* when it changed the graph: one lint, one recompile, one fake-tensor update (``update_fake``:
  every node the pass inserted or re-wired, and what their new values reach); a rewrite whose
  shapes no longer check fails here with the pass named, not inside the inner compiler
  (``normalize`` only respells calls and copies their fake values: lint and recompile);
* an INFO line on this module's logger (what it counted, its time), and, when someone listens
  (``era_compile.logs``: ``TORCH_LOGS="+era_compile"``, the ``era_graphs`` artifact, ``TORCH_TRACE``,
  ``ERA_COMPILE_DUMP=dir``), the graph before and after it, numbered (``<step>_<pass>_{before,after}``).

A pass that declares a record but returns none (it found nothing to do) ends the pipeline:
what follows needs that record. Dead nodes go in a fixed tail (``dce``), after the last pass,
since a pass may insert a node only a later one uses.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv, compute_unbacked_bindings
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from era_compile.config import ERAConfig
from era_compile.logs import GraphDump

from .analysis import forget
from .attention import rectify_attention
from .fx_utils import same_shape, same_size
from .graph_pass import GraphPass, MissingRecord, PassContext, PassError, PassResult, frozen
from .handoff import hand_off_visual_mask
from .kept import continue_on_kept_tokens
from .kinds import GraphKind, classify
from .kvcache import find_kv_cache
from .layers import find_decoder_layers, find_layer_of_graph
from .normalize import normalize
from .prune import prune_visual_tokens
from .publish import publish_pruning
from .records import AddedInput, CarriedVisual, LayerStep
from .restore import restore_sequence_length
from .saliency import hand_on_saliency
from .span import find_visual_span

_PRUNING = (
    find_visual_span,
    find_decoder_layers,
    find_kv_cache,
    prune_visual_tokens,
    rectify_attention,
    publish_pruning,
)

PIPELINES: dict[GraphKind, tuple[GraphPass, ...]] = {
    GraphKind.PREFILL: _PRUNING,
    GraphKind.CARRIED: _PRUNING,
    GraphKind.HANDOFF: (find_visual_span, hand_off_visual_mask),
    GraphKind.DECODE: (find_kv_cache,),
    GraphKind.TEXT: (),
    # a decoder split into per-layer graphs (``saliency``): from K on, each layer runs on the kept
    # tokens between its entry's cut and its exit's write-back
    GraphKind.LAYER_SALIENCY: (find_layer_of_graph, hand_on_saliency),
    GraphKind.LAYER_PRUNE: (
        find_visual_span,
        find_layer_of_graph,
        find_kv_cache,
        prune_visual_tokens,
        rectify_attention,
        restore_sequence_length,
        publish_pruning,
    ),
    GraphKind.LAYER_KEPT: (
        find_layer_of_graph,
        find_kv_cache,
        continue_on_kept_tokens,
        rectify_attention,
        restore_sequence_length,
    ),
}


def check_pipeline(passes: Sequence[GraphPass]) -> None:
    """Every requirement is provided by an earlier pass (a misdeclared pipeline fails on import)."""
    provided: set = set()
    for p in passes:
        missing = [t.__name__ for t in p.requires if t not in provided]
        if missing:
            raise TypeError(f"pass {p.name!r} requires {missing}, which no earlier pass provides")
        if p.provides is not None:
            provided.add(p.provides)


for _passes in PIPELINES.values():
    check_pipeline(_passes)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassTiming:
    name: str
    ms: float  # the pass itself
    upkeep_ms: float  # lint, recompile and fake propagation after it (0 when it changed nothing)


@dataclass
class Prepared:
    """A normalised copy of a Dynamo graph and its kind."""

    gm: fx.GraphModule
    kind: GraphKind
    graph_index: int
    normalize: PassResult
    timing: PassTiming
    classified: PassTiming = PassTiming("classify", 0.0, 0.0)


@dataclass
class PipelineResult:
    kind: GraphKind
    gm: fx.GraphModule
    results: list[tuple[str, PassResult]] = field(default_factory=list)
    timings: list[PassTiming] = field(default_factory=list)
    records: dict[type, Any] = field(default_factory=dict)
    added_inputs: list[AddedInput] = field(default_factory=list)
    example_inputs: list[Any] = field(default_factory=list)
    stopped: str | None = None  # why the pipeline ended before its last pass
    rewrote: bool = False  # a pass that rewrites changed the graph

    @property
    def changed(self) -> bool:
        """Whether the graph is worth compiling as rewritten (not only respelled or analysed)."""
        return self.rewrote

    def record(self, record_type):
        return self.records.get(record_type)

    def counts(self) -> dict[str, dict]:
        """Per pass what it counted, why it skipped, and its wall time: what the report keeps."""
        results = dict(self.results)
        out = {}
        for t in self.timings:
            r = results.get(t.name)
            entry = dict(r.counts, skipped=r.skipped) if r is not None else {}
            out[t.name] = dict(entry, ms=round(t.ms + t.upkeep_ms, 3))
        return out


def copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy to rewrite, so the original stays intact for the fallback."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return fx.GraphModule(gm, graph)


def prepare(
    gm: fx.GraphModule,
    config: ERAConfig,
    graph_index: int,
    example_inputs: Sequence[Any] = (),
    dump_name: str | None = None,
) -> Prepared:
    """A copy of a Dynamo graph, normalised (step 0, timed and dumped like any pass), and its kind."""
    work = copy_graph(gm)
    mark_side_effects(work)
    ctx = PassContext(config, GraphKind.TEXT, graph_index, tuple(example_inputs))
    dump = GraphDump(config.cache_key(), dump_name or f"graph{graph_index}")
    result, timing = _run_one(normalize, work, ctx, example_inputs, dump, 0)
    start = time.perf_counter()
    kind = classify(work, example_inputs=example_inputs)  # its facts stay for the backend's questions
    classified = PassTiming("classify", 1e3 * (time.perf_counter() - start), 0.0)
    log.info("%s: classify %.1f ms, kind=%s", dump.label, classified.ms, kind.value)
    return Prepared(work, kind, graph_index, result, timing, classified)


def run_passes(
    prepared: Prepared,
    config: ERAConfig,
    example_inputs: Sequence[Any],
    carried: CarriedVisual | None = None,
    dump_name: str | None = None,
    until: str | None = None,
    step: LayerStep | None = None,
) -> PipelineResult:
    """The kind's passes on a copy of the prepared graph (one variant of it: ``carried``, a mask
    an input brought; ``step``, a layer's part on an image prompt's way through a split decoder);
    ``until``: stop after the pass of that name, before the dead-code tail (tests, debugging)."""
    gm = copy_graph(prepared.gm)
    if step is not None:
        kind = GraphKind.of_layer_step(step.role)
    else:
        kind = classify(gm, carried, example_inputs) if carried is not None else prepared.kind
    result = PipelineResult(
        kind,
        gm,
        [("normalize", prepared.normalize)],
        [prepared.timing, prepared.classified],
        example_inputs=list(example_inputs),
    )
    dump = GraphDump(config.cache_key(), dump_name or f"graph{prepared.graph_index}")
    for number, p in enumerate(PIPELINES[kind], start=1):
        ctx = PassContext(
            config, kind, prepared.graph_index, tuple(result.example_inputs), carried, frozen(result.records), step
        )
        missing = [t.__name__ for t in p.requires if t not in result.records]
        if missing:
            raise MissingRecord(f"pass {p.name!r} needs {missing}, which no earlier pass provided")
        outcome, timing = _run_one(p, gm, ctx, result.example_inputs, dump, number)
        result.results.append((p.name, outcome))
        result.timings.append(timing)
        result.rewrote = result.rewrote or (outcome.changed and p.rewrites)
        for added in outcome.added_inputs:
            result.added_inputs.append(added)
            result.example_inputs.append(added.example)
        if p.provides is not None:
            if outcome.record is None:
                result.stopped = outcome.skipped or f"pass {p.name!r} provided no {p.provides.__name__}"
                break
            if not isinstance(outcome.record, p.provides):
                raise TypeError(
                    f"pass {p.name!r} returned {type(outcome.record).__name__}, declared {p.provides.__name__}"
                )
            result.records[p.provides] = outcome.record
        if p.name == until:  # cut short: the graph as that pass left it, no tail
            return result
    start = time.perf_counter()
    gm.graph.eliminate_dead_code(is_impure_node=_is_impure)
    gm.graph.lint()
    gm.recompile()
    result.timings.append(PassTiming("dce", 1e3 * (time.perf_counter() - start), 0.0))
    if result.changed:
        dump.write(gm, f"{len(PIPELINES[kind]) + 1:02d}_dce_after")
    return result


def _run_one(
    p: GraphPass, gm: fx.GraphModule, ctx: PassContext, example_inputs: Sequence[Any], dump: GraphDump, step: int
) -> tuple[PassResult, PassTiming]:
    before = {node: (node.args, node.kwargs) for node in gm.graph.nodes}
    text_before = dump.render(gm)
    start = time.perf_counter()
    outcome = p(gm, ctx)
    ms = 1e3 * (time.perf_counter() - start)
    upkeep = 0.0
    if outcome.changed:
        forget(gm)  # what was known of the graph before this pass
        touched = set()  # inserted, or given other arguments (FX stores new argument tuples)
        for node in gm.graph.nodes:
            if node not in before:
                node.meta["era_pass"] = p.name
                touched.add(node)
            elif before[node][0] is not node.args or before[node][1] is not node.kwargs:
                touched.add(node)
        start = time.perf_counter()
        gm.graph.lint()
        gm.recompile()
        try:
            if not p.keeps_meta:
                update_fake(gm, list(example_inputs) + [a.example for a in outcome.added_inputs], touched)
        except Exception as e:
            raise PassError(f"after pass {p.name!r} the graph no longer type-checks: {type(e).__name__}: {e}") from e
        upkeep = 1e3 * (time.perf_counter() - start)
        if text_before is not None:
            dump.write_text(text_before, f"{step:02d}_{p.name}_before")
            dump.write(gm, f"{step:02d}_{p.name}_after")
    log.info(
        "%s: %s %.1f ms%s%s",
        dump.label,
        p.name,
        ms,
        f" (+{upkeep:.1f} ms checks)" if outcome.changed else "",
        "".join(f", {k}={v}" for k, v in outcome.counts.items())
        + (f"; skipped: {outcome.skipped}" if outcome.skipped else ""),
    )
    return outcome, PassTiming(p.name, ms, upkeep)


def propagate_fake(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Refresh ``meta['val']`` of every node; raises if the shapes do not check.

    Runs in Dynamo's own fake mode when the placeholders carry its fake values (so its
    ShapeEnv owns any data-dependent scalar, like HF's ``.item()`` checks), else in a new one.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fakes = [n.meta.get("example_value") for n in placeholders]
    mode = next((f.fake_mode for f in fakes if isinstance(f, FakeTensor)), None)
    if mode is None or len(fakes) != len(example_inputs):
        mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
        fakes = [mode.from_tensor(x, static_shapes=True) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    # Constants read by get_attr are real tensors (Dynamo makes module buffers constants when
    # Inductor freezing is on): the mode must accept them while it propagates.
    allow_data_dependent_lengths(mode)
    allowed, mode.allow_non_fake_inputs = mode.allow_non_fake_inputs, True
    try:
        _BindingFakeProp(gm, mode).propagate_dont_convert_inputs(*fakes)
    finally:
        mode.allow_non_fake_inputs = allowed
    for node in gm.graph.nodes:  # Dynamo's own key, kept consistent for later readers (and AOT's cache)
        if "val" in node.meta:
            node.meta["example_value"] = node.meta["val"]


def update_fake(gm: fx.GraphModule, example_inputs: Sequence[Any], touched: set) -> None:
    """Fake values after a pass: recomputed for the nodes it inserted or re-wired, and for every
    node downstream whose inputs' fake values then changed; the rest keep theirs. Every node whose
    shapes could have stopped checking is run again, so a broken rewrite still fails here, at a
    fraction of a full propagation's cost when a pass touches a few nodes (span, attention,
    publish). Without Dynamo's fake values on the placeholders: a full propagation."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fakes = [n.meta.get("val", n.meta.get("example_value")) for n in inputs]
    mode = next((f.fake_mode for f in fakes if isinstance(f, FakeTensor)), None)
    if mode is None or len(fakes) != len(example_inputs) or any(f is None for f in fakes):
        propagate_fake(gm, example_inputs)
        return
    allow_data_dependent_lengths(mode)
    allowed, mode.allow_non_fake_inputs = mode.allow_non_fake_inputs, True
    try:
        with mode:
            _IncrementalFakeProp(gm, touched, mode.shape_env).run(*fakes)
    finally:
        mode.allow_non_fake_inputs = allowed


def allow_data_dependent_lengths(mode: FakeTensorMode) -> None:
    """Let the mode run ``era::recycle``, whose output length is data (an unbacked size). Dynamo
    creates each frame's ShapeEnv refusing such ops unless the whole program asked for them
    (``capture_dynamic_output_shape_ops``, or fullgraph); allowing them for the graph handed to the
    backend changes nothing of how the model was traced, and the inner compiler's trace of the
    rewritten graph (the same mode) needs it too."""
    shape_env = mode.shape_env
    if shape_env is not None and not shape_env.allow_dynamic_output_shape_ops:
        shape_env.settings = dataclasses.replace(shape_env.settings, allow_dynamic_output_shape_ops=True)


def bind_unbacked(node: fx.Node, value: Any, shape_env: ShapeEnv | None) -> None:
    """Claim the unbacked sizes a node's fake run created (``era::recycle``'s pruned length) for
    that node, as tracing does: a size left pending would be blamed on the next traced op."""
    bindings = compute_unbacked_bindings(shape_env, value)
    if bindings:
        node.meta["unbacked_bindings"] = bindings


class _BindingFakeProp(FakeTensorProp):
    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n.op != "placeholder" and not n.meta.get("unbacked_bindings"):
            bind_unbacked(n, value, self._mode.shape_env)
        return value


class _IncrementalFakeProp(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, touched: set, shape_env: ShapeEnv | None):
        super().__init__(gm)
        self.touched, self.shape_env = touched, shape_env
        self.moved: set[fx.Node] = set()  # nodes whose value this propagation changed

    def run_node(self, node: fx.Node) -> Any:
        if node.op == "output":
            return super().run_node(node)
        if node.op == "placeholder":
            node.meta["val"] = super().run_node(node)
            return node.meta["val"]
        old = node.meta.get("val", node.meta.get("example_value"))  # Dynamo's graphs carry the latter
        if old is not None and node not in self.touched and not any(a in self.moved for a in node.all_input_nodes):
            node.meta["val"] = old  # every node carries ``val`` after a pass, as after a full propagation
            return old
        value = super().run_node(node)
        bind_unbacked(node, value, self.shape_env)
        if not _same_meta(value, old):
            self.moved.add(node)
        node.meta["val"] = value
        # Dynamo's own key, on inserted nodes too: AOT autograd's cache takes a node without it for
        # a non-tensor (and bypasses the cache for a method called on it)
        node.meta["example_value"] = value
        return value


def _same_meta(a: Any, b: Any) -> bool:
    """Same type, dtype and (statically known) shape and strides, nested; no guard installed."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return (
            a.dtype == b.dtype
            and a.device == b.device
            and same_shape(a, b.shape)
            and a.dim() == b.dim()
            and all(same_size(x, y) for x, y in zip(a.stride(), b.stride(), strict=True))
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_meta(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (int, torch.SymInt)) and isinstance(b, (int, torch.SymInt)):
        return same_size(a, b)
    return type(a) is type(b) and a is b


def mark_side_effects(gm: fx.GraphModule) -> None:
    """Calls Dynamo kept although nothing uses their result do something (``vmap``'s nesting
    level, entered and left around a mask function; an in-place method, GLM-4V-MoE's router
    ``group_mask.scatter_(...)``): the dead-code tail must keep them too."""
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method") and not node.users:
            node.meta["era_side_effect"] = True


def _is_impure(node: fx.Node) -> bool:
    if node.op in ("placeholder", "output") or node.meta.get("era_side_effect"):
        return True
    return node.is_impure()
