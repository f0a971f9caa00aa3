"""Dynamo's recompile limit, seen from a guest: the backend never changes it, and tells when it is hit.

A ``generate()`` workload recompiles the model's forward at new prompt lengths, batch sizes and
decode steps; every Hugging Face model's forward runs through one decorator function, whose cache
entries all compiled models share; a decoder split into per-layer graphs recompiles the layer's
frame once per layer. Past ``torch._dynamo.config.recompile_limit`` (8) Dynamo runs that function
without compiling it again: a prompt that needs a new graph there runs eagerly, unpruned, and no
backend code runs to notice.

* ``recompile_headroom(limit)``: the opt-in a user calls around serving (a scoped
  ``torch._dynamo.config.patch``; on torch >= 2.13 ``torch.compile(..., recompile_limit=64)`` does the
  same for one compiled model).
* ``RecompileLimitWatch``: per compiled model, the functions its graphs were traced from. Dynamo
  says it hit the limit only in a log line, so while any compiled model's watch is alive, one
  ``logging.Filter`` listens on Dynamo's ``convert_frame`` logger (it never drops a record); it is
  removed when the last watch dies (its model, and Dynamo's cache of its graphs, gone). A hit on a
  watched function is told to its model as it happens: a warning and a report note, or in strict
  mode an ``EraCompileError`` raised into the call that hit it, when no other live model traced the
  function (the line does not say whose call hit it: another model's call is never failed by it).
"""

from __future__ import annotations

import contextlib
import logging
import types
import weakref
from collections.abc import Callable, Iterator

import torch

DEFAULT_HEADROOM = 64
_DYNAMO_LOG = "torch._dynamo.convert_frame"
_HIT = "torch._dynamo hit config."  # the start of Dynamo's line (it names the function third)


@contextlib.contextmanager
def recompile_headroom(limit: int = DEFAULT_HEADROOM) -> Iterator[None]:
    """Within the block, Dynamo recompiles a function up to ``limit`` times before it gives up on it
    (and the accumulated limit follows); both are restored on exit::

        with era_compile.recompile_headroom():
            for request in stream:
                model.generate(**request)
    """
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ValueError(f"recompile_headroom: limit must be an int >= 1, got {limit!r}")
    config = torch._dynamo.config
    with config.patch(
        recompile_limit=max(limit, config.recompile_limit),
        accumulated_recompile_limit=max(config.accumulated_recompile_limit, 4 * limit),
    ):
        yield


class RecompileLimitWatch:
    """The functions one compiled model's graphs were traced from; ``told(function, alone)`` is called
    when Dynamo gives up recompiling one of them (``alone``: no other live model traced it, so the call
    that hit the limit is this model's; then it may raise, strict mode's error)."""

    def __init__(self, told: Callable[[str, bool], None]):
        self.functions: dict[tuple[str, int], str] = {}  # (file, first line) -> how Dynamo names it
        self.told = told
        _listener.watch(self)

    def traced(self, code: types.CodeType) -> None:
        self.functions.setdefault(
            (code.co_filename, code.co_firstlineno), f"'{code.co_name}' ({code.co_filename}:{code.co_firstlineno})"
        )

    def named(self, message: str) -> str | None:
        """The one of this model's functions Dynamo's line names, if any."""
        return next((name for (file, line), name in self.functions.items() if f"{file}:{line}" in message), None)


class _Listener(logging.Filter):
    """One filter for every live watch, on Dynamo's logger only while a watch lives."""

    def __init__(self) -> None:
        super().__init__()
        self.watches: weakref.WeakSet[RecompileLimitWatch] = weakref.WeakSet()
        self.alive = 0

    def watch(self, watch: RecompileLimitWatch) -> None:
        if self.alive == 0:
            logging.getLogger(_DYNAMO_LOG).addFilter(self)
        self.alive += 1
        self.watches.add(watch)
        weakref.finalize(watch, self._forget)

    def _forget(self) -> None:
        self.alive -= 1
        if self.alive == 0:
            logging.getLogger(_DYNAMO_LOG).removeFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(_HIT):
            message = record.getMessage()
            named = [(watch, name) for watch in list(self.watches) if (name := watch.named(message)) is not None]
            errors = []
            # a shared function (HF's forward decorator) concerns every model that traced it; which one's
            # call hit the limit the line does not say, so a strict model raises only when it is the one
            for watch, name in named:
                try:
                    watch.told(name, len(named) == 1)
                except Exception as e:  # a strict model's verdict: raised once every model was told
                    errors.append(e)
            if errors:
                raise errors[0]
        return True


_listener = _Listener()
