"""Where the backend shows its work: torch's own logging, tlparse, and a dump folder, from one writer.

* **Logs.** Every module logs under its own name (``logging.getLogger(__name__)``), all below
  ``era_compile``, which is registered with ``torch._logging``: ``TORCH_LOGS="+era_compile"``
  (or ``torch._logging.set_logs(modules={"era_compile": logging.DEBUG})``) shows everything, ``"era_compile"``
  the INFO lines (what each pass counted, and its time), a module name one module.
* **Graphs.** ``GraphDump`` is the one writer of graph dumps: the graph as Dynamo handed it over,
  before and after each pass that changed it (numbered), and what the inner compiler received.
  Each goes to the ``era_graphs`` artifact (at DEBUG: ``TORCH_LOGS="+era_compile"``, or
  ``torch._logging.set_logs(modules={"era_graphs": True})`` alone), to ``trace_structured`` (``TORCH_TRACE``:
  tlparse lists each under the Dynamo frame it came from) and, with ``ERA_COMPILE_DUMP=<dir>``, to
  numbered files. Nothing is rendered when nobody listens.

``register_with_torch_logging`` is the one registration, at import, idempotent: a log name and an
artifact name added to ``torch._logging``'s registry (handlers and levels stay torch's to set).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch.fx as fx

LOG = "era_compile"
ARTIFACT = "era_graphs"
DUMP_ENV = "ERA_COMPILE_DUMP"


def register_with_torch_logging() -> None:
    """Name our log and artifact to ``torch._logging`` (repeat calls change nothing)."""
    from torch._logging._internal import log_registry, register_artifact, register_log

    if not log_registry.is_log(LOG):
        register_log(LOG, LOG)
    if not log_registry.is_artifact(ARTIFACT):
        register_artifact(ARTIFACT, "era_compile: each graph before and after each pass that changed it")


register_with_torch_logging()


def _artifact_logger() -> logging.Logger:
    from torch._logging import getArtifactLogger

    return getArtifactLogger(__name__, ARTIFACT)


_graphs_log = _artifact_logger()


def _tracing() -> bool:
    """Whether ``TORCH_TRACE`` (or ``TORCH_COMPILE_DEBUG``) collects structured records (tlparse)."""
    return bool(logging.getLogger("torch.__trace").handlers)


class GraphDump:
    """The dumps of one graph (one variant of it): ``label`` names it (``graph3``,
    ``graph5_carried1``); ``config_key`` keeps two configs' dumps apart in a folder."""

    def __init__(self, config_key: str, label: str):
        folder = os.environ.get(DUMP_ENV)
        self.folder = Path(folder) / f"{config_key}_{label}" if folder else None
        self.label = label

    @property
    def listening(self) -> bool:
        return self.folder is not None or _graphs_log.isEnabledFor(logging.DEBUG) or _tracing()

    def render(self, gm: fx.GraphModule) -> str | None:
        """The graph's code headed by the nodes each pass inserted; None when nobody listens."""
        if not self.listening:
            return None
        code = gm.print_readable(print_output=False, include_stride=False, include_device=False)
        inserted: dict[str, list[str]] = {}
        for node in gm.graph.nodes:
            if "era_pass" in node.meta:
                inserted.setdefault(node.meta["era_pass"], []).append(node.name)
        return "".join(f"# inserted by {p}: {', '.join(names)}\n" for p, names in inserted.items()) + code

    def write(self, gm: fx.GraphModule, name: str) -> None:
        text = self.render(gm)
        if text is not None:
            self.write_text(text, name)

    def write_text(self, text: str, name: str) -> None:
        """``name``: ``dynamo`` (as handed over), ``<step>_<pass>_<before|after>``, or ``compiled``."""
        import torch._logging

        _graphs_log.debug("%s %s:\n%s", self.label, name, text)
        torch._logging.trace_structured(
            "artifact",
            metadata_fn=lambda: {"name": f"era_{self.label}_{name}", "encoding": "string"},
            payload_fn=lambda: text,
        )
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / f"{name}.py").write_text(text)
