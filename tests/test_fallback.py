"""Never break a model, never prune silently: a rewritten graph that fails on its first run falls
back to the graph as Dynamo gave it, and an image prompt that no graph pruned is always told."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch

import era_compile.backend as backend_module
from conftest import build, raised_chain
from era_compile import EraCompileError, ERAConfig, make_era_backend
from era_compile.backend import FirstRunFallback
from era_compile.passes.kinds import image_values
from era_compile.passes.records import Handoff, HandoffOutputs
from era_compile.report import Report
from era_compile.runtime import GraphPlan, Runtime

VMAP_ERROR = "Either your tensor may have escaped from inside a function being vmapped"


@pytest.fixture
def rewrites_fail_at_run_time(monkeypatch):
    """The inner compiler, where a graph that a pass changed compiles but raises when called (as
    a model's vmap-ed mask functions can make it); the graph as Dynamo gave it runs."""
    real = backend_module.inner_compile

    def compile_(gm, example_inputs, compiler):
        compiled = real(gm, example_inputs, compiler)
        if not any("era_pass" in node.meta for node in gm.graph.nodes):
            return compiled

        def fails(*args):
            raise RuntimeError(VMAP_ERROR)

        return fails

    monkeypatch.setattr(backend_module, "inner_compile", compile_)


def test_a_rewrite_that_fails_on_its_first_run_runs_unpruned(rewrites_fail_at_run_time):
    model, inputs = build("llava")
    with torch.no_grad():
        expected = model(**inputs).logits
    backend = make_era_backend(ERAConfig(compiler="eager"))
    compiled = torch.compile(model, backend=backend)
    with pytest.warns(
        RuntimeWarning,
        match=r"^era_compile, graph \d+: the rewritten graph failed on its first run "
        rf"\(RuntimeError: {VMAP_ERROR}\).*running it unpruned",
    ):
        with torch.no_grad():
            out = compiled(**inputs)
    torch.testing.assert_close(out.logits, expected)

    report = backend.report
    prefill = next(entry["graph"] for entry in report.passes if entry["kind"] == "prefill")
    assert report.fallbacks == [prefill]
    assert any(s.startswith(f"graph {prefill}: the rewritten graph failed on its first run") for s in report.skipped)
    assert f"fell back (compiled unmodified): graph {prefill}" in str(report)
    # the failing call recorded nothing: the runtime records after the compiled call returns
    assert not report.pruned and report.pruned_calls == 0 and not report.unpruned_images

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # told once: neither the fallback nor the image again
        with torch.no_grad():
            again = compiled(**inputs)
        del inputs
        gc.collect()
    torch.testing.assert_close(again.logits, expected)
    assert report.fallbacks == [prefill] and not report.unpruned_images


def test_strict_a_rewrite_that_fails_on_its_first_run_is_an_error(rewrites_fail_at_run_time):
    model, inputs = build("llava")
    compiled = torch.compile(model, backend=make_era_backend(ERAConfig(compiler="eager", strict=True)))
    with pytest.raises(
        EraCompileError,
        match=rf"graph \d+: the rewritten graph failed on its first run "
        rf"\(RuntimeError: {VMAP_ERROR}\)",
    ) as info:
        with torch.no_grad():
            compiled(**inputs)
    assert VMAP_ERROR in str(info.value.__cause__)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the error told of the image: its pixels dying is no news
        del inputs
        gc.collect()


def test_after_a_first_success_the_rewritten_graph_is_called_directly():
    calls = []
    guarded = FirstRunFallback(lambda *args: calls.append(args) or "pruned", lambda error: pytest.fail("fell back"))
    assert guarded(1, 2) == "pruned" and guarded(3) == "pruned" and calls == [(1, 2), (3,)]
    assert guarded.run is guarded.rewritten and guarded.run_unpruned is None  # no try, no example inputs held


# ---------------------------------------------------------------------------- an image left unpruned


class BlendMergeLlava(torch.nn.Module):
    """A LLaVA whose image features enter the text embeddings by arithmetic on the image mask
    (``embeds * ~m + features[slot] * m``): a merge the passes do not know. ``split``: a graph break after the
    vision tower, so the tower and the merge land in different graphs."""

    def __init__(self, llava, split: bool):
        super().__init__()
        self.llava, self.split = llava, split

    def forward(self, input_ids, pixel_values):
        inner = self.llava.model
        embeds = inner.get_input_embeddings()(input_ids)
        patches = inner.vision_tower(pixel_values).last_hidden_state
        if self.split:
            torch._dynamo.graph_break()
        features = inner.multi_modal_projector(patches[:, 1:]).flatten(0, 1)
        is_image = input_ids == self.llava.config.image_token_id
        slot = (is_image.long().cumsum(-1) - 1).clamp(min=0)  # the feature each image position takes
        m = is_image.unsqueeze(-1).to(embeds.dtype)
        embeds = embeds * (1 - m) + features[slot] * m
        return self.llava.lm_head(inner.language_model(inputs_embeds=embeds).last_hidden_state)


def _blend_merge(split: bool):
    llava, inputs = build("llava")
    model = BlendMergeLlava(llava, split)
    args = (inputs["input_ids"], inputs["pixel_values"])
    with torch.no_grad():
        expected = model(*args)  # and HF's lazy output hooks are installed before Dynamo traces
    return model, args, expected


def test_an_unknown_merge_next_to_its_vision_tower_falls_back_at_compile_time():
    model, args, expected = _blend_merge(split=False)
    assert torch.equal(torch.compile(model, backend="eager")(*args), expected)  # what plain torch.compile gives
    torch._dynamo.reset()
    backend = make_era_backend(ERAConfig(compiler="eager"))
    with pytest.warns(
        RuntimeWarning,
        match=r"graph 0: it encodes images and feeds them to decoder layers "
        r"\(.*language_model\.layers\.0.*\), but merges them by no pattern",
    ):
        with torch.no_grad():
            out = torch.compile(model, backend=backend)(*args)
    torch.testing.assert_close(out, expected)
    assert backend.report.fallbacks == [0] and not backend.report.pruned
    assert any("merges them by no pattern the passes know" in s for s in backend.report.skipped)

    torch._dynamo.reset()
    strict = make_era_backend(ERAConfig(compiler="eager", strict=True))
    with pytest.raises(Exception, match="encodes images and feeds them to decoder layers") as info:
        with torch.no_grad():
            torch.compile(model, backend=strict)(*args)
    assert EraCompileError in raised_chain(info.value)


def test_an_image_that_no_graph_prunes_is_told_at_run_time():
    """The tower and an unknown merge in different graphs: each graph alone looks fine (a tower,
    a text decoder), so the runtime tells, as the graph that ran decoder layers on the unpruned
    prompt returns: a warning, or, strict, an error."""
    model, args, expected = _blend_merge(split=True)
    backend = make_era_backend(ERAConfig(compiler="eager"))
    compiled = torch.compile(model, backend=backend)
    told = (
        r"graph\(s\) 0 encoded an image prompt and graph 1 ran decoder layers on it, but no graph pruned it: "
        r"its visual tokens were not pruned"
    )
    with pytest.warns(RuntimeWarning, match=f"era_compile: {told}"):
        with torch.no_grad():
            out = compiled(*args)
    torch.testing.assert_close(out, expected)
    report = backend.report
    assert len(report.unpruned_images) == 1 and not report.pruned and not report.fallbacks
    assert "NOT PRUNED: graph(s) 0 encoded an image prompt and graph 1 ran decoder layers" in str(report)

    torch._dynamo.reset()
    strict = make_era_backend(ERAConfig(compiler="eager", strict=True))
    with pytest.raises(EraCompileError, match=told):
        with torch.no_grad():
            torch.compile(model, backend=strict)(*args)
    assert len(strict.report.unpruned_images) == 1


TOWER, DECODER, DECODE = (
    GraphPlan(graph=1, image_inputs=(0,)),
    GraphPlan(graph=2, runs_decoder=True),
    GraphPlan(graph=3, decode_step=True),
)


def _call(runtime, plan, *args):
    runtime.before_call(plan)
    return runtime.record([torch.ones(1)], plan, args)


def test_decoder_layers_on_an_unpruned_image_are_the_verdict():
    """The prompt's visual tokens went through decoder layers unpruned: no later graph can prune
    them. Told once: the decode steps that follow have nothing more to tell."""
    runtime = Runtime(Report(config={}), lambda: torch.ones(()), strict=True)
    pixels = torch.randn(1, 3, 8, 8)
    _call(runtime, TOWER, pixels)
    with pytest.raises(EraCompileError, match=r"graph\(s\) 1 encoded an image prompt and graph 2 ran decoder layers"):
        _call(runtime, DECODER)
    _call(runtime, DECODE)
    _call(runtime, DECODER)  # a text-only turn after it
    del pixels
    gc.collect()
    assert len(runtime.report.unpruned_images) == 1 and runtime.pending is None


def test_an_image_no_decoder_ran_on_is_dropped():
    """A request that failed between its vision tower and its prefill (HF's own check that image
    tokens and features agree): no decoder ran, so there is nothing to tell, then or later."""
    runtime = Runtime(Report(config={}), lambda: torch.ones(()), strict=True)
    pixels = torch.randn(1, 3, 8, 8)
    _call(runtime, TOWER, pixels)  # and the request raised
    _call(runtime, TOWER, pixels)  # the next request: its tower, its prefill
    _call(runtime, GraphPlan(graph=5, prefill_outputs=0, fell_back=True))
    assert runtime.pending is None
    _call(runtime, TOWER, torch.randn(1, 3, 8, 8))  # freed at once: dropped
    _call(runtime, TOWER, pixels)
    _call(runtime, DECODE)  # dropped too
    del pixels
    gc.collect()
    assert runtime.pending is None and not runtime.report.unpruned_images


EMBED = GraphPlan(graph=0, token_inputs=(0,))  # the prompt's token embedding
MERGE = GraphPlan(graph=4, handoff=Handoff(0, HandoffOutputs(visual_mask=0)))  # merged, mask handed on
LAYER = GraphPlan(graph=6, hidden_inputs=(0,), layer_forward=True)  # one decoder layer's own forward
SPLIT = GraphPlan(graph=6, hidden_inputs=(0,))  # decoder layers on hidden states an earlier graph computed


def test_a_decoder_split_into_layers_on_the_unpruned_prompt_is_the_verdict():
    """Granite 4 Vision's shape: the merge runs outside any graph, each decoder layer is a graph of
    its own (no layer index in it, no token ids): hidden states of the prompt's [B, N] reaching
    a layer are the proof. The tower's pixels, copied outside the graphs, die before the decoder
    runs: the features the tower made keep the image waiting. A tower layer's patches do not match."""
    runtime = Runtime(Report(config={}), lambda: torch.ones(()), strict=True)
    ids = torch.ones(1, 12, dtype=torch.long)
    _call(runtime, EMBED, ids)
    features = runtime.record([torch.ones(3, 5, 8)], TOWER, (torch.randn(3, 3, 8, 8),))  # its input dies here
    gc.collect()
    _call(runtime, LAYER, torch.randn(3, 5, 8))  # a tower layer: patches, not the prompt
    assert runtime.pending is not None
    with pytest.raises(
        EraCompileError,
        match=r"graph\(s\) 1 encoded an image prompt and graph 6, a decoder layer's "
        r"own forward \(the decoder is split into per-layer graphs\), ran on it "
        "unpruned: no graph handed the image's visual mask on",
    ):
        _call(runtime, LAYER, torch.randn(1, 12, 8))
    del features
    gc.collect()
    assert len(runtime.report.unpruned_images) == 1 and runtime.pending is None


@pytest.mark.parametrize(
    "decoder, told",
    [
        (
            SPLIT,
            "graph 4 merged an image prompt and handed its visual mask on, but graph 6 ran the language model on "
            "other hidden states",
        ),
        (
            LAYER,
            "graph 4 merged an image prompt and handed its visual mask on, but graph 6 ran the language model on "
            "other hidden states",
        ),
    ],
    ids=["decoder", "layer_forward"],
)
def test_merged_embeddings_changed_outside_a_graph_are_told_at_the_decoder(decoder, told):
    """Granite Docling's shape: the merge graph hands its mask on with the merged embeddings, the
    text model scales them outside a graph, and its layers run on the copy: no graph claims the
    mask, so the first layer on hidden states of its [B, N] tells (strict: raises), and the
    handed-on tensor's death does not tell again. (A layer's own graph on the shape of the handed-on
    mask takes the mask up instead: ``Runtime.layer_step``, which this plain call does not ask.)"""
    runtime = Runtime(Report(config={}), lambda: torch.ones(()), strict=True)
    pixels = torch.randn(1, 3, 8, 8)
    _call(runtime, TOWER, pixels)
    merged = runtime.record([torch.randn(1, 12, 8), torch.zeros(1, 12, dtype=torch.bool)], MERGE, ())[0]
    assert runtime.pending is not None  # a handoff is no verdict: the graph receiving it prunes
    with pytest.raises(EraCompileError, match=told):
        _call(runtime, decoder, merged * 2.0)
    del merged, pixels
    gc.collect()
    assert len(runtime.report.unpruned_images) == 1 and not runtime.report.skipped


def test_a_pruned_prefill_resolves_the_image_of_an_earlier_graph():
    """LLaVA's plain forward runs the vision tower in a graph of its own; the prefill that prunes
    comes later. Strict, twice, and after the inputs die: nothing to tell."""
    model, inputs = build("llava")
    backend = make_era_backend(ERAConfig(compiler="eager", strict=True))
    compiled = torch.compile(model, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with torch.no_grad():
            compiled(**inputs)
            compiled(**inputs)
        del inputs
        gc.collect()
    report = backend.report
    assert report.pruned_calls == 2 and not report.unpruned_images and not report.fallbacks


def test_a_text_only_prompt_is_silent_in_strict_mode():
    model, _ = build("llava")
    ids = torch.randint(3, 200, (1, 12))
    backend = make_era_backend(ERAConfig(compiler="eager", strict=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with torch.no_grad():
            torch.compile(model, backend=backend)(input_ids=ids)
        gc.collect()
    assert not backend.report.pruned and not backend.report.unpruned_images and not backend.report.fallbacks


def test_generate_on_a_supported_model_is_silent_in_strict_mode():
    model, inputs = build("llava")
    backend = make_era_backend(ERAConfig(compiler="eager", strict=True))
    model.compile(backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
        del inputs
        gc.collect()
    report = backend.report
    assert report.pruned and not report.unpruned_images and not report.fallbacks


class _Conv(torch.nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x).relu()


@pytest.mark.parametrize(
    "conv, shape, encodes",
    [
        (torch.nn.Conv2d(3, 4, 2, stride=2), (1, 3, 8, 8), True),  # a patch embedding
        (torch.nn.Conv3d(3, 4, 2, stride=2), (1, 3, 2, 8, 8), True),  # video / Qwen's patches
        (torch.nn.Conv1d(4, 4, 3, groups=4), (1, 4, 8), False),  # an audio encoder's, a short convolution's
    ],
)
def test_image_values_are_2d_and_3d_convolutions_of_inputs(conv, shape, encodes):
    found = []

    def capture(gm, example_inputs):
        found.append(image_values(gm, example_inputs))
        return gm.forward

    torch.compile(_Conv(conv), backend=capture)(torch.randn(shape))
    assert bool(found[0]) is encodes
