"""Packed low-bit weights: formats, quantized modules, reference and fast kernels.

The storage variants (``base3``, ``offsets``, ``sparse_side``, ``superblock``) and ``quant_embedding`` register
their module kinds in ``QUANT_KINDS`` on import, and ``fast`` registers the default ``"cpu"`` linear backend;
importing them here makes the registries complete for any user of the package (checkpoints name kinds, every
``QuantLinear`` names its backend).
``storage`` is the table of storage formats (one row per format). Importing ``fast`` builds nothing: the
extension is compiled at the first packed matmul.
"""

from lowbit.kernels import base3, fast, offsets, quant_embedding, sparse_side, storage, superblock  # noqa: F401
