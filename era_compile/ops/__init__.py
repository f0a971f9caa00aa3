"""torch.library custom ops: the only things the passes insert, and where passes meet algorithms.

Importing this package registers ``torch.ops.era.select``, ``torch.ops.era.recycle``,
``torch.ops.era.biased_attention`` and ``torch.ops.era.cache_bias`` (with fake kernels, so
they trace without graph breaks).
"""

from era_compile.ops import attention, cache, prune  # noqa: F401
from era_compile.ops.attention import biased_attention

__all__ = ["biased_attention"]
