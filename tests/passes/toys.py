"""Small graphs for the pass tests: a toy VLM with the structure the passes look for (an image
merge, indexed decoder layers with SDPA, per-position tensors shared by the layers, a KV
cache), captured by Dynamo in well under a second; and a ``TestBackend``-style recorder.

The toy builds its sequence the way Hugging Face models do (embeddings, ``masked_scatter`` of
the projected image features at the image tokens, cos tables from positions, ``view`` into
heads, ``cat`` onto a past cache) without being any model; the tests never import a model
class of the project's zoo.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from era_compile import ERAConfig
from era_compile.passes.manager import PipelineResult, prepare, run_passes

IMAGE = 63  # the image placeholder token
DIM, HEADS, LAYERS, VOCAB = 32, 4, 3, 64


class RoutedMLP(nn.Module):
    """Top-2 of 4 experts per token, dispatched as Hugging Face's grouped MoE does: the routed copies
    sorted by expert and put back with ``inv_perm[perm] = arange(perm.size(0))`` (a size of 2 * N
    that reads no tensor), the chosen groups marked by an in-place method whose result is unused."""

    EXPERTS, TOP_K = 4, 2

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(DIM, self.EXPERTS, bias=False)
        self.experts = nn.Parameter(torch.randn(self.EXPERTS, DIM, DIM) / DIM**0.5)

    def forward(self, h):
        B, N, D = h.shape
        x = h.reshape(-1, D)
        scores = self.router(x).softmax(-1)
        chosen = torch.zeros_like(scores)
        chosen.scatter_(1, scores.topk(self.TOP_K, dim=-1)[1], 1.0)  # in place, result unused
        weights, experts = (scores * chosen).topk(self.TOP_K, dim=-1)
        _, perm = torch.sort(experts.reshape(-1), stable=True)
        routed = torch.bmm(x[perm // self.TOP_K].unsqueeze(1), self.experts[experts.reshape(-1)[perm]]).squeeze(1)
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = torch.arange(perm.size(0))
        out = routed[inv_perm] * weights.reshape(-1, 1)
        return out.view(N * B, self.TOP_K, D).sum(1).view(B, N, D)


class ToyLayer(nn.Module):
    """``prompt_slice``: the keys pass through ``k[..., :N, :]`` with the prompt's length baked in
    (a cache that takes every prompt key, as one that keeps its prompt part apart does) and a
    repeat_kv-style expand to that length."""

    def __init__(self, routed: bool = False, prompt_slice: bool = False):
        super().__init__()
        self.prompt_slice = prompt_slice
        self.norm = nn.LayerNorm(DIM)
        self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))
        self.mlp = RoutedMLP() if routed else nn.Linear(DIM, DIM)

    def forward(self, h, cos, mask=None, past=None, static=None, positions=None):
        B, N, _ = h.shape
        x = self.norm(h)
        q = self.q(x).view(B, N, HEADS, -1).transpose(1, 2) * cos
        k = self.k(x).view(B, N, HEADS, -1).transpose(1, 2) * cos
        v = self.v(x).view(B, N, HEADS, -1).transpose(1, 2)
        if static is not None:  # a preallocated cache written in place (StaticCache's way)
            static[0].index_copy_(2, positions, k)
            static[1].index_copy_(2, positions, v)
            k, v = static
        elif past is not None:
            k, v = torch.cat([past[0], k], dim=-2), torch.cat([past[1], v], dim=-2)
        if self.prompt_slice:
            k, v = (t[..., :N, :][:, :, None].expand(B, HEADS, 1, N, t.shape[-1])[:, :, 0] for t in (k, v))
        causal = mask is None and past is None and static is None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        h = h + self.o(out.transpose(1, 2).reshape(B, N, DIM))
        return h + self.mlp(h), (k, v)


class ToyVLM(nn.Module):
    """``forward(input_ids, image_features=None, past=None, mask=None)`` -> (logits, cache)."""

    def __init__(self, merge: str = "method", layers: int = LAYERS, routed: bool = False, prompt_slice: bool = False):
        super().__init__()
        self.merge = merge
        self.embed = nn.Embedding(VOCAB, DIM)
        self.project = nn.Linear(DIM, DIM)
        self.layers = nn.ModuleList(ToyLayer(routed, prompt_slice) for _ in range(layers))
        self.head = nn.Linear(DIM, VOCAB)
        self.register_buffer("inv_freq", 1.0 / 100 ** (torch.arange(DIM // HEADS) / (DIM // HEADS)))

    def forward(self, input_ids, image_features=None, past=None, mask=None, static=None):
        embeds = self.embed(input_ids)
        if image_features is not None:
            features = self.project(image_features)
            image = input_ids == IMAGE
            if self.merge == "method":
                embeds = embeds.masked_scatter(image.unsqueeze(-1), features)
            elif self.merge == "function":
                embeds = torch.masked_scatter(embeds, image[..., None], features)
            elif self.merge == "setitem":
                embeds = embeds.clone()
                embeds[image] = features
            elif self.merge == "scatter":  # each feature row written at its position, last image first
                B, D = embeds.shape[0], embeds.shape[-1]
                rows = features.view(B, -1, D)
                positions = torch.argsort((~image).to(torch.int8), dim=1, stable=True)[:, : rows.shape[1]]
                embeds = embeds.scatter(1, positions.flip(1)[..., None].expand(-1, -1, D), rows.flip(1))
            else:
                raise ValueError(self.merge)
        offset = past[0][0].shape[-2] if past is not None else 0
        positions = torch.arange(offset, offset + input_ids.shape[1])
        cos = torch.cos(positions[:, None] * self.inv_freq[None, :])[None, None]  # [1, 1, N, d]: every layer
        h, cache = embeds, []
        for i, layer in enumerate(self.layers):
            h, kv = layer(
                h,
                cos,
                mask=mask,
                past=None if past is None else past[i],
                static=None if static is None else static[i],
                positions=positions,
            )
            cache.append(kv)
        return self.head(h), cache


def prompt(batch: int = 1, prefix: int = 3, visual: int = 8, suffix: int = 5, seed: int = 0):
    """input_ids [B, N] with ``visual`` image tokens per sample, and their features [B*T, D]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat(
        [
            torch.randint(1, IMAGE, (batch, prefix), generator=g),
            torch.full((batch, visual), IMAGE),
            torch.randint(1, IMAGE, (batch, suffix), generator=g),
        ],
        1,
    )
    return ids, torch.randn(batch * visual, DIM, generator=g)


