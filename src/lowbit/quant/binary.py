"""Binary (1-bit) weights: w ~ sign(w) * s with one scale per output channel or group, s = mean |w|.

Rastegari, Ordonez, Redmon, Farhadi (2016), "XNOR-Net: ImageNet Classification Using Binary Convolutional
Neural Networks", arXiv:1603.05279: for a fixed sign pattern the L2-optimal scale of a group is its mean
absolute value. He, Lou, Liu, Zhuang (2023), "BiViT: Extremely Compressed Binary Vision Transformers",
arXiv:2211.07091, binarize ViT weights the same way, per output channel.

Stored in the 1-bit packed format of docs/PACKED_FORMAT.md: code q = [w >= 0], ``w_b = (q - 1/2) * 2 * s``.
Effective bits per weight: 1 + 16 G / K (per-channel: 1 + 16 / K). The functions here are shared with
PB-LLM (``lowbit.quant.pbllm``, scales over the non-salient weights only) and with QAT.

Example:
    >>> import torch
    >>> from lowbit.quant.methods import QuantContext, get_method
    >>> from lowbit.quant.primitives import QuantSpec
    >>> r = get_method("binary").quantize_weight(torch.randn(8, 64), QuantSpec(1), QuantContext(), {})
    >>> r.packed.bits, tuple(r.packed.qweight.shape)
    (1, (8, 8))
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.kernels.formats import dequantize_grouped, num_groups
from lowbit.quant.methods import METHODS, QuantContext, QuantResult, check_options
from lowbit.quant.primitives import QuantSpec, packed_from_codes, round_scales


def grouped(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> zero-padded [N, G, group_size] (differentiable; the last group may be padded)."""
    n, k = t.shape
    g = num_groups(k, group_size)
    return F.pad(t, (0, g * group_size - k)).view(n, g, group_size)  # [N, G, gs]


def binary_scales(w: torch.Tensor, group_size: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Per-group mean |w| over the weights not in ``exclude`` (bool [N, K]), fp16-rounded float32 [N, G].

    A group whose weights are all excluded falls back to the mean over all of them.
    """
    keep = torch.ones_like(w, dtype=torch.bool) if exclude is None else ~exclude.to(torch.bool)
    valid = grouped(torch.ones_like(w), group_size)  # [N, G, gs], 0 on padding
    kept = grouped(keep.to(w.dtype), group_size)
    absw = grouped(w.abs(), group_size)
    n_kept = kept.sum(-1)
    mean_kept = (absw * kept).sum(-1) / n_kept.clamp(min=1)
    mean_all = absw.sum(-1) / valid.sum(-1)
    return round_scales(torch.where(n_kept > 0, mean_kept, mean_all))


def binary_codes(w: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K]: 1 where w >= 0 (zero counts as positive), else 0."""
    return (w >= 0).to(torch.uint8)


def binary_values(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """Float32 [N, K] = sign * s of 1-bit codes [N, K] and scales [N, G] (the packed format's own decoding)."""
    return dequantize_grouped(codes, round_scales(scales).to(torch.float16), None, 1, group_size)


def check_bits(method: str, spec: QuantSpec, bits: int, example: str) -> None:
    """LowbitError unless ``spec`` is symmetric with ``bits`` bits (methods tied to one code width)."""
    if spec.bits != bits or not spec.symmetric:
        raise LowbitError(f"method {method!r} needs symmetric {bits}-bit weights; received {spec.short()}; "
                          f"write e.g. {example}")


class Binary:
    """Sign binarization with mean-|w| scales (per channel, or per group with ``wBITSg<G>``); no options."""

    needs_calibration = False

    def quantize_weight(
        self, weight: torch.Tensor, spec: QuantSpec, ctx: QuantContext, options: dict[str, Any]
    ) -> QuantResult:
        """Binarize ``weight`` [N, K]."""
        check_options("binary", options, ())
        check_bits("binary", spec, 1, "'vision=w1:binary' or 'text=w1g128:binary'")
        w = weight.reshape(weight.shape[0], -1).to(torch.float32)  # [N, K]
        gs = spec.group_size_for(w.shape[1])
        scales = binary_scales(w, gs)
        return QuantResult(packed=packed_from_codes(binary_codes(w), scales, None, spec, tuple(weight.shape)))


METHODS.register("binary")(Binary())
