"""torch.library custom ops: the only things the passes insert, and where passes meet algorithms.

Importing this package registers ``torch.ops.era.select``, ``torch.ops.era.recycle``,
``torch.ops.era.biased_attention`` and ``torch.ops.era.head_gram_eigvalsh`` (with fake
kernels, so they trace without graph breaks). Every op's output is a function of its inputs
(no global or context state: ``torch.library.opcheck`` passes on each, see the tests).
"""

from era_compile.ops import attention, prune, spectral  # noqa: F401
from era_compile.ops.attention import biased_attention

__all__ = ["biased_attention"]
