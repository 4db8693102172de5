"""Scale + minimum storage ("offset" variant): per-group float offsets beside the codes, w = q * s + m.

llama.cpp's Q4_1/Q5_1 (and the k-quants' "min" blocks) store each group of 32 weights as a step ``d`` and a
float minimum ``m``: ``w = d * q + m`` with q in [0, 2^b - 1]. The v1 format (docs/PACKED_FORMAT.md) has an
*integer* zero point instead, whose grid cannot hold such weights exactly (the minimum lands between levels).
This variant adds the minimum as a float16 tensor, so a GGUF Q4_1 model re-packs at 4 bits without loss and
the min/max grid of any weight is kept as computed:

| buffer    | dtype   | shape  | meaning |
|-----------|---------|--------|---------|
| ``qweight`` | uint8   | [N, ceil(K*b/8)] | codes q in [0, 2^b - 1], as in docs/PACKED_FORMAT.md |
| ``scales``  | float16 | [N, G] | the step s of each (row, group), positive |
| ``offsets`` | float16 | [N, G] | the group minimum m |

``W[n, k] = q[n, k] * s[n, g] + m[n, g]`` (g = k // group_size) in float32: 5.0 bits per weight at 4 bits,
group 32 (Q4_1's own size). ``zeros`` is not stored.

The kernels run it as they run asymmetric codes: the minimum's share of ``x @ W^T``, ``sum_g m[n, g] *
(x's sum over group g)``, is their zero-point term with the factor ``-m`` (``fast.prepare`` hands them the
minima as ``mins``, cpu/lowbit_kernels.h), applied per group in the same pass over the quantized activations,
so one call computes the whole product and the kernels' stated activation-quantization bound covers all of it.
(``base()`` and ``group_constants()`` split the weight into ``(q - 2^(b-1)) * s`` plus a per-group constant, for
runtimes without a minimum, e.g. the ONNX export.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.kernels.formats import PackedWeight, expand_groups, num_groups, symmetric_zero
from lowbit.kernels.variants import ExtraPackedMixin, ShapeSpec, variant_family


@dataclass
class OffsetPacked(PackedWeight):
    """Codes + positive fp16 steps + fp16 group minima ``offsets`` [N, G]: ``w = q * s + m``."""

    offsets: torch.Tensor

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bits < 2 or self.zeros is not None:
            raise LowbitError(f"offset storage holds codes of 2 to 8 bits without integer zero points; received "
                              f"bits={self.bits}, zeros={'set' if self.zeros is not None else None}")
        shape = tuple(self.scales.shape)
        if tuple(self.offsets.shape) != shape or self.offsets.dtype != torch.float16:
            raise LowbitError(f"OffsetPacked.offsets: received {self.offsets.dtype} {tuple(self.offsets.shape)}; "
                              f"expected torch.float16 {shape}")

    @property
    def nbytes(self) -> int:
        """Stored bytes: qweight + scales + offsets."""
        return super().nbytes + self.offsets.numel() * self.offsets.element_size()

    def base(self) -> PackedWeight:
        """The standard symmetric weight ``(q - 2^(b-1)) * s`` on the same codes and steps (shares memory)."""
        return PackedWeight(self.qweight, self.scales, None, self.bits, self.group_size, self.shape)

    def group_constants(self) -> torch.Tensor:
        """float32 [N, G]: ``m + 2^(b-1) * s``, what ``base()`` lacks per group."""
        return self.offsets.float() + symmetric_zero(self.bits) * self.scales.float()

    def dequantize(self) -> torch.Tensor:
        """Float32 [N, K]: ``q * s + m``."""
        k = self.in_features
        s = expand_groups(self.scales.float(), k, self.group_size)  # [N, K]
        m = expand_groups(self.offsets.float(), k, self.group_size)  # [N, K]
        return self.codes().float() * s + m


class _OffsetMixin(ExtraPackedMixin):
    EXTRA_FIELDS = {"offsets": "offsets"}
    DROPPED = ("zeros",)
    PACKED_TYPE = OffsetPacked

    def _extra_shapes(self) -> dict[str, ShapeSpec]:
        n, k = self.weight_shape[0], int(torch.Size(self.weight_shape[1:]).numel())
        return {"offsets": ((n, num_groups(k, self.group_size)), torch.float16)}  # type: ignore[attr-defined]

    @property
    def packed(self) -> OffsetPacked:
        b = self._buffers  # type: ignore[attr-defined]
        return OffsetPacked(b["qweight"], b["scales"], None, self.bits, self.group_size,  # type: ignore[attr-defined]
                            self.weight_shape, b["offsets"])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, offsets"  # type: ignore[misc]


OffsetLinear, OffsetConv2d1x1, OffsetWeightParam, OFFSET_KINDS = variant_family(
    "offset", _OffsetMixin, "Offset", "per-group float minima")
