"""What a pass is: a named function ``(gm, ctx) -> PassResult`` that declares the records it
requires and the one it provides.

    @graph_pass("span", provides=VisualSpan)
    def find_visual_span(gm, ctx):
        ...
        return PassResult(record=VisualSpan(...), changed=True, counts={...})

A pass reads the records of earlier passes from ``ctx`` (read-only, by type) and returns its
own frozen record; it never changes another pass's record or the context. The manager checks
before each pass that what it requires was provided, and after it that it returned what it
declared. A pass that appends a graph input returns the input's description (an
``AddedInput`` record) in ``added_inputs``: the manager extends the example inputs, the runtime
supplies the value on every call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

import torch.fx as fx

from era_compile.config import ERAConfig

from .kinds import GraphKind
from .records import AddedInput, CarriedVisual, LayerStep

R = TypeVar("R")


class PassError(RuntimeError):
    """A pass found a structure it cannot rewrite safely; the graph is left for the fallback."""


class MissingRecord(PassError):
    """A pass ran without a record it requires (the pipeline is misdeclared, or a provider skipped)."""


@dataclass(frozen=True)
class PassResult:
    """What one pass did. ``counts`` go to the report (numbers, or lists of layer indices);
    ``skipped`` says why it did nothing; ``record`` is its output for later passes."""

    record: Any = None
    changed: bool = False
    counts: Mapping[str, Any] = field(default_factory=dict)
    skipped: str | None = None
    added_inputs: tuple[AddedInput, ...] = ()


@dataclass(frozen=True)
class PassContext:
    """What a pass may read: the config, the graph's kind and index, the example inputs as the
    manager holds them, what the runtime knows of this call (a carried visual mask, the layer a
    per-layer graph runs), and the records of the passes before it (by type)."""

    config: ERAConfig
    kind: GraphKind
    graph_index: int = 0
    example_inputs: tuple[Any, ...] = ()
    carried: CarriedVisual | None = None
    records: Mapping[type, Any] = field(default_factory=lambda: MappingProxyType({}))
    step: LayerStep | None = None  # a decoder layer's own graph: its place on an image prompt's way

    def get(self, record_type: type[R]) -> R:
        """The record of that type an earlier pass provided; raises ``MissingRecord``."""
        if record_type not in self.records:
            raise MissingRecord(f"no {record_type.__name__} record: no earlier pass provided one")
        return self.records[record_type]

    def find(self, record_type: type[R]) -> R | None:
        return self.records.get(record_type)


@dataclass(frozen=True)
class GraphPass:
    """A pass with its contract. ``requires``: record types that must exist before it runs;
    ``provides``: the record type it returns (None for a pass that only checks or rewrites);
    ``keeps_meta``: the manager need not propagate fake tensors after it (lint and recompile only);
    ``rewrites``: whether its changes make the graph a rewritten one (False for ``normalize``, which
    respells, and ``span``, which only adds the visual mask later passes use)."""

    name: str
    run: Callable[[fx.GraphModule, PassContext], PassResult]
    requires: tuple[type, ...] = ()
    provides: type | None = None
    keeps_meta: bool = False  # a respelling: every node it creates carries its fake value already
    rewrites: bool = True  # False: its changes alone (a respelling, an analysis node) leave nothing to compile

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return self.run(gm, ctx)


def graph_pass(
    name: str,
    *,
    requires: tuple[type, ...] = (),
    provides: type | None = None,
    keeps_meta: bool = False,
    rewrites: bool = True,
):
    """Declare a function as a pass (see the module docstring)."""

    def wrap(fn: Callable[[fx.GraphModule, PassContext], PassResult]) -> GraphPass:
        return GraphPass(name, fn, tuple(requires), provides, keeps_meta, rewrites)

    return wrap


def frozen(mapping: dict[type, Any]) -> Mapping[type, Any]:
    return MappingProxyType(dict(mapping))
