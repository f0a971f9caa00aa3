"""The Dynamo backend: run the passes on each graph, then hand it to the inner compiler.

    model.compile(backend=era_backend)                       # defaults
    model.compile(backend=make_era_backend(ERAConfig(...)))  # any config
    model.compile(backend="era")                             # the registered name

Each compiled model (each ``torch.compile`` / ``model.compile`` call) gets its own
``CompiledModel``: runtime state and report, so one backend serves several models in a process
without mixing them. If a rewrite cannot be done, the rewritten graph does not compile, or it fails
on its first run (``FirstRunFallback``), the backend never pretends: with ``strict=True`` it raises
``EraCompileError``; otherwise it warns, records the reason in the report, and compiles the graph
unmodified. The same holds for a graph that encodes images and feeds them to decoder layers through
a merge the passes do not know (``kinds.decoder_layers_fed``), and, at run time, for an image prompt
that no graph pruned (``Runtime``). The backend changes no Dynamo or Inductor setting
(``era_compile.recompiles``).
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.fx as fx

import era_compile.ops  # noqa: F401  (registers torch.ops.era.*)
from era_compile.config import ERAConfig
from era_compile.logs import GraphDump
from era_compile.ops.prune import budget_tensor
from era_compile.passes.fx_utils import data_dependent_dims
from era_compile.passes.graph_pass import PassError
from era_compile.passes.kinds import (
    GraphKind,
    decoder_layers_fed,
    hidden_inputs_into_layers,
    image_inputs,
    image_values,
    is_layer_forward,
    runs_decoder_layers,
    token_id_inputs,
)
from era_compile.passes.manager import PipelineResult, Prepared, prepare, run_passes
from era_compile.passes.records import CarriedVisual, KVCache, LayerStep, PruneSite, RectifiedAttention
from era_compile.recompiles import RecompileLimitWatch
from era_compile.report import Report, register_model, set_last
from era_compile.runtime import (  # the error: exported here
    EraCompileError,
    GraphPlan,
    Runtime,
    Variants,
    Watched,
    plan_for,
)

log = logging.getLogger(__name__)


class EraBackend:
    """A Dynamo backend bound to one ``ERAConfig``. Every model compiled with it (every
    ``torch.compile`` / ``model.compile`` call) gets its own ``CompiledModel``: its runtime state
    (handed-on masks, pending images, a split decoder's walk) and its ``Report``.

    Dynamo would otherwise reuse one model's compiled graphs for another model of the same class
    (their ``torch.compile`` wrappers compare equal when their backends do), and those graphs carry
    the first model's runtime: so an ``EraBackend`` never equals another backend, itself included,
    and each compiled model compiles its own graphs."""

    def __init__(self, config: ERAConfig | None = None):
        config = config if config is not None else ERAConfig()
        if not isinstance(config, ERAConfig):
            raise TypeError(f"make_era_backend expects an ERAConfig, got {type(config).__name__}")
        self.requested = config.to_dict()
        layer, self.layer_note = config.resolve_layer()  # layer="auto": the profile's layer, or the default
        self.config = config.replace(layer=layer, profile=None)
        self._budget = budget_tensor(self.config.keep_ratio, self.config.keep_tokens)
        self._models: weakref.WeakKeyDictionary[Any, CompiledModel] = weakref.WeakKeyDictionary()
        self._unnamed: CompiledModel | None = None  # graphs compiled outside a Dynamo frame we can name
        self._latest: Report | None = None  # the report outlives its model: it is the user's to read
        self._unclaimed = False  # ``report`` was read before any compile: the first model fills that one
        # Dynamo and the inner compiler's caches see a distinct backend per config.
        self.__name__ = f"era_{self.config.cache_key()}"

    def __repr__(self) -> str:
        return f"EraBackend({self.config!r})"

    def __eq__(self, other: object) -> bool:
        return False  # see the class docstring: no two compiled models share a graph

    __hash__ = object.__hash__

    @property
    def report(self) -> Report:
        """The report of the model this backend compiled a graph for most recently. Read before any
        compile, it is the report the first model compiled with this backend will fill."""
        if self._latest is None:
            self._latest, self._unclaimed = self._new_report(), True
        return self._latest

    @property
    def reports(self) -> list[Report]:
        """Every living compiled model's report, in the order the models were first compiled."""
        models = list(self._models.values()) + ([self._unnamed] if self._unnamed is not None else [])
        return [m.report for m in sorted(models, key=lambda m: m.serial)]

    @contextlib.contextmanager
    def budget(self, *, keep_ratio: float | None = None, keep_tokens: int | None = None):
        """Within the block, every pruned prefill of every model compiled with this backend keeps
        this budget instead of the config's (one of ``keep_ratio``, ``keep_tokens``, checked as
        ``ERAConfig`` checks them). The budget is an input of the compiled graphs, so a sweep over
        it compiles nothing new::

            with backend.budget(keep_ratio=0.05):
                model.generate(**inputs)
        """
        if (keep_ratio is None) == (keep_tokens is None):
            raise ValueError("EraBackend.budget: give one of keep_ratio or keep_tokens")
        checked = self.config.replace(keep_ratio=keep_ratio, keep_tokens=keep_tokens)
        before = self._budget
        self._budget = budget_tensor(checked.keep_ratio, checked.keep_tokens)
        try:
            yield checked
        finally:
            self._budget = before

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        model = self._model_being_compiled()
        self._latest = model.report
        set_last(model.report)
        return model.compile_graph(gm, example_inputs)

    def _model_being_compiled(self) -> CompiledModel:
        """The ``CompiledModel`` of the ``torch.compile`` call Dynamo is compiling a graph for: its
        backend wrapper, one per call, names it (``OutputGraph.compiler_fn``). Outside a Dynamo frame
        (the backend called by hand), one model per backend."""
        frame = _dynamo_frame()
        key = getattr(getattr(frame, "output", None), "compiler_fn", None)
        if key is None:
            if self._unnamed is None:
                self._unnamed = CompiledModel(self)
            return self._unnamed
        model = self._models.get(key)
        if model is None:
            model = self._models[key] = CompiledModel(self)
        if frame is not None:
            model.traced(frame)
        return model

    def _report_for_a_new_model(self) -> Report:
        if self._unclaimed and self._latest is not None:  # (read before any compile: then made)
            self._unclaimed = False
            return self._latest
        return self._new_report()

    def _new_report(self) -> Report:
        report = Report(config=self.requested)
        if self.layer_note:
            report.notes.append(self.layer_note)
        return report


_serials = iter(range(1 << 62))


class CompiledModel:
    """What one compiled model owns: its runtime state, report and recompile-limit watch; and how
    the backend compiles each graph Dynamo hands over for it.

    It lives as long as its ``torch.compile`` call's wrapper does (the backend's only strong
    reference is keyed by it), so with its model. What it compiles holds it weakly: Dynamo keeps
    every compiled function in the traced module's globals, and the watch on Dynamo's logger must
    go when the model does."""

    def __init__(self, backend: EraBackend):
        self.config = backend.config
        self.serial = next(_serials)
        self.report = backend._report_for_a_new_model()
        if backend.layer_note:
            log.info(backend.layer_note)
        backend_ref = weakref.ref(backend)

        def budget() -> torch.Tensor:
            owner = backend_ref()
            if owner is None:
                raise RuntimeError("era_compile: a graph of a compiled model whose backend is gone was called")
            return owner._budget

        self.runtime = Runtime(self.report, budget, strict=self.config.strict)
        self.recompiles = RecompileLimitWatch(self.runtime.recompile_limit_hit)

    def traced(self, frame: Any) -> None:
        """A Dynamo frame of this model: its function, for the recompile-limit watch; its ``self``,
        for ``era_compile.report_of``."""
        root = getattr(getattr(frame, "output", None), "root_tx", frame)
        code = getattr(root, "f_code", None)
        if code is not None:
            self.recompiles.traced(code)
        owner = getattr(root, "f_locals", {}).get("self")
        if isinstance(owner, torch.nn.Module):
            register_model(owner, self.report)

    def compile_graph(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        index = self.report.graphs
        self.report.graphs += 1
        GraphDump(self.config.cache_key(), f"graph{index}").write(gm, "dynamo")
        example_inputs = list(example_inputs)
        start = time.perf_counter()
        try:
            prepared = prepare(gm, self.config, index, example_inputs)
            images = image_values(prepared.gm, example_inputs)
            watched = Watched(
                image_inputs=tuple(image_inputs(prepared.gm, images, example_inputs)),
                runs_decoder=runs_decoder_layers(prepared.gm, example_inputs),
                hidden_inputs=tuple(hidden_inputs_into_layers(prepared.gm, example_inputs)),
                token_inputs=tuple(token_id_inputs(prepared.gm, example_inputs)),
                layer_forward=is_layer_forward(prepared.gm),
            )
            unknown_merge = (
                decoder_layers_fed(prepared.gm, images, example_inputs) if prepared.kind is GraphKind.TEXT else []
            )
        except _DYNAMO_CONTROL_FLOW:
            raise
        except Exception as e:  # normalising or classifying failed: a bug of ours, never the user's model
            return self._fall_back(
                gm, example_inputs, index, f"pruning did not happen: internal error {type(e).__name__}: {e}", e
            )
        else:  # outside the handler: a strict error here is the verdict, not an internal error
            if unknown_merge:
                return self._fall_back(
                    gm,
                    example_inputs,
                    index,
                    (
                        f"it encodes images and feeds them to decoder layers ({', '.join(unknown_merge)}), but merges "
                        "them by no pattern the passes know: pruning did not happen"
                    ),
                )
        finally:
            self.report.compile_seconds += time.perf_counter() - start
        key_of = self._variant_key(prepared, example_inputs, watched)
        if key_of is None:
            return self._compile(gm, prepared, example_inputs, watched=watched)

        owner = weakref.ref(self)

        def build(args: list[Any], carried: CarriedVisual | LayerStep | None) -> Callable:
            compiler = _alive(owner)
            if isinstance(carried, LayerStep):
                return compiler._compile(gm, prepared, args, watched=watched, step=carried)
            return compiler._compile(gm, prepared, args, carried, watched=watched)

        return Variants(self.runtime, index, key_of, build, example_inputs)

    def _variant_key(self, prepared: Prepared, example_inputs: list[Any], watched: Watched):
        """How a graph that may receive merged embeddings picks its compiled variant (by the input
        that carries them, or none; a decoder layer's own graph by its part on the prompt's way
        through the layers, ``Runtime.layer_step``), or None for a graph compiled once (a prefill
        serves every image size: its pruned shapes are the data's)."""
        receivers = _receivers(example_inputs) if prepared.kind.may_receive_embeddings else []
        if not receivers:
            return None
        runtime, layer = self.runtime, self.config.resolved_layer
        if watched.layer_forward:
            return lambda args: runtime.layer_step(args, receivers, layer)

        def carried_key(args):
            found = runtime.carried(args, receivers)
            if found is None:
                return None, None
            index, handoff = found
            return index, CarriedVisual(index, handoff.mask)

        return carried_key

    # ------------------------------------------------------------------ internals

    def _compile(
        self,
        gm: fx.GraphModule,
        prepared: Prepared,
        example_inputs: list[Any],
        carried: CarriedVisual | None = None,
        watched: Watched = Watched(),
        step: LayerStep | None = None,
    ) -> Callable:
        start = time.perf_counter()
        try:
            return self._rewrite_and_compile(gm, prepared, example_inputs, carried, watched, step)
        finally:
            self.report.compile_seconds += time.perf_counter() - start

    def _rewrite_and_compile(
        self,
        gm: fx.GraphModule,
        prepared: Prepared,
        example_inputs: list[Any],
        carried: CarriedVisual | None,
        watched: Watched,
        step: LayerStep | None,
    ) -> Callable:
        index = prepared.graph_index
        if step is not None:
            label, kind = f"graph{index}_layer{step.layer}_{step.role}", GraphKind.of_layer_step(step.role)
        elif carried is not None:
            label, kind = f"graph{index}_carried{carried.input_index}", GraphKind.CARRIED
        else:
            label, kind = f"graph{index}", prepared.kind
        try:
            result = run_passes(prepared, self.config, example_inputs, carried, dump_name=label, step=step)
        except _DYNAMO_CONTROL_FLOW:
            raise
        except PassError as e:
            return self._fall_back(gm, example_inputs, index, f"pruning did not happen: {e}", e, kind=kind)
        except Exception as e:  # a bug of ours must not take the user's model down with it
            return self._fall_back(
                gm,
                example_inputs,
                index,
                f"pruning did not happen: internal error {type(e).__name__}: {e}",
                e,
                kind=kind,
            )

        entry = {"graph": index, "kind": result.kind.value, **result.counts()}
        self.report.passes.append(entry)
        plan = plan_for(
            result.kind,
            result.records,
            self.config,
            index,
            result.added_inputs,
            data_dependent_dims(result.gm),
            watched,
        )
        if not result.changed:
            if not self._reads_pruned_caches(result, index):
                self._skip(index, _unchanged_reason(result))
            return self.runtime.wrap(self._timed_inner(gm, example_inputs, entry), plan)

        GraphDump(self.config.cache_key(), label).write(result.gm, "compiled")
        try:
            compiled = self._timed_inner(result.gm, result.example_inputs, entry)
        except _DYNAMO_CONTROL_FLOW:  # Dynamo retraces the frame (a float it must specialise): not a failure
            raise
        except Exception as e:  # the inner compiler rejected the rewritten graph
            return self._fall_back(
                gm,
                example_inputs,
                index,
                f"the rewritten graph failed to compile ({type(e).__name__}: {e}); pruning did not happen",
                e,
                kind=kind,
            )
        self._account(result, index)
        context = torch._guards.TracingContext.try_get()  # Dynamo's, for a late compile of the original

        owner = weakref.ref(self)

        def run_unpruned(error: Exception) -> Callable:
            compiler, start = _alive(owner), time.perf_counter()
            try:
                return compiler._fall_back(
                    gm,
                    example_inputs,
                    index,
                    f"the rewritten graph failed on its first "
                    f"run ({type(error).__name__}: {error}); pruning did not happen",
                    error,
                    kind=kind,
                    context=context,
                )
            finally:
                compiler.report.compile_seconds += time.perf_counter() - start

        return FirstRunFallback(self.runtime.wrap(compiled, plan), run_unpruned)

    def _reads_pruned_caches(self, result: PipelineResult, index: int) -> bool:
        """A decode step over pruned caches needs no rewrite: their CompactKV adds the bias."""
        cache = result.record(KVCache)
        layers = [c.index for c in cache.layers if c.compact] if cache is not None else []
        if result.kind is not GraphKind.DECODE or not layers:
            return False
        self.report.decode_rewrites += len(layers)
        log.info("graph %d: layers %s attend over pruned caches, which add the anchors' bias", index, layers)
        return True

    def _account(self, result: PipelineResult, index: int) -> None:
        """Report what a rewritten graph does, by its kind."""
        rectified = result.record(RectifiedAttention)
        if rectified is not None and rectified.kernel:
            self.report.kernel = rectified.kernel
        if result.kind is GraphKind.HANDOFF:
            self.report.handoffs += 1
            log.info(
                "graph %d: merges visual tokens but runs no decoder layer: their mask is handed on with "
                "the merged embeddings",
                index,
            )
        elif result.kind in (GraphKind.LAYER_SALIENCY, GraphKind.LAYER_KEPT):
            self.report.attention_rewrites += len(rectified.calls) if rectified is not None else 0
            log.info(
                "graph %d: a decoder layer's own graph, %s",
                index,
                "hands its queries and keys to the next layer's selection"
                if result.kind is GraphKind.LAYER_SALIENCY
                else "runs on the tokens the prune layer kept (gathered at its entry, written back at its exit)",
            )
        else:
            if result.kind is GraphKind.LAYER_PRUNE:
                note = (
                    f"the decoder is split into per-layer graphs: layers >= {self.config.layer} run the prefill on "
                    "the kept tokens, each gathering them at its entry and writing its states back to their "
                    "positions at its exit, so the logits keep every position (a pruned one's are meaningless; "
                    "read the last, or the kept ones); their KV cache keeps only the kept tokens"
                )
                if note not in self.report.notes:
                    self.report.notes.append(note)
            site = result.record(PruneSite)
            rewrites = len(rectified.calls) if rectified is not None else 0
            self.report.attention_rewrites += rewrites
            log.info(
                "graph %d: prunes at layer %d (every image size: the budget and the pruned length are the "
                "data's), %d attention calls rectified (%s)",
                index,
                site.layer,
                rewrites,
                rectified.kernel if rectified is not None and rectified.kernel else "no bias",
            )

    def _skip(self, index: int, reason: str) -> None:
        self.report.skipped.append(f"graph {index}: {reason}")
        log.info("graph %d: left unchanged: %s", index, reason)

    def _fall_back(
        self,
        gm,
        example_inputs,
        index: int,
        reason: str,
        error: Exception | None = None,
        *,
        kind: GraphKind | None = None,
        context: torch._guards.TracingContext | None = None,
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
        compiled = (
            self._inner(gm, example_inputs) if context is None else self._compile_late(gm, example_inputs, context)
        )
        if tells_of_image and kind is not None:  # this warning told of its images: the runtime does not tell them again
            return self.runtime.wrap(compiled, GraphPlan(graph=index, kind=kind, fell_back=True))
        return compiled

    def _compile_late(
        self, gm: fx.GraphModule, example_inputs: list[Any], context: torch._guards.TracingContext
    ) -> Callable:
        """The inner compiler after Dynamo built the graph's guards: in the graph's own tracing
        context, so its dynamic sizes stay symbolic. A guard the compiler adds now would never
        be checked: then the graph runs as Dynamo gave it, right for every input."""
        shape_env = context.fake_mode.shape_env if context.fake_mode is not None else None
        guards = len(shape_env.guards) if shape_env is not None else 0
        with torch._guards.tracing(context):
            compiled = self._inner(gm, example_inputs)
        if shape_env is not None and len(shape_env.guards) > guards:
            log.warning("the unpruned graph's compile added shape guards Dynamo will not check: it runs eagerly")
            return gm.forward
        return compiled

    def _timed_inner(self, gm: fx.GraphModule, example_inputs: list[Any], entry: dict) -> Callable:
        """The inner compiler, its wall time in the graph's report entry (``inner_compile_ms``)."""
        start = time.perf_counter()
        try:
            return self._inner(gm, example_inputs)
        finally:
            entry["inner_compile_ms"] = round(1e3 * (time.perf_counter() - start), 3)

    def _inner(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        return inner_compile(gm, example_inputs, self.config.compiler)


class FirstRunFallback:
    """A rewritten graph, guarded until a call of it succeeds: a rewrite that compiles can still
    fail when it runs (a model that builds its masks with vmap-ed functions). Then ``run_unpruned``
    (the backend's fallback: a warning, or strict an ``EraCompileError``) compiles the graph as
    Dynamo gave it, and that runs this call (on its own inputs) and every later one. After the
    first success the rewritten graph is called without a ``try``; the fallback, holding the
    example inputs, is let go."""

    def __init__(self, rewritten: Callable, run_unpruned: Callable[[Exception], Callable]):
        self.rewritten = rewritten
        self.run_unpruned: Callable[[Exception], Callable] | None = run_unpruned  # let go after the first run
        self.run = self._first_run

    def __call__(self, *args):
        return self.run(*args)

    def _first_run(self, *args):
        try:
            outputs = self.rewritten(*args)
        except EraCompileError:  # the runtime's strict verdict on an unpruned image, not this rewrite failing
            raise
        except Exception as e:
            run_unpruned = self.run_unpruned
            assert run_unpruned is not None  # let go only where ``run`` stops being this first run
            self.run = run_unpruned(e)
            self.run_unpruned = None
            return self.run(*args)
        self.run, self.run_unpruned = self.rewritten, None
        return outputs


def inner_compile(gm: fx.GraphModule, example_inputs: list[Any], compiler: str) -> Callable:
    """What runs a graph after the passes (and a plain baseline with the same compiler): Inductor,
    or the graph's own forward for ``compiler="eager"``."""
    if compiler == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    return cast(Callable, compile_fx(gm, example_inputs))  # a callable: the other return types are AOT mode's


def _unchanged_reason(result: PipelineResult) -> str:
    if result.kind is GraphKind.TEXT:
        return "no image merge (masked_scatter or where) of image features (no visual tokens in this graph)"
    return result.stopped or next((r.skipped for _, r in result.results if r.skipped), "nothing to prune")


# Dynamo's own control flow, raised from inside a backend: never a failure of the rewrite (a
# RestartAnalysis retraces the frame, e.g. with a float Dynamo tensorified and must now specialise).
_DYNAMO_CONTROL_FLOW = (torch._dynamo.exc.RestartAnalysis,)


def _alive(owner: weakref.ref[CompiledModel]) -> CompiledModel:
    compiler = owner()
    if compiler is None:  # Dynamo matches a graph only to its own torch.compile call, which holds this
        raise RuntimeError("era_compile: a graph of a compiled model that is gone was called")
    return compiler


def _dynamo_frame() -> Any:
    """The instruction translator of the frame Dynamo is compiling now, or None (not inside Dynamo,
    or a torch whose private layout differs: then one model per backend)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        return InstructionTranslator.current_tx()
    except Exception:  # a private API: its absence costs only the per-model split
        return None


def make_era_backend(config: ERAConfig | None = None) -> EraBackend:
    """A backend for ``torch.compile`` / ``model.compile`` with this configuration."""
    return EraBackend(config)


era_backend = EraBackend()


def _receivers(example_inputs: list[Any]) -> list[int]:
    """Inputs that could be merged embeddings [B, N, D] handed on by an earlier graph."""
    return [
        i
        for i, x in enumerate(example_inputs)
        if isinstance(x, torch.Tensor)
        and not isinstance(x, torch.nn.Parameter)
        and x.dim() == 3
        and x.is_floating_point()
    ]