def past_cache(batch: int = 1, length: int = 10, layers: int = LAYERS, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, HEADS, length, DIM // HEADS, generator=g),
            torch.randn(batch, HEADS, length, DIM // HEADS, generator=g),
        )
        for _ in range(layers)
    ]


def capture(fn, *args, **kwargs) -> tuple[fx.GraphModule, list[Any]]:
    """The one graph Dynamo makes of ``fn(*args, **kwargs)`` (static shapes) and its example inputs."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=backend, dynamic=False, fullgraph=True)(*args, **kwargs)
    assert len(graphs) == 1, f"expected one graph, Dynamo made {len(graphs)}"
    return graphs[0]


def op_counts(gm: fx.GraphModule) -> Counter:
    """How often each call target occurs: ``era.select``, ``scaled_dot_product_attention``,
    ``method:view``, ``cat`` ... (the before/after counts every pass test asserts)."""
    counts: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_method":
            counts[f"method:{node.target}"] += 1
        elif node.op == "call_function":
            target = node.target
            name = getattr(target, "__name__", str(target))
            if isinstance(target, torch._ops.OpOverload):
                name = f"{target.namespace}.{target._opname}"
            counts[name] += 1
    return counts


class PassRecorder:
    """Capture a graph, run the manager on it up to a named pass, and keep the op counts
    before and after (as vLLM's ``tests/compile/backend.py`` does for its passes)."""

    def __init__(self, fn, *args, config: ERAConfig | None = None, until: str | None = None, **kwargs):
        self.config = config or ERAConfig(layer=1, keep_tokens=3)
        self.gm, self.example_inputs = capture(fn, *args, **kwargs)
        self.before = op_counts(self.gm)
        self.prepared = prepare(self.gm, self.config, 0, self.example_inputs)
        self.result: PipelineResult = run_passes(self.prepared, self.config, self.example_inputs, until=until)
        self.after = op_counts(self.result.gm)

    @property
    def kind(self):
        return self.prepared.kind

    def record(self, record_type):
        return self.result.record(record_type)

    def pass_result(self, name: str):
        return dict(self.result.results)[name]

    def added(self, target: str) -> int:
        return self.after[target] - self.before[target]

    def inputs(self) -> list:
        """The example inputs of the rewritten graph: the captured ones, then a real value for each
        input a pass appended (what the runtime supplies: here the config's keep budget)."""
        from era_compile.ops.prune import budget_tensor
        from era_compile.passes.records import BudgetInput

        extra = []
        for added in self.result.added_inputs:
            if not isinstance(added, BudgetInput):
                raise TypeError(f"no test value for added input {added!r}")
            extra.append(budget_tensor(self.config.keep_ratio, self.config.keep_tokens))
        return list(self.example_inputs) + extra
