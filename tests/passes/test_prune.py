"""prune: era::select and era::recycle at layer K, every later length follows the pruned one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from era_compile import ERAConfig
from era_compile.algorithms import Selection, register_strategy
from era_compile.passes.fx_utils import reachable_from, same_size, tensor_meta
from era_compile.passes.records import PruneSite
from toys import DIM, IMAGE, LAYERS, PassRecorder, ToyVLM, prompt


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_inserts_select_and_recycle_and_gathers_what_crosses_the_cut(layer):
    torch.manual_seed(0)
    ids, features = prompt(visual=8)
    config = ERAConfig(layer=layer, keep_tokens=3, rectify=False)
    rec = PassRecorder(ToyVLM().eval(), ids, features, config=config, until="prune")
    site = rec.record(PruneSite)
    N, n_after = ids.shape[1], ids.shape[1] - 8 + 3
    assert site.layer == layer
    kept_len = tensor_meta(site.hidden_kept).shape[1]  # the data's: an unbacked size, no literal
    assert isinstance(kept_len, torch.SymInt) and kept_len.node.expr.free_symbols
    with torch.no_grad():
        keep_index, hidden_kept, log_bias, samples = _run_to(rec, site)
    assert keep_index.shape == (1, n_after) and hidden_kept.shape == (1, n_after, hidden_kept.shape[-1])
    assert samples.tolist() == [[8, 3]]
    assert rec.added("era.select") == 1 and rec.added("era.recycle") == 1
    assert rec.added("gather") == 1  # the cos table every later layer reads, gathered once
    counts = rec.pass_result("prune").counts
    assert counts["gathered_tensors"] == 1 and counts["rewritten_shapes"] > 0
    for node in reachable_from([site.hidden_kept], through_sizes=False):  # no stale length after the cut
        t = tensor_meta(node)
        if t is not None and node.op != "output":
            assert not any(same_size(d, N) for d in t.shape), f"{node.name} still has length {N}"
    if layer == 0:  # layer 0's q/k on the unpruned input: a copy of their computation feeds select
        assert rec.added("method:view") >= 2


def _run_to(rec, site):
    """The values of the pruning ops' outputs on the example (an interpreter stopped after them)."""
    wanted = [site.keep_index, site.hidden_kept, site.log_bias, site.samples]
    env = {}

    class Stop(Exception):
        pass

    class Reader(torch.fx.Interpreter):
        def run_node(self, node):
            env[node] = super().run_node(node)
            if all(n in env for n in wanted):
                raise Stop
            return env[node]

    try:
        Reader(rec.result.gm).run(*rec.inputs())
    except Stop:
        pass
    return [env[n] for n in wanted]


def _rewritten_logits(rec: PassRecorder) -> torch.Tensor:
    """The rewritten graph's logits on the recorded prompt."""
    with torch.no_grad():
        return rec.result.gm(*rec.inputs())[0]


def _unchanged_when_all_kept(rec: PassRecorder) -> bool:
    """A recorder that keeps every token: the rewritten graph's logits are the captured graph's."""
    with torch.no_grad():
        expected = rec.gm(*rec.example_inputs)[0]
    return torch.allclose(_rewritten_logits(rec), expected, atol=1e-5)


def test_pruned_graph_runs_and_keeps_the_text():
    torch.manual_seed(0)
    model = ToyVLM().eval()
    ids, features = prompt(visual=8)
    config = ERAConfig(layer=1, keep_tokens=8, rectify=False, recycle=False)  # keep all: nothing changes
    rec = PassRecorder(model, ids, features, config=config)
    assert _unchanged_when_all_kept(rec)


def test_a_routed_mlp_runs_on_the_kept_tokens():
    """An MoE's dispatch after the cut: ``arange(perm.size(0))`` was baked as 2 * N and reads no
    tensor, so it is made again at 2 * n' for its consumer (the index_put's broadcast decides), and
    the router's in-place ``scatter_``, whose result nothing uses, survives the dead-code tail."""
    torch.manual_seed(0)
    model = ToyVLM(routed=True).eval()
    ids, features = prompt(visual=8)
    config = ERAConfig(layer=1, keep_tokens=8, rectify=False, recycle=False)  # keep all: nothing changes
    rec = PassRecorder(model, ids, features, config=config)
    assert rec.pass_result("prune").counts["rewritten_shapes"] > 0
    assert sum(n.op == "call_method" and n.target == "scatter_" for n in rec.result.gm.graph.nodes) == LAYERS
    assert _unchanged_when_all_kept(rec)
    pruned = PassRecorder(model, ids, features, config=config.replace(keep_tokens=3))
    logits = _rewritten_logits(pruned)  # a stale 2 * N would not broadcast into 2 * n'
    assert logits.shape[1] == ids.shape[1] - 8 + 3


