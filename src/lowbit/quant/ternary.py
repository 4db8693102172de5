"""Ternary weights {-1, 0, +1} * s ("1.58 bits") with an absmean scale per output channel or group.

Ma, Wang, Ma, Wang, Wang, Huang, Dong, Wang, Xue, Wei (2024), "The Era of 1-bit LLMs: All Large Language Models
are in 1.58 Bits" (BitNet b1.58), arXiv:2402.17764: ``s = mean |w|``, ``t = RoundClip(w / s, -1, 1)``, so the
zero threshold is s / 2. Option ``rule: twn`` uses Ternary Weight Networks instead (Li, Zhang, Liu 2016,
arXiv:1605.04711): threshold 0.7 * mean |w| and the L2-optimal scale, the mean |w| of the weights above it.

Storage (``storage`` option):

- ``codes`` (default): the v1 symmetric 2-bit format, codes q = t + 2 in {1, 2, 3} with a POSITIVE scale
  (decoded (q - 2) * s; code 0, level -2, is never used): 2 + 16 G / K bits per weight, every kernel runs it.
- ``base3``: the same codes five to a byte (``lowbit.kernels.base3``): 1.6 + 16 G / K bits per weight.

Each is a row of the storage table (``lowbit.kernels.storage``: ``ternary``, ``ternary-base3``), chosen by
its ``layout``.

Recipes: ``vision=w2:ternary``, or ``vision=w1.58`` (alias; bits 2, method ternary). YAML:
``{method: ternary, bits: 2, options: {storage: base3}}``.

Example:
    >>> import torch
    >>> from lowbit.quant.methods import QuantContext, get_method
    >>> from lowbit.quant.primitives import QuantSpec
    >>> r = get_method("ternary").quantize_weight(torch.randn(4, 20), QuantSpec(2), QuantContext(), {})
    >>> sorted(set(r.packed.codes().flatten().tolist())) <= [1, 2, 3]
    True
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.errors import unknown_choice
from lowbit.kernels.formats import PackedWeight, expand_groups
from lowbit.kernels.storage import StorageFormat, storage_formats
from lowbit.quant.binary import check_bits, grouped
from lowbit.quant.methods import METHODS, QuantContext, QuantResult, check_options
from lowbit.quant.primitives import QuantSpec, packed_from_codes, round_scales

RULES = ("absmean", "twn")
# The ``storage`` option names a layout of the storage table holding ternary codes {1, 2, 3}; ``codes`` first.
TERNARY_STORAGE: dict[str, StorageFormat] = {
    r.layout: r for r in sorted(storage_formats(), key=lambda r: r.layout != "codes") if r.code_range == (1, 3)}
STORAGES = tuple(TERNARY_STORAGE)
TWN_THRESHOLD = 0.7  # Li et al. 2016: Delta ~ 0.7 E|w| for Gaussian-like weights


def ternary_scales(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """BitNet b1.58 absmean scales: mean |w| per group, fp16-rounded float32 [N, G]."""
    absw = grouped(w.abs(), group_size)  # [N, G, gs]
    counts = grouped(torch.ones_like(w), group_size).sum(-1)
    return round_scales(absw.sum(-1) / counts)


def ternary_levels(w: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """Levels t = clamp(round(w / s), -1, 1) as float32 [N, K] for scales [N, G] (fp16-rounded first)."""
    s = expand_groups(round_scales(scales), w.shape[1], group_size)  # [N, K]
    return torch.round(w.to(torch.float32) / s).clamp(-1, 1)


def ternary_storage(storage: Any, kind: str) -> StorageFormat:
    """The table row of the ``storage`` option for a layer of ``kind`` (LowbitError if either is not accepted)."""
    if storage not in TERNARY_STORAGE:
        raise unknown_choice("ternary storage", str(storage), STORAGES)
    row = TERNARY_STORAGE[storage]
    row.kind_for(kind)  # raises for a layer kind the layout has no module for
    return row


def stored_as(row: StorageFormat, packed: PackedWeight, kind: str) -> QuantResult:
    """``packed`` (standard 2-bit ternary codes) in the layout of ``row``, with its layer kind."""
    if row.repack is None:
        return QuantResult(packed=packed)
    return QuantResult(packed=row.repack(packed), kind=row.kind_for(kind))


def ternary_codes(levels: torch.Tensor) -> torch.Tensor:
    """Symmetric 2-bit codes q = t + 2 (uint8, in {1, 2, 3}) of ternary levels."""
    return (levels + 2).to(torch.uint8)


def twn_grid(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TWN levels float32 [N, K] (threshold 0.7 mean|w| per group) and their optimal scales [N, G]."""
    absw = grouped(w.abs(), group_size)  # [N, G, gs]
    counts = grouped(torch.ones_like(w), group_size).sum(-1, keepdim=True)
    delta = TWN_THRESHOLD * absw.sum(-1, keepdim=True) / counts  # [N, G, 1]
    above = absw > delta
    n_above = above.sum(-1)
    scales = round_scales(torch.where(n_above > 0, (absw * above).sum(-1) / n_above.clamp(min=1), delta.squeeze(-1)))
    n, k = w.shape
    levels = (torch.sign(grouped(w, group_size)) * above).reshape(n, -1)[:, :k]  # [N, K]
    return levels.to(torch.float32), scales


class Ternary:
    """Ternary quantization; options ``rule`` (absmean | twn) and ``storage`` (codes | base3)."""

    needs_calibration = False

    def quantize_weight(
        self, weight: torch.Tensor, spec: QuantSpec, ctx: QuantContext, options: dict[str, Any]
    ) -> QuantResult:
        """Ternarize ``weight`` [N, K] into 2-bit codes {1, 2, 3} (optionally stored in base 3)."""
        check_options("ternary", options, ("rule", "storage"))
        check_bits("ternary", spec, 2, "'vision=w2:ternary' or 'vision=w1.58'")
        rule = options.get("rule", "absmean")
        if rule not in RULES:
            raise unknown_choice("ternary rule", str(rule), RULES)
        row = ternary_storage(options.get("storage", "codes"), ctx.kind)
        w = weight.reshape(weight.shape[0], -1).to(torch.float32)  # [N, K]
        gs = spec.group_size_for(w.shape[1])
        if rule == "twn":
            levels, scales = twn_grid(w, gs)
        else:
            scales = ternary_scales(w, gs)
            levels = ternary_levels(w, scales, gs)
        packed = packed_from_codes(ternary_codes(levels), scales, None, spec, tuple(weight.shape))
        return stored_as(row, packed, ctx.kind)


METHODS.register("ternary")(Ternary())
