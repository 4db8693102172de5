"""Dense base-3 storage of ternary weights: 5 trits per byte (3^5 = 243 <= 256), 1.6 bits per weight.

Ternary weights {-1, 0, +1} * s (BitNet b1.58: Ma et al. 2024, "The Era of 1-bit LLMs", arXiv:2402.17764)
are stored in the v1 format as symmetric 2-bit codes {1, 2, 3} (decoded as (q - 2) * s; code 0 unused). This
variant stores the same codes as trits t = q - 1 in {0, 1, 2}, packed densely per row:

    byte b of a row = sum_{j=0..4} t[5b + j] * 3^j      (little-endian digits; the row is padded with t = 0)

| buffer   | dtype   | shape              | meaning |
|----------|---------|--------------------|---------|
| ``qtrits`` | uint8 | [N, ceil(K / 5)]   | base-3 digits as above (replaces ``qweight``) |
| ``scales`` | float16 | [N, G]           | as in docs/PACKED_FORMAT.md (2-bit symmetric) |

The module's ``packed`` is the equivalent standard 2-bit ``PackedWeight`` (rebuilt once and cached), so
every kernel backend runs it unchanged; only the stored bytes differ (1.6 + 16 G / K bits per weight
instead of 2 + 16 G / K).

Example:
    >>> import torch
    >>> t = torch.tensor([[0, 1, 2, 2, 1, 0, 2]], dtype=torch.uint8)
    >>> torch.equal(unpack_trits(pack_trits(t), 7), t)
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.kernels.formats import PackedWeight, pack_codes
from lowbit.kernels.variants import ExtraPackedMixin, ShapeSpec, variant_family

TRITS_PER_BYTE = 5
_POW3 = (1, 3, 9, 27, 81)


def trit_row_bytes(k: int) -> int:
    """Bytes per row of ``k`` trits: ceil(k / 5)."""
    return (k + TRITS_PER_BYTE - 1) // TRITS_PER_BYTE


def pack_trits(trits: torch.Tensor) -> torch.Tensor:
    """Pack uint8 trits [N, K] (each in {0, 1, 2}) into uint8 [N, ceil(K/5)], five little-endian digits a byte."""
    if trits.dtype != torch.uint8 or trits.dim() != 2:
        raise LowbitError(f"pack_trits expects a 2-D uint8 tensor; received {trits.dtype} {tuple(trits.shape)}")
    if trits.numel() and int(trits.max()) > 2:
        raise LowbitError(f"pack_trits: value {int(trits.max())} is not a trit (0, 1 or 2)")
    n, k = trits.shape
    nbytes = trit_row_bytes(k)
    padded = torch.zeros(n, nbytes * TRITS_PER_BYTE, dtype=torch.int32)
    padded[:, :k] = trits.to(torch.int32)
    digits = padded.view(n, nbytes, TRITS_PER_BYTE)  # [N, B, 5]
    pow3 = torch.tensor(_POW3, dtype=torch.int32)
    return (digits * pow3).sum(dim=-1).to(torch.uint8)  # max 242


def unpack_trits(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of ``pack_trits``: uint8 [N, ceil(K/5)] -> uint8 trits [N, K]."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise LowbitError(f"unpack_trits expects a 2-D uint8 tensor; received {packed.dtype} {tuple(packed.shape)}")
    n, nbytes = packed.shape
    if nbytes != trit_row_bytes(k):
        raise LowbitError(f"unpack_trits: {nbytes} bytes per row do not hold K={k} trits "
                          f"(expected {trit_row_bytes(k)})")
    if packed.numel() and int(packed.max()) >= 3**TRITS_PER_BYTE:
        raise LowbitError(f"unpack_trits: byte {int(packed.max())} is not 5 base-3 digits (max 242)")
    p = packed.to(torch.int32).unsqueeze(-1)  # [N, B, 1]
    pow3 = torch.tensor(_POW3, dtype=torch.int32)
    digits = (p // pow3) % 3  # [N, B, 5]
    return digits.reshape(n, nbytes * TRITS_PER_BYTE)[:, :k].to(torch.uint8)


def ternary_codes_to_trits(codes: torch.Tensor) -> torch.Tensor:
    """2-bit symmetric ternary codes {1, 2, 3} -> trits {0, 1, 2} (LowbitError on code 0, level -2)."""
    if codes.numel() and int(codes.min()) < 1:
        raise LowbitError("base-3 storage holds ternary weights only; found 2-bit code 0 (level -2)")
    return codes - 1


@dataclass
class Base3Packed(PackedWeight):
    """A ternary 2-bit ``PackedWeight`` plus its base-3 storage ``trits`` [N, ceil(K/5)]; ``nbytes`` counts
    what is stored (trits + scales), not the 2-bit view."""

    trits: torch.Tensor

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bits != 2 or not self.symmetric:
            raise LowbitError(f"base-3 storage needs symmetric 2-bit ternary codes; received bits={self.bits}, "
                              f"symmetric={self.symmetric}")
        shape = (self.out_features, trit_row_bytes(self.in_features))
        if tuple(self.trits.shape) != shape or self.trits.dtype != torch.uint8:
            raise LowbitError(f"Base3Packed.trits: received {self.trits.dtype} {tuple(self.trits.shape)}; "
                              f"expected torch.uint8 {shape}")

    @classmethod
    def from_packed(cls, packed: PackedWeight) -> Base3Packed:
        """The base-3 form of a ternary 2-bit symmetric ``PackedWeight`` (codes in {1, 2, 3})."""
        trits = pack_trits(ternary_codes_to_trits(packed.codes()))
        return cls(packed.qweight, packed.scales, packed.zeros, packed.bits, packed.group_size, packed.shape, trits)

    @property
    def nbytes(self) -> int:
        """Stored bytes: trits + scales."""
        return self.trits.numel() + self.scales.numel() * self.scales.element_size()


class _Base3Mixin(ExtraPackedMixin):
    EXTRA_FIELDS = {"qtrits": "trits"}
    DROPPED = ("qweight",)
    PACKED_TYPE = Base3Packed

    def _extra_shapes(self) -> dict[str, ShapeSpec]:
        n, k = self.weight_shape[0], int(torch.Size(self.weight_shape[1:]).numel())
        return {"qtrits": ((n, trit_row_bytes(k)), torch.uint8)}

    @property
    def packed(self) -> Base3Packed:
        """The equivalent 2-bit ``PackedWeight`` (plus ``trits``); the 2-bit codes are rebuilt once, cached."""
        b = self._buffers  # type: ignore[attr-defined]
        k = int(torch.Size(self.weight_shape[1:]).numel())
        qweight = self._cached("qweight2", lambda: pack_codes(unpack_trits(b["qtrits"], k) + 1, 2))
        return Base3Packed(qweight, b["scales"], None, self.bits, self.group_size,  # type: ignore[attr-defined]
                           self.weight_shape, b["qtrits"])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, base-3"  # type: ignore[misc]


Base3Linear, Base3Conv2d1x1, Base3WeightParam, BASE3_KINDS = variant_family(
    "base3", _Base3Mixin, "Base3", "ternary codes stored in base 3")
