"""Packed low-bit weights: formats, quantized modules, reference and fast kernels.

The storage variants (``base3``, ``offsets``, ``sparse_side``) register their module kinds in ``QUANT_KINDS`` on import;
importing them here makes the registry complete for any user of the package (checkpoints name kinds).
"""

from lowbit.kernels import base3, offsets, sparse_side  # noqa: F401
