"""``minmax``: round to nearest on a per-group [min, max] grid with a float minimum (llama.cpp Q4_1 style).

Each group's step is ``s = (max - min) / (2^b - 1)`` and its minimum ``m`` is stored as is (float16), so
``w = q * s + m`` spans exactly the group's range; the integer zero point of ``rtn``'s asymmetric grid must
instead widen the range to contain 0 and round the zero onto the grid. The price is 16 more bits per group
(5.0 bits per weight at 4 bits, group 32: Q4_1's size). Stored as the ``offset`` variant
(``lowbit.kernels.offsets``), which the kernels run.

Why lowbit has it: a model distributed as GGUF Q4_1 (the built-in LLM, SmolLM2-135M-Instruct, is one) sits
on exactly this grid, so ``minmax`` at 4 bits, group 32 re-packs it without loss, where every integer-zero or
symmetric 4-bit grid moves its weights by up to half a step. (Q4_1 rounds each block as
``q = round((w - min) / d)`` with ``d = (max - min) / 15``: min and max land on codes 0 and 15.)

Example:
    >>> import torch
    >>> from lowbit.quant.minmax import minmax_pack
    >>> from lowbit.quant.primitives import QuantSpec
    >>> w = torch.tensor([[0.5, 0.75, 1.0, 1.25]])  # on the grid 0.25 * q + 0.5
    >>> torch.equal(minmax_pack(w, QuantSpec(2, 4)).dequantize(), w)
    True
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.kernels.formats import expand_groups, num_groups, pack_codes
from lowbit.kernels.offsets import OffsetPacked
from lowbit.kernels.storage import find_format
from lowbit.quant.methods import METHODS, QuantContext, QuantResult, check_options
from lowbit.quant.primitives import MAX_SCALE, MIN_SCALE, QuantSpec, _as_matrix


def _to_fp16_floor(v: torch.Tensor) -> torch.Tensor:
    """Largest float16 value <= v (float32 in, float16 out): the stored minimum never rises above the data."""
    h = v.clamp(-MAX_SCALE, MAX_SCALE).to(torch.float16)
    return torch.where(h.float() > v, torch.nextafter(h, torch.full_like(h, -MAX_SCALE)), h)


def minmax_grid(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 steps and minima [N, G] of ``w`` [N, K]; only the real columns of the last group count."""
    n, k = w.shape
    gs = spec.group_size_for(k)
    g = num_groups(k, gs)
    padded = torch.full((n, g * gs), float("nan"), dtype=torch.float32)
    padded[:, :k] = w
    groups = padded.view(n, g, gs)  # [N, G, gs], NaN padding ignored below
    lo = torch.nan_to_num(groups, nan=float("inf")).amin(-1)  # [N, G]
    hi = torch.nan_to_num(groups, nan=float("-inf")).amax(-1)
    m = _to_fp16_floor(lo)
    # Round to nearest (not up): a Q4_1 block's step is an fp16 value the float32 quotient lands on within
    # an ulp, and the step must come back exactly for a lossless re-pack. Codes are clamped, so the
    # group's maximum can move by at most half a float16 ulp of the step times 2^b - 1.
    s = ((hi - m.float()) / spec.maxq).clamp(MIN_SCALE, MAX_SCALE).to(torch.float16)
    return s, m


def check_spec(spec: QuantSpec, method: str = "minmax") -> None:
    """LowbitError unless ``spec`` fits the offset grid (2 to 8 bits, no integer zero point)."""
    if spec.bits < 2 or not spec.symmetric:
        raise LowbitError(f"{method} needs 2 to 8 bits and no 'a' suffix (its float minimum replaces the integer "
                          f"zero point); received {spec}")


def minmax_codes(w: torch.Tensor, s: torch.Tensor, m: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Float codes round((w - m) / s) clamped to [0, 2^b - 1] of ``w`` [N, K] on steps/minima [N, G] (fp16
    values); ``codes * s + m`` (expanded) is then exactly ``OffsetPacked.dequantize``."""
    k = w.shape[1]
    gs = spec.group_size_for(k)
    step = expand_groups(s.float(), k, gs)  # [N, K]
    low = expand_groups(m.float(), k, gs)
    return torch.round((w - low) / step).clamp(0, spec.maxq)


def minmax_pack(weight: torch.Tensor, spec: QuantSpec,
                grid: tuple[torch.Tensor, torch.Tensor] | None = None) -> OffsetPacked:
    """Quantize ``weight`` ([N, K] or a conv kernel) on its min/max grid into an ``OffsetPacked``; ``grid``
    (fp16 steps, fp16 minima [N, G]) defaults to ``minmax_grid`` (QAT passes its learned one)."""
    check_spec(spec)
    shape = tuple(weight.shape)
    w = _as_matrix(weight)  # [N, K]
    gs = spec.group_size_for(w.shape[1])
    s, m = minmax_grid(w, spec) if grid is None else grid
    codes = minmax_codes(w, s, m, spec).to(torch.uint8)
    return OffsetPacked(pack_codes(codes.contiguous(), spec.bits), s.contiguous(), None, spec.bits, gs, shape,
                        m.contiguous())


class MinMax:
    """Calibration-free min/max grid with float minima; no options."""

    needs_calibration = False

    def quantize_weight(self, weight: torch.Tensor, spec: QuantSpec, ctx: QuantContext,
                        options: dict[str, Any]) -> QuantResult:
        check_options("minmax", options, ())
        check_spec(spec)
        kind = find_format("offset", spec.bits).kind_for(ctx.kind, "minmax")
        return QuantResult(packed=minmax_pack(weight, spec), kind=kind)


METHODS.register("minmax")(MinMax())