def test_a_slice_of_the_whole_prompt_follows_the_pruned_length():
    """``k[..., :N, :]`` with N baked in spans the whole pruned sequence too: its end is opened, so
    the expand after it follows n' (a stale N there failed on the first run: 'The expanded size of
    the tensor (29) must match the existing size (16)')."""
    torch.manual_seed(0)
    model = ToyVLM(prompt_slice=True).eval()
    ids, features = prompt(visual=8)
    config = ERAConfig(layer=1, keep_tokens=8, rectify=False, recycle=False)  # keep all: nothing changes
    rec = PassRecorder(model, ids, features, config=config)
    assert _unchanged_when_all_kept(rec)
    pruned = PassRecorder(model, ids, features, config=config.replace(keep_tokens=3))
    assert _rewritten_logits(pruned).shape[1] == ids.shape[1] - 8 + 3


class _ChunkedScanLayer(torch.nn.Module):
    """A hybrid decoder's linear layer as Qwen3.5's reference scan writes it: a causal convolution
    (``padding=k - 1``, then ``[..., :N]``), a zero pad to a multiple of the chunk (8), a scan unrolled
    over the chunks, its output cut back with ``[:, :N]``. Zeros past the last token leave the scan's
    outputs and state as they are."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(DIM, DIM, 3, groups=DIM, padding=2)
        self.proj = torch.nn.Linear(DIM, DIM)

    def forward(self, h, cos, **kwargs):
        B, N, D = h.shape
        x = self.conv(h.transpose(1, 2))[..., :N].transpose(1, 2)
        x = F.pad(x, (0, 0, 0, (8 - N % 8) % 8))
        chunks = x.reshape(B, -1, 8, D)
        state, out = torch.zeros(B, 1, D), torch.zeros_like(chunks)
        for i in range(chunks.shape[1]):  # each chunk written into the padded output, as HF's scan does
            scanned = chunks[:, i].cumsum(1) + state
            state = scanned[:, -1:]
            out[:, i] = scanned
        return h + self.proj(out.reshape(B, -1, D)[:, :N]), None


def _first_visual(inputs, k: int, options: dict) -> Selection:
    """The first k visual tokens of each sample: anchors a test can name in advance."""
    return Selection(torch.arange(k).expand(inputs.hidden.shape[0], k))


register_strategy("test_first_visual", _first_visual, overwrite=True)


@pytest.mark.parametrize("suffix", [5, 6])  # N = 16, a multiple of the chunk (a pad of 0), and 17
def test_a_chunked_scan_pads_the_kept_tokens_to_the_original_padded_length(suffix):
    """After the cut a chunked scan's pad is ``T - n'`` (T the original's padded length: its unrolled
    loop runs over T's chunks), its convolution's ``[..., :N]`` and its output's ``[:, :N]`` end at n'.
    Keeping every token changes nothing; keeping 3 equals the toy run eagerly on the kept tokens from
    layer 1 on (layer 2, the scan, sees them alone: its pad and chunks are its own)."""
    torch.manual_seed(0)
    model = ToyVLM().eval()
    model.layers[2] = _ChunkedScanLayer()
    ids, features = prompt(visual=8, suffix=suffix)
    config = ERAConfig(layer=1, keep_tokens=8, rectify=False, recycle=False, strategy="test_first_visual")
    rec = PassRecorder(model, ids, features, config=config)
    assert _unchanged_when_all_kept(rec)
    pruned = PassRecorder(model, ids, features, config=config.replace(keep_tokens=3))
    logits = _rewritten_logits(pruned)
    with torch.no_grad():
        image = ids[0] == IMAGE
        kept = torch.nonzero(~image | (image.cumsum(0) <= 3)).flatten()  # the text and the first 3 visual
        embeds = model.embed(ids).masked_scatter(image[None, :, None], model.project(features))
        positions = torch.arange(ids.shape[1])
        cos = torch.cos(positions[:, None] * model.inv_freq[None, :])[None, None]
        h, _ = model.layers[0](embeds, cos)
        h, cos = h[:, kept], cos[:, :, kept]
        for layer in model.layers[1:]:
            h, _ = layer(h, cos)
        assert torch.allclose(logits, model.head(h), atol=1e-5)
