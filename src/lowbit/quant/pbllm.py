"""PB-LLM partial binarization: a fraction of salient weights kept at 8 bits, the rest binarized.

Shang, Yuan, Wu, Dong, Wu (2023), "PB-LLM: Partially Binarized Large Language Models", arXiv:2310.00034.
Salient weights are chosen per layer (the top ``fraction`` of all its weights) by

- ``pbllm`` — magnitude |w| (no calibration), or
- ``pbllm-hessian`` — w² · diag(H), H = 2/S XᵀX from calibration (``QuantContext.hessian``): the diagonal
  (OBD-style) estimate of how much zeroing the weight would change the layer's output.

Every weight is binarized (sign, XNOR-Net scale = mean |w| over the NON-salient weights of its group, see
``lowbit.quant.binary``); each salient weight additionally stores its residual over that binary value as an
int8 code with a per-row step, in the CSR side structure of ``lowbit.kernels.sparse_side``. Not done: the
paper's GPTQ-style error compensation of the binarized part (PB-GPTQ).

Effective bits per weight (reported from the stored tensors): 1 + 16 G / K for the binary part, plus per
row 32 (row pointer) + 16 (row step), plus per salient weight 16 (int16 column) + 8 (value); at
``fraction=0.1`` and K = 384 about 1 + 0.04 + 0.13 + 2.4 = 3.6 bits.

Recipe: ``text=w1:pbllm`` (fraction 0.1) or YAML ``{method: pbllm, bits: 1, options: {fraction: 0.05}}``.

Example:
    >>> import torch
    >>> from lowbit.quant.methods import QuantContext, get_method
    >>> from lowbit.quant.primitives import QuantSpec
    >>> r = get_method("pbllm").quantize_weight(torch.randn(8, 50), QuantSpec(1), QuantContext(), {})
    >>> r.kind, r.packed.nnz
    ('pbllm_linear', 40)
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.kernels.sparse_side import SparseSidePacked, side_from_dense
from lowbit.kernels.storage import find_format
from lowbit.quant.binary import binary_codes, binary_scales, binary_values, check_bits
from lowbit.quant.methods import METHODS, QuantContext, QuantResult, check_options
from lowbit.quant.primitives import QuantSpec, packed_from_codes

DEFAULT_FRACTION = 0.1
_OPTIONS = ("fraction",)


def check_fraction(fraction: Any) -> float:
    """``fraction`` if it is a number in [0, 1), else LowbitError."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise LowbitError(f"pbllm option 'fraction' must be a number in [0, 1); received {fraction!r}")
    return float(fraction)


def salient_mask(w: torch.Tensor, fraction: float, hessian: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [N, K]: the ``round(fraction * N * K)`` weights of largest salience (|w|, or w² diag(H) if given)."""
    n, k = w.shape
    count = int(round(fraction * n * k))
    mask = torch.zeros(n * k, dtype=torch.bool)
    if count == 0:
        return mask.view(n, k)
    if hessian is not None:
        if tuple(hessian.shape) != (k, k):
            raise LowbitError(f"pbllm-hessian: Hessian {tuple(hessian.shape)} does not match K={k}")
        score = w.to(torch.float64).pow(2) * torch.diagonal(hessian).to(torch.float64).clamp(min=0)  # [N, K]
    else:
        score = w.abs().to(torch.float64)
    mask[torch.topk(score.reshape(-1), count, sorted=False).indices] = True
    return mask.view(n, k)


def pbllm_pack(
    w: torch.Tensor,
    spec: QuantSpec,
    mask: torch.Tensor,
    shape: tuple[int, ...],
    scales: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
) -> SparseSidePacked:
    """Binary part + CSR side of ``w`` [N, K] with salient ``mask``; ``scales`` [N, G] / ``row_scale`` [N]
    default to mean |w| over non-salient weights / max residual / 127 (QAT passes its learned ones)."""
    gs = spec.group_size_for(w.shape[1])
    s = binary_scales(w, gs, exclude=mask) if scales is None else scales
    codes = binary_codes(w)
    residual = w - binary_values(codes, s, gs)  # what the salient weights miss after binarization
    row_ptr, cols, values, rs = side_from_dense(residual, mask, row_scale)
    base = packed_from_codes(codes, s, None, spec, shape)
    return SparseSidePacked(base.qweight, base.scales, None, base.bits, base.group_size, base.shape,
                            row_ptr, cols, values, rs)


class PBLLM:
    """PB-LLM with ``salience`` magnitude (``pbllm``) or Hessian diagonal (``pbllm-hessian``); option
    ``fraction`` (default 0.1)."""

    def __init__(self, name: str, use_hessian: bool) -> None:
        self.name = name
        self.use_hessian = use_hessian
        self.needs_calibration = use_hessian

    def quantize_weight(
        self, weight: torch.Tensor, spec: QuantSpec, ctx: QuantContext, options: dict[str, Any]
    ) -> QuantResult:
        """Partially binarize ``weight`` [N, K]."""
        check_options(self.name, options, _OPTIONS)
        check_bits(self.name, spec, 1, f"'text=w1:{self.name}'")
        fraction = check_fraction(options.get("fraction", DEFAULT_FRACTION))
        kind = find_format("side", 1).kind_for(ctx.kind, self.name)
        w = weight.reshape(weight.shape[0], -1).to(torch.float32)  # [N, K]
        hessian = ctx.hessian if self.use_hessian else None
        # A layer no calibration row reached has no Hessian: magnitude is the only salience left.
        mask = salient_mask(w, fraction, hessian)
        packed = pbllm_pack(w, spec, mask, tuple(weight.shape))
        return QuantResult(packed=packed, kind=kind)


def expected_bits(k: int, fraction: float, group_size: int | None = None) -> float:
    """Effective bits per weight of a PB-LLM layer with K inputs (int16 columns), for sizing recipes."""
    g = 1 if group_size is None or group_size >= k else math.ceil(k / group_size)
    return 1 + 16 * g / k + (32 + 16) / k + fraction * (16 + 8)


METHODS.register("pbllm")(PBLLM("pbllm", use_hessian=False))
METHODS.register("pbllm-hessian")(PBLLM("pbllm-hessian", use_hessian=True))
