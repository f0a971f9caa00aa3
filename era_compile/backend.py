"""The Dynamo backend: run the passes on each graph, then hand it to the inner compiler.

    model.compile(backend=era_backend)                       # defaults
    model.compile(backend=make_era_backend(ERAConfig(...)))  # any config
    model.compile(backend="era")                             # the registered name

If a rewrite cannot be done, the rewritten graph does not compile, or it fails on its first
run (``FirstRunFallback``), the backend never pretends: with ``strict=True`` it raises
``EraCompileError``; otherwise it logs a warning, records the reason in the report, and compiles
the graph unmodified. The same holds for a graph that encodes images and feeds them to decoder
layers through a merge the passes do not know (``kinds.decoder_layers_fed``), and, at run time,
for an image prompt that no graph pruned (``Runtime.check_pending_image``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Union

import torch
import torch.fx as fx

import era_compile.ops  # noqa: F401  (registers torch.ops.era.*)
from era_compile.config import ERAConfig
from era_compile.ops.prune import budget_tensor
from era_compile.passes.fx_utils import data_dependent_dims
from era_compile.passes.graph_pass import PassError
from era_compile.passes.kinds import (GraphKind, decoder_layers_fed, hidden_inputs_into_layers, image_inputs, image_values,
                                      is_layer_forward, runs_decoder_layers, token_id_inputs)
from era_compile.passes.manager import PipelineResult, Prepared, prepare, run_passes
from era_compile.passes.records import CarriedVisual, KVCache, LayerStep, PruneSite, RectifiedAttention
from era_compile.report import Report, last_report, logger, set_last
from era_compile.runtime import EraCompileError, GraphPlan, Runtime, Variants, Watched, plan_for  # the error: exported here


class EraBackend:
    """A Dynamo backend bound to one ``ERAConfig``; its ``report`` covers every graph it compiled."""

    def __init__(self, config: Optional[ERAConfig] = None):
        config = config if config is not None else ERAConfig()
        if not isinstance(config, ERAConfig):
            raise TypeError(f"make_era_backend expects an ERAConfig, got {type(config).__name__}")
        self.report = Report(config=config.to_dict())
        layer, note = config.resolve_layer()  # layer="auto": the profile's layer, or the default
        if note:
            self.report.notes.append(note)
            logger.info(note)
        self.config = config.replace(layer=layer, profile=None)
        self.runtime = Runtime(self.report, budget_tensor(self.config.keep_ratio, self.config.keep_tokens),
                               strict=self.config.strict)
        # Dynamo and the inner compiler's caches see a distinct backend per config.
        self.__name__ = f"era_{self.config.cache_key()}"

    def __repr__(self) -> str:
        return f"EraBackend({self.config!r})"

    @contextlib.contextmanager
    def budget(self, *, keep_ratio: Optional[float] = None, keep_tokens: Optional[int] = None):
        """Within the block, every pruned prefill keeps this budget instead of the config's (one of
        ``keep_ratio``, ``keep_tokens``, checked as ``ERAConfig`` checks them). The budget is an input
        of the compiled graphs, so a sweep over it compiles nothing new::

            with backend.budget(keep_ratio=0.05):
                model.generate(**inputs)
        """
        if (keep_ratio is None) == (keep_tokens is None):
            raise ValueError("EraBackend.budget: give one of keep_ratio or keep_tokens")
        checked = self.config.replace(keep_ratio=keep_ratio, keep_tokens=keep_tokens)
        before = self.runtime.budget
        self.runtime.budget = budget_tensor(checked.keep_ratio, checked.keep_tokens)
        try:
            yield checked
        finally:
            self.runtime.budget = before

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        _raise_recompile_limit(self.report)
        _watch_recompile_limit(self.config.strict)
        index = self.report.graphs
        self.report.graphs += 1
        set_last(self.report)
        _dump(gm, index, "before", self.config)
        example_inputs = list(example_inputs)
        start = time.perf_counter()
        try:
            prepared = prepare(gm, self.config, index, example_inputs)
            images = image_values(prepared.gm, example_inputs)
            watched = Watched(image_inputs=tuple(image_inputs(prepared.gm, images, example_inputs)),
                              runs_decoder=runs_decoder_layers(prepared.gm, example_inputs, images),
                              hidden_inputs=tuple(hidden_inputs_into_layers(prepared.gm, example_inputs)),
                              token_inputs=tuple(token_id_inputs(prepared.gm, example_inputs)),
                              layer_forward=is_layer_forward(prepared.gm))
            unknown_merge = decoder_layers_fed(prepared.gm, images, example_inputs) \
                if prepared.kind is GraphKind.TEXT else []
        except Exception as e:  # normalising or classifying failed: a bug of ours, never the user's model
            return self._fall_back(gm, example_inputs, index, f"pruning did not happen: internal error "
                                   f"{type(e).__name__}: {e}", e)
        else:  # outside the handler: a strict error here is the verdict, not an internal error
            if unknown_merge:
                return self._fall_back(gm, example_inputs, index, (
                    f"it encodes images and feeds them to decoder layers ({', '.join(unknown_merge)}), but merges "
                    "them by no pattern the passes know: pruning did not happen"))
        finally:
            self.report.compile_seconds += time.perf_counter() - start
        key_of = self._variant_key(prepared, example_inputs, watched)
        if key_of is None:
            return self._compile(gm, prepared, example_inputs, watched=watched)

        def build(args: List[Any], carried: Union[CarriedVisual, LayerStep, None]) -> Callable:
            if isinstance(carried, LayerStep):
                return self._compile(gm, prepared, args, watched=watched, step=carried)
            return self._compile(gm, prepared, args, carried, watched=watched)

        return Variants(self.runtime, index, key_of, build, example_inputs)

    def _variant_key(self, prepared: Prepared, example_inputs: List[Any], watched: Watched):
        """How a graph that may receive merged embeddings picks its compiled variant (by the input
        that carries them, or none; a decoder layer's own graph by its part on the prompt's way
        through the layers, ``Runtime.layer_step``), or None for a graph compiled once (a prefill
        serves every image size: its pruned shapes are the data's)."""
        receivers = _receivers(example_inputs) if prepared.kind.may_receive_embeddings else []
        if not receivers:
            return None
        if watched.layer_forward:
            return lambda args: self.runtime.layer_step(args, receivers, self.config.layer)

        def carried_key(args):
            found = self.runtime.carried(args, receivers)
            if found is None:
                return None, None
            index, handoff = found
            return index, CarriedVisual(index, handoff.mask)

        return carried_key

    # ------------------------------------------------------------------ internals

    def _compile(self, gm: fx.GraphModule, prepared: Prepared, example_inputs: List[Any],
                 carried: Optional[CarriedVisual] = None, watched: Watched = Watched(),
                 step: Optional[LayerStep] = None) -> Callable:
        start = time.perf_counter()
        try:
            return self._rewrite_and_compile(gm, prepared, example_inputs, carried, watched, step)
        finally:
            self.report.compile_seconds += time.perf_counter() - start

    def _rewrite_and_compile(self, gm: fx.GraphModule, prepared: Prepared, example_inputs: List[Any],
                             carried: Optional[CarriedVisual], watched: Watched,
                             step: Optional[LayerStep]) -> Callable:
        index = prepared.graph_index
        if step is not None:
            label, kind = f"graph{index}_layer{step.layer}_{step.role}", GraphKind.of_layer_step(step.role)
        elif carried is not None:
            label, kind = f"graph{index}_carried{carried.input_index}", GraphKind.CARRIED
        else:
            label, kind = f"graph{index}", prepared.kind
        try:
            result = run_passes(prepared, self.config, example_inputs, carried, dump_name=label, step=step)
        except PassError as e:
            return self._fall_back(gm, example_inputs, index, f"pruning did not happen: {e}", e, kind=kind)
        except Exception as e:  # a bug of ours must not take the user's model down with it
            return self._fall_back(gm, example_inputs, index,
                                   f"pruning did not happen: internal error {type(e).__name__}: {e}", e, kind=kind)

        entry = {"graph": index, "kind": result.kind.value, **result.counts()}
        self.report.passes.append(entry)
        plan = plan_for(result.kind, result.records, self.config, index, result.added_inputs,
                        data_dependent_dims(result.gm), watched)
        if not result.changed:
            if not self._reads_pruned_caches(result, index):
                self._skip(index, _unchanged_reason(result))
            return self.runtime.wrap(self._timed_inner(gm, example_inputs, entry), plan)

        _dump(result.gm, index, "after", self.config)
        try:
            compiled = self._timed_inner(result.gm, result.example_inputs, entry)
        except Exception as e:  # the inner compiler rejected the rewritten graph
            return self._fall_back(gm, example_inputs, index,
                                   f"the rewritten graph failed to compile ({type(e).__name__}: {e}); "
                                   "pruning did not happen", e, kind=kind)
        self._account(result, index)
        context = torch._guards.TracingContext.try_get()  # Dynamo's, for a late compile of the original

        def run_unpruned(error: Exception) -> Callable:
            start = time.perf_counter()
            try:
                return self._fall_back(gm, example_inputs, index, f"the rewritten graph failed on its first run "
                                       f"({type(error).__name__}: {error}); pruning did not happen", error,
                                       kind=kind, context=context)
            finally:
                self.report.compile_seconds += time.perf_counter() - start

        return FirstRunFallback(self.runtime.wrap(compiled, plan), run_unpruned)

    def _reads_pruned_caches(self, result: PipelineResult, index: int) -> bool:
        """A decode step over pruned caches needs no rewrite: their CompactKV adds the bias."""
        cache = result.record(KVCache)
        layers = [c.index for c in cache.layers if c.compact] if cache is not None else []
        if result.kind is not GraphKind.DECODE or not layers:
            return False
        self.report.decode_rewrites += len(layers)
        logger.info("graph %d: layers %s attend over pruned caches, which add the anchors' bias", index, layers)
        return True

    def _account(self, result: PipelineResult, index: int) -> None:
        """Report what a rewritten graph does, by its kind."""
        rectified = result.record(RectifiedAttention)
        if rectified is not None and rectified.kernel:
            self.report.kernel = rectified.kernel
        if result.kind is GraphKind.HANDOFF:
            self.report.handoffs += 1
            logger.info("graph %d: merges visual tokens but runs no decoder layer: their mask is handed on with "
                        "the merged embeddings", index)
        elif result.kind in (GraphKind.LAYER_SALIENCY, GraphKind.LAYER_MASKED):
            self.report.attention_rewrites += len(rectified.calls) if rectified is not None else 0
            logger.info("graph %d: a decoder layer's own graph, %s", index,
                        "hands its queries and keys to the next layer's selection"
                        if result.kind is GraphKind.LAYER_SALIENCY else "masks the pruned tokens out of its keys")
        else:
            if result.kind is GraphKind.LAYER_PRUNE:
                note = (f"the decoder is split into per-layer graphs: layers >= {self.config.layer} run the prefill at "
                        "full length with the pruned tokens masked out of their keys (no prefill saving there); "
                        "their KV cache keeps only the kept tokens")
                if note not in self.report.notes:
                    self.report.notes.append(note)
            site = result.record(PruneSite)
            rewrites = len(rectified.calls) if rectified is not None else 0
            self.report.attention_rewrites += rewrites
            logger.info("graph %d: prunes at layer %d (every image size: the budget and the pruned length are the "
                        "data's), %d attention calls rectified (%s)", index, site.layer, rewrites,
                        rectified.kernel if rectified is not None and rectified.kernel else "no bias")

    def _skip(self, index: int, reason: str) -> None:
        self.report.skipped.append(f"graph {index}: {reason}")
        logger.info("graph %d: left unchanged: %s", index, reason)

    def _fall_back(self, gm, example_inputs, index: int, reason: str, error: Optional[Exception] = None, *,
                   kind: Optional[GraphKind] = None, context: Optional[torch._guards.TracingContext] = None
                   ) -> Callable:
        """The graph as Dynamo gave it, loudly. ``kind``: what the passes took it for; ``context``:
        Dynamo's tracing context of a graph compiled earlier (a fallback at run time)."""
        tells_of_image = kind is not None and kind.has_image
        if self.config.strict:
            if tells_of_image:  # this error is the image's verdict: its inputs dying later is no news
                self.runtime.resolve_pending_image()
            raise EraCompileError(f"era_compile, graph {index}: {reason}") from error
        self.report.skipped.append(f"graph {index}: {reason}")
        self.report.fallbacks.append(index)
        warnings.warn(f"era_compile, graph {index}: {reason}; running it unpruned", RuntimeWarning, stacklevel=3)
        logger.warning("graph %d: %s; running it unpruned", index, reason)
        compiled = (self._inner(gm, example_inputs) if context is None
                    else self._compile_late(gm, example_inputs, context))
        if tells_of_image:  # this warning told of its images: the runtime does not tell them again
            return self.runtime.wrap(compiled, GraphPlan(graph=index, kind=kind, fell_back=True))
        return compiled

    def _compile_late(self, gm: fx.GraphModule, example_inputs: List[Any],
                      context: torch._guards.TracingContext) -> Callable:
        """The inner compiler after Dynamo built the graph's guards: in the graph's own tracing
        context, so its dynamic sizes stay symbolic. A guard the compiler adds now would never
        be checked: then the graph runs as Dynamo gave it, right for every input."""
        shape_env = context.fake_mode.shape_env if context.fake_mode is not None else None
        guards = len(shape_env.guards) if shape_env is not None else 0
        with torch._guards.tracing(context):
            compiled = self._inner(gm, example_inputs)
        if shape_env is not None and len(shape_env.guards) > guards:
            logger.warning("the unpruned graph's compile added shape guards Dynamo will not check: it runs eagerly")
            return gm.forward
        return compiled

    def _timed_inner(self, gm: fx.GraphModule, example_inputs: List[Any], entry: dict) -> Callable:
        """The inner compiler, its wall time in the graph's report entry (``inner_compile_ms``)."""
        start = time.perf_counter()
        try:
            return self._inner(gm, example_inputs)
        finally:
            entry["inner_compile_ms"] = round(1e3 * (time.perf_counter() - start), 3)

    def _inner(self, gm: fx.GraphModule, example_inputs: List[Any]) -> Callable:
        return inner_compile(gm, example_inputs, self.config.compiler)


class FirstRunFallback:
    """A rewritten graph, guarded until a call of it succeeds: a rewrite that compiles can still
    fail when it runs (a model that builds its masks with vmap-ed functions). Then ``run_unpruned``
    (the backend's fallback: a warning, or strict an ``EraCompileError``) compiles the graph as
    Dynamo gave it, and that runs this call (on its own inputs) and every later one. After the
    first success the rewritten graph is called without a ``try``; the fallback, holding the
    example inputs, is let go."""

    def __init__(self, rewritten: Callable, run_unpruned: Callable[[Exception], Callable]):
        self.rewritten, self.run_unpruned = rewritten, run_unpruned
        self.run = self._first_run

    def __call__(self, *args):
        return self.run(*args)

    def _first_run(self, *args):
        try:
            outputs = self.rewritten(*args)
        except EraCompileError:  # the runtime's strict verdict on an unpruned image, not this rewrite failing
            raise
        except Exception as e:
            self.run = self.run_unpruned(e)
            self.run_unpruned = None
            return self.run(*args)
        self.run, self.run_unpruned = self.rewritten, None
        return outputs


def inner_compile(gm: fx.GraphModule, example_inputs: List[Any], compiler: str) -> Callable:
    """What runs a graph after the passes (and a plain baseline with the same compiler): Inductor,
    or the graph's own forward for ``compiler="eager"``."""
    if compiler == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def _unchanged_reason(result: PipelineResult) -> str:
    if result.kind is GraphKind.TEXT:
        return "no image merge (masked_scatter or where) of image features (no visual tokens in this graph)"
    return result.stopped or next((r.skipped for _, r in result.results if r.skipped), "nothing to prune")


# A generate() workload recompiles the one shared forward frame many times (prefill, the first
# two decode steps, then each new prompt length or batch size). Past Dynamo's default limit
# (8) the forward silently runs eagerly: a new prefill would go unpruned and no backend code
# would run to notice. So the backend raises the limit when it is first used, and says so in
# the report and the log.
RECOMPILE_LIMIT = 64


def _raise_recompile_limit(report: Report) -> None:
    config = torch._dynamo.config
    if config.recompile_limit < RECOMPILE_LIMIT:
        note = f"torch._dynamo.config.recompile_limit raised from {config.recompile_limit} to {RECOMPILE_LIMIT}"
        config.recompile_limit = RECOMPILE_LIMIT
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
        report.notes.append(note)
        logger.info("%s (a generate() workload recompiles its forward often; past the limit Dynamo "
                    "would run it eagerly, unpruned)", note)


class _RecompileLimitWatch(logging.Filter):
    """Dynamo says it hit the recompile limit only in a log line, then runs that function eagerly
    for good: every later prefill of it goes unpruned without any backend code running. This
    turns the line into a RuntimeWarning and a note in the report of the backend last used."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("torch._dynamo hit config."):
            function = record.args[2] if isinstance(record.args, tuple) and len(record.args) > 2 else "a function"
            why = (f"Dynamo hit its recompile limit for {function}: its later calls run eagerly, unpruned "
                   "(raise torch._dynamo.config.recompile_limit, or find what recompiles with "
                   "TORCH_LOGS=recompiles)")
            report = last_report()
            if report is not None:
                report.notes.append(why)
            warnings.warn(f"era_compile: {why}", RuntimeWarning)
            logger.warning(why)
        return True


_WATCH = _RecompileLimitWatch()


def _watch_recompile_limit(strict: bool) -> None:
    """Install the watch on Dynamo's logger once; a strict backend makes the limit an error."""
    dynamo_log = logging.getLogger("torch._dynamo.convert_frame")
    if _WATCH not in dynamo_log.filters:
        dynamo_log.addFilter(_WATCH)
    if strict and not torch._dynamo.config.fail_on_recompile_limit_hit:
        torch._dynamo.config.fail_on_recompile_limit_hit = True


def make_era_backend(config: Optional[ERAConfig] = None) -> EraBackend:
    """A backend for ``torch.compile`` / ``model.compile`` with this configuration."""
    return EraBackend(config)


era_backend = EraBackend()


def _receivers(example_inputs: List[Any]) -> List[int]:
    """Inputs that could be merged embeddings [B, N, D] handed on by an earlier graph."""
    return [i for i, x in enumerate(example_inputs)
            if isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Parameter)
            and x.dim() == 3 and x.is_floating_point()]


def _dump(gm: fx.GraphModule, index: int, stage: str, config: ERAConfig) -> None:
    folder = os.environ.get("ERA_COMPILE_DUMP")
    if not folder:
        return
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{config.cache_key()}_graph{index}_{stage}.py").write_text(
        gm.print_readable(print_output=False, include_stride=False, include_device=False))
