"""What differs between the supported transformers releases (5.17 to 5.24), in one place.

transformers 5.24 renamed the cache argument and output field ``past_key_values`` to ``cache``
(the old names still work until 5.40, with a deprecation warning); 5.17 knows only the old.
"""

from __future__ import annotations

import inspect
from typing import Any


def cache_kwarg(fn: Any) -> str:
    """The name a forward takes its KV cache under: ``cache`` (5.24 on) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache a model output or a generate() result carries, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)
