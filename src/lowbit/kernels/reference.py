"""Reference quantized matmul: dequantize the packed weight, then a float matmul.

This is the oracle every fast kernel is tested against (see docs/PACKED_FORMAT.md); it favours obviously
correct over fast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.kernels.formats import PackedWeight


def reference_linear(
    x: torch.Tensor,
    packed: PackedWeight,
    bias: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """y [..., N] = (x [..., K] / input_scale) @ dequantize(packed)^T + bias, computed in ``dtype``.

    Use ``dtype=torch.float64`` for a tighter oracle; the result is returned in ``x.dtype``.
    """
    w = packed.dequantize().to(dtype)  # [N, K]
    xc = x.to(dtype)
    if input_scale is not None:
        xc = xc / input_scale.to(dtype)
    y = F.linear(xc, w, None if bias is None else bias.to(dtype))
    return y.to(x.dtype)
