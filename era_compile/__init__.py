"""era_compile: a torch.compile backend that prunes visual tokens inside the compiled graph.

from era_compile import era_backend, make_era_backend, ERAConfig, last_report
model.compile(backend=era_backend)
"""

import era_compile.logs  # noqa: F401  (first: our log and artifact exist in torch._logging before anything logs)
from era_compile.algorithms import register_strategy
from era_compile.backend import CompiledModel, EraBackend, EraCompileError, era_backend, make_era_backend
from era_compile.config import ERAConfig, keep_tokens_for_layer_average
from era_compile.recompiles import recompile_headroom
from era_compile.report import Report, last_report, report_of

__version__ = "0.1.0"

__all__ = [
    "CompiledModel",
    "ERAConfig",
    "EraBackend",
    "EraCompileError",
    "Report",
    "era_backend",
    "keep_tokens_for_layer_average",
    "last_report",
    "make_era_backend",
    "recompile_headroom",
    "register_strategy",
    "report_of",
]
