"""Super-block storage (llama.cpp's k-quants idea, Q4_K): group steps and minima quantized to 6 bits.

An ``offset`` weight (``lowbit.kernels.offsets``: ``w = q * s + m`` per group) spends two float16 values on each
group: one extra bit per weight at group 32 (Q4_1: 5.0 bits at 4 bits). Here the groups of a row are gathered in
super-blocks of ``GROUPS_PER_SUPER`` = 8 groups (256 weights at group 32); a super-block stores one fp16 step
``d`` and one fp16 minimum step ``dmin``, each group 6-bit codes ``sc`` and ``mn`` (S super-blocks per row):

    s[n, g] = fp16(d[n, j] * sc[n, g]),    m[n, g] = fp16(-(dmin[n, j] * mn[n, g])),    j = min(g // (G // S), S - 1)

(products in float32, rounded to float16). ``W[n, k] = q[n, k] * s[n, g] + m[n, g]`` in float32 with
``g = k // group_size``: once ``s`` and ``m`` are rebuilt (once, at first use, cached) the weight *is* an
``offset`` weight, so it runs on the offset path of the kernels unchanged, bit for bit the reference.

| buffer         | dtype   | shape               | meaning |
|----------------|---------|---------------------|---------|
| ``qweight``      | uint8   | [N, ceil(K*b/8)]    | codes q in [0, 2^b - 1], as in docs/PACKED_FORMAT.md |
| ``sub_scales``   | uint8   | [N, ceil(G*6/8)]    | ``sc`` in [0, 63], 6-bit codes packed LSB-first like ``qweight`` |
| ``sub_mins``     | uint8   | [N, ceil(G*6/8)]    | ``mn`` in [0, 63], likewise |
| ``super_scales`` | float16 | [N, S], 1 <= S <= G | ``d`` of each super-block |
| ``super_mins``   | float16 | [N, S]              | ``dmin`` of each super-block |

The number of super-blocks per row S is the stored width of ``super_scales``: ``G // S`` groups each, the last
taking the leftover ones. ``kquant`` writes S = max(1, G // 8) by default (Q4_K's 8 groups of 32: at 4 bits
4 + 12/32 + 32/256 = 4.5 bits per weight instead of 5.0; K = 576: 18 groups in super-blocks of 9) and any other
number of groups per super-block on request (16: 4.44 bits). As in Q4_K the
minimum is never above zero (``m = -dmin * mn``): a group of positive weights starts its grid at 0. Not Q4_K
byte for byte: llama.cpp multiplies ``d * sc`` in float32 where this format rounds the product to float16 (the
steps the kernels read), so GGUF export does not claim it. The quantizer (``lowbit.quant.kquant``) chooses the
6-bit codes first and rounds the weights on the grid they give, the one stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels.formats import PackedWeight, num_groups, pack_codes, packed_row_bytes, unpack_codes
from lowbit.kernels.offsets import OffsetPacked, _OffsetMixin
from lowbit.kernels.quant_embedding import EMBEDDING_KINDS, QuantEmbedding, _check_plain
from lowbit.kernels.quant_linear import QUANT_KINDS, QuantKind
from lowbit.kernels.variants import ShapeSpec, variant_family

SUB_BITS = 6  # width of the group step / minimum codes
SUB_MAX = (1 << SUB_BITS) - 1
GROUPS_PER_SUPER = 8


def num_super(groups: int, per_super: int = GROUPS_PER_SUPER) -> int:
    """Super-blocks S = max(1, G // per_super) of a row of ``groups`` groups (8 per super-block by default)."""
    return max(1, groups // per_super)


def super_index(groups: int, supers: int) -> torch.Tensor:
    """int64 [G]: the super-block of each group, ``min(g // (G // S), S - 1)`` (the last takes the leftover)."""
    return (torch.arange(groups) // (groups // supers)).clamp(max=supers - 1)


def rebuild_grid(sub_scales: torch.Tensor, sub_mins: torch.Tensor, super_scales: torch.Tensor,
                 super_mins: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp16 steps ``s`` and minima ``m`` [N, G] the stored codes mean (the module docstring's formula)."""
    supers = super_scales.shape[-1] if super_scales.dim() == 2 else 0
    if not 1 <= supers <= groups or tuple(super_mins.shape) != tuple(super_scales.shape):
        raise LowbitError(f"super_scales / super_mins of shapes {tuple(super_scales.shape)} / "
                          f"{tuple(super_mins.shape)}: expected one width S in 1..{groups} (super-blocks per row of "
                          f"{groups} groups)")
    sc = unpack_codes(sub_scales, SUB_BITS, groups).float()  # [N, G]
    mn = unpack_codes(sub_mins, SUB_BITS, groups).float()
    idx = super_index(groups, super_scales.shape[1])
    d, dmin = super_scales.float()[:, idx], super_mins.float()[:, idx]  # [N, G]
    return (d * sc).to(torch.float16), (-(dmin * mn)).to(torch.float16)


@dataclass
class SuperBlockPacked(OffsetPacked):
    """An ``OffsetPacked`` whose ``scales`` / ``offsets`` are rebuilt from 6-bit group codes and fp16 super-block
    steps (``build``); ``nbytes`` counts what is stored (codes, group codes, super-block steps)."""

    sub_scales: torch.Tensor
    sub_mins: torch.Tensor
    super_scales: torch.Tensor
    super_mins: torch.Tensor

    def __post_init__(self) -> None:
        super().__post_init__()
        n, g = tuple(self.scales.shape)
        s = self.super_scales.shape[-1] if self.super_scales.dim() == 2 and 1 <= self.super_scales.shape[-1] <= g \
            else num_super(g)  # S is the stored width (1..G); anything else is reported below
        expected = {"sub_scales": ((n, packed_row_bytes(g, SUB_BITS)), torch.uint8, self.sub_scales),
                    "sub_mins": ((n, packed_row_bytes(g, SUB_BITS)), torch.uint8, self.sub_mins),
                    "super_scales": ((n, s), torch.float16, self.super_scales),
                    "super_mins": ((n, s), torch.float16, self.super_mins)}
        for name, (shape, dtype, t) in expected.items():
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise LowbitError(f"SuperBlockPacked.{name}: received {t.dtype} {tuple(t.shape)}; expected {dtype} "
                                  f"{shape} for weight shape {self.shape}, group_size={self.group_size}")

    @classmethod
    def build(cls, qweight: torch.Tensor, sub_scales: torch.Tensor, sub_mins: torch.Tensor,
              super_scales: torch.Tensor, super_mins: torch.Tensor, bits: int, group_size: int,
              shape: tuple[int, ...]) -> SuperBlockPacked:
        """The weight the stored tensors mean (its group steps and minima rebuilt)."""
        groups = num_groups(int(torch.Size(shape[1:]).numel()), group_size)
        s, m = rebuild_grid(sub_scales, sub_mins, super_scales, super_mins, groups)
        return cls(qweight, s, None, bits, group_size, shape, m, sub_scales, sub_mins, super_scales, super_mins)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, sc: torch.Tensor, mn: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor,
                   bits: int, group_size: int, shape: tuple[int, ...]) -> SuperBlockPacked:
        """Pack uint8 ``codes`` [N, K], group codes ``sc`` / ``mn`` [N, G] (0..63) and fp16 ``d`` / ``dmin`` [N, S]."""
        return cls.build(pack_codes(codes.contiguous(), bits), pack_codes(sc.contiguous(), SUB_BITS),
                         pack_codes(mn.contiguous(), SUB_BITS), d.contiguous(), dmin.contiguous(), bits, group_size,
                         shape)

    @property
    def nbytes(self) -> int:
        """Stored bytes: qweight + the 6-bit group codes + the fp16 super-block steps."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.sub_scales, self.sub_mins,
                                                           self.super_scales, self.super_mins))


class _SuperBlockMixin(_OffsetMixin):
    EXTRA_FIELDS = {"sub_scales": "sub_scales", "sub_mins": "sub_mins", "super_scales": "super_scales",
                    "super_mins": "super_mins"}
    RESIZABLE = ("super_scales", "super_mins")  # S per row is the stored width (kquant's ``super_groups``)
    DROPPED = ("zeros", "scales")  # the steps are rebuilt from the group codes, not stored
    PACKED_TYPE = SuperBlockPacked

    def _groups(self) -> tuple[int, int]:
        n, k = self.weight_shape[0], int(torch.Size(self.weight_shape[1:]).numel())
        return n, num_groups(k, self.group_size)  # type: ignore[attr-defined]

    def _extra_shapes(self) -> dict[str, ShapeSpec]:
        n, g = self._groups()
        codes = ((n, packed_row_bytes(g, SUB_BITS)), torch.uint8)
        steps = ((n, num_super(g)), torch.float16)
        return {"sub_scales": codes, "sub_mins": codes, "super_scales": steps, "super_mins": steps}

    @property
    def packed(self) -> SuperBlockPacked:
        """The stored tensors with the group steps and minima rebuilt once (cached until a buffer changes)."""
        b = self._buffers  # type: ignore[attr-defined]
        _, g = self._groups()
        grid = self._cached("superblock_grid", lambda: torch.stack(rebuild_grid(
            b["sub_scales"], b["sub_mins"], b["super_scales"], b["super_mins"], g)))  # [2, N, G] fp16
        return SuperBlockPacked(b["qweight"], grid[0], None, self.bits, self.group_size,  # type: ignore[attr-defined]
                                self.weight_shape, grid[1], b["sub_scales"], b["sub_mins"], b["super_scales"],
                                b["super_mins"])

    def extra_repr(self) -> str:
        supers = self._buffers["super_scales"].shape[1]  # type: ignore[attr-defined]
        return f"{super(_OffsetMixin, self).extra_repr()}, {supers} super-blocks per row"  # type: ignore[misc]


SuperBlockLinear, SuperBlockConv2d1x1, SuperBlockWeightParam, SUPERBLOCK_KINDS = variant_family(
    "superblock", _SuperBlockMixin, "SuperBlock", "group steps and minima in 6 bits per super-block")


class SuperBlockEmbedding(_SuperBlockMixin, QuantEmbedding):
    """``QuantEmbedding`` in super-block storage (kind ``superblock_embedding``): a lookup rebuilds the group steps
    and minima of the gathered rows only; a tied head is a ``SuperBlockLinear`` holding the same tensors."""

    HEAD_KIND = SUPERBLOCK_KINDS["linear"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._setup_extra()

    @classmethod
    def from_packed(cls, packed: PackedWeight, padding_idx: int | None = None) -> SuperBlockEmbedding:
        """A table holding ``packed`` (a ``SuperBlockPacked`` [V, D], copied)."""
        table = cls(packed.out_features, packed.in_features, packed.bits, packed.group_size, True, padding_idx)
        table._fill(packed, None)
        return table

    def _rows(self, flat: torch.Tensor) -> SuperBlockPacked:
        b = self._buffers
        return SuperBlockPacked.build(b["qweight"][flat], b["sub_scales"][flat], b["sub_mins"][flat],
                                      b["super_scales"][flat], b["super_mins"][flat], self.bits, self.group_size,
                                      (flat.numel(), self.embedding_dim))


def _build_table(module: nn.Module, packed: PackedWeight, input_scale: torch.Tensor | None) -> SuperBlockEmbedding:
    _check_plain(module)
    if input_scale is not None:
        raise LowbitError("an embedding table has no input to scale; AWQ-style input scales do not apply to it")
    return SuperBlockEmbedding.from_packed(packed, getattr(module, "padding_idx", None))


SUPERBLOCK_KINDS["embedding"] = "superblock_embedding"
EMBEDDING_KINDS.add("superblock_embedding")
QUANT_KINDS.register("superblock_embedding")(QuantKind(
    "superblock_embedding", build=_build_table,
    empty=lambda m, b, g, sym, has_s: SuperBlockEmbedding(m.num_embeddings, m.embedding_dim, b, g, sym,
                                                          getattr(m, "padding_idx", None))))
