"""torch.library custom ops: the only things the passes insert, and where passes meet algorithms.

Importing this package registers ``torch.ops.era.select``, ``torch.ops.era.recycle``,
``torch.ops.era.biased_attention``, ``torch.ops.era.cache_bias`` and
``torch.ops.era.head_gram_eigvalsh`` (with fake kernels, so
they trace without graph breaks).
"""

from era_compile.ops import attention, cache, prune, spectral  # noqa: F401
from era_compile.ops.attention import biased_attention

__all__ = ["biased_attention"]
