"""Uniform integer quantization primitives: specs, scales, codes, fake-quant and packing.

Grid conventions (docs/PACKED_FORMAT.md fixes the stored format; this module picks the grid inside it):

- Symmetric, bits >= 2: codes 0..2^b-1 mean integer levels -2^(b-1) .. 2^(b-1)-1 (zero point 2^(b-1)).
  The scale is *signed*: ``s = -m / 2^(b-1)`` where m is the group's weight of largest magnitude, so m lands
  exactly on the lone extra level -2^(b-1) whichever its sign (the Q4_0 rule of llama.cpp/GGML, Gerganov
  2023; grid and format otherwise as in GPTQ, Frantar et al. 2023, arXiv:2210.17323). All 2^b codes are
  used. Measured relative error on Gaussian groups of 32 (2/3/4 bits): 0.36/0.17/0.086 for the signed scale,
  versus 0.47/0.20/0.095 for ``2*absmax/(2^b-1)`` (whose -2^(b-1) level is never reached, i.e. ternary at
  2 bits) and 0.66/0.23/0.097 for ``absmax/(2^(b-1)-1)``. Scales may therefore be negative; the
  dequantization formula ``(q - z) * s`` is unchanged.
- Symmetric 1-bit: the binary format ``w = (q - 1/2) * 2 * s`` (sign * s); ``s = mean |w|`` of the group,
  the L2-optimal scale for sign quantization (XNOR-Net, Rastegari et al. 2016, arXiv:1603.05279).
- Asymmetric: the range [min(w, 0), max(w, 0)] is mapped onto 0..2^b-1 with an integer zero point in
  [0, 2^b-1] (zero must be exactly representable, so the range always contains 0).

Groups are contiguous chunks of ``group_size`` along K (the last one may be shorter); ``group_size=None`` or
``>= K`` means per output channel. Scales are rounded to float16 *before* the codes are computed, so
dequantizing the stored fp16 scales reproduces ``fake_quantize`` bit for bit (their magnitude is rounded
up, so the step never shrinks and the extreme never clips). An all-zero group gets the
smallest positive fp16 scale (2^-24) and dequantizes to exact zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.kernels.formats import (
    SUPPORTED_BITS,
    PackedWeight,
    codes_to_values,
    expand_groups,
    num_groups,
    pack_codes,
    symmetric_zero,
)

# Scales live in float16: the smallest positive subnormal and the largest finite value bound them.
MIN_SCALE = 2.0**-24
MAX_SCALE = float(torch.finfo(torch.float16).max)


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one weight: ``bits``, ``group_size`` (None = per output channel), ``symmetric``."""

    bits: int
    group_size: int | None = None
    symmetric: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in SUPPORTED_BITS:
            raise LowbitError(
                f"invalid bits {self.bits!r}; bits must be one of {','.join(map(str, SUPPORTED_BITS))}"
            )
        gs = self.group_size
        if gs is not None and (isinstance(gs, bool) or not isinstance(gs, int) or gs < 1):
            raise LowbitError(f"invalid group_size {gs!r}; expected a positive integer or None (per-channel)")
        if not isinstance(self.symmetric, bool):
            raise LowbitError(f"invalid symmetric {self.symmetric!r}; expected true or false")
        if self.bits == 1 and not self.symmetric:
            raise LowbitError("invalid spec: 1-bit asymmetric; 1-bit weights are symmetric only (sign * scale)")

    @property
    def maxq(self) -> int:
        """Largest code, 2^bits - 1."""
        return (1 << self.bits) - 1

    def group_size_for(self, k: int) -> int:
        """Effective group size for a weight with ``k`` input features (k itself when per-channel)."""
        return k if self.group_size is None or self.group_size >= k else self.group_size

    def num_groups(self, k: int) -> int:
        """G = ceil(k / effective group size)."""
        return num_groups(k, self.group_size_for(k))

    def short(self) -> str:
        """Short-string form, e.g. ``w4g64`` or ``w8a`` (asymmetric)."""
        g = "" if self.group_size is None else f"g{self.group_size}"
        return f"w{self.bits}{g}{'' if self.symmetric else 'a'}"

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}


def _as_matrix(w: torch.Tensor) -> torch.Tensor:
    """Any weight [N, ...] -> float32 [N, K] (conv kernels flattened over C*kh*kw)."""
    if w.dim() < 2:
        raise LowbitError(f"expected a weight with at least 2 dims [N, K, ...]; received shape {tuple(w.shape)}")
    return w.detach().reshape(w.shape[0], -1).to(torch.float32)  # [N, K]


def _group_view(w: torch.Tensor, gs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> zero-padded [N, G, gs] and the number of real columns per group [G]."""
    n, k = w.shape
    g = num_groups(k, gs)
    padded = torch.zeros(n, g * gs, dtype=w.dtype, device=w.device)
    padded[:, :k] = w
    counts = torch.full((g,), gs, dtype=torch.float32, device=w.device)
    counts[-1] = k - (g - 1) * gs
    return padded.view(n, g, gs), counts  # [N, G, gs], [G]


def round_scales(scales: torch.Tensor) -> torch.Tensor:
    """Round scales to float16 (returned as float32): magnitude clamped to [2^-24, 65504] and rounded *up*.

    Rounding the magnitude up never shrinks the step, so the group's extreme stays on the grid instead of
    clipping by up to 2^-11 relative. The sign is kept (zero counts as positive). Idempotent.
    """
    s = scales.to(torch.float32)
    sign = torch.where(s < 0, -1.0, 1.0)
    mag = s.abs().clamp(MIN_SCALE, MAX_SCALE)
    h = mag.to(torch.float16)
    h = torch.where(h.to(torch.float32) < mag, torch.nextafter(h, torch.full_like(h, MAX_SCALE)), h)
    return sign * h.to(torch.float32)


def compute_scales(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest grid for ``w`` [N, K]: scales (fp16-rounded float32 [N, G]) and zeros (float32 [N, G]).

    Symmetric specs return the implied constant zero point (2^(bits-1), 1/2 for 1-bit).
    """
    w = _as_matrix(w)
    groups, counts = _group_view(w, spec.group_size_for(w.shape[1]))  # [N, G, gs], [G]
    if spec.symmetric:
        if spec.bits == 1:
            scales = groups.abs().sum(dim=-1) / counts  # mean |w| over real columns
        else:
            idx = groups.abs().argmax(dim=-1, keepdim=True)  # [N, G, 1]
            extreme = groups.gather(-1, idx).squeeze(-1)  # [N, G], signed weight of largest magnitude
            scales = -extreme / (1 << (spec.bits - 1))
        scales = round_scales(scales)
        return scales, torch.full_like(scales, symmetric_zero(spec.bits))
    # Zero padding is harmless here: the range is widened to contain 0 anyway.
    lo = groups.amin(dim=-1).clamp(max=0.0)  # [N, G]
    hi = groups.amax(dim=-1).clamp(min=0.0)
    scales = round_scales((hi - lo) / spec.maxq)
    zeros = torch.round(-lo / scales).clamp(0, spec.maxq)
    return scales, zeros


def clip_ratios(grid: int, max_shrink: float) -> list[float]:
    """Range ratios 1, 1 - 1/grid, ... down to >= 1 - max_shrink (the candidates of ``search_scales``)."""
    if grid < 1 or not 0.0 <= max_shrink < 1.0:
        raise LowbitError(f"clip search needs grid >= 1 and max_shrink in [0, 1); got {grid}, {max_shrink}")
    return [1.0 - i / grid for i in range(int(max_shrink * grid + 1e-9) + 1)]


def search_scales(
    w: torch.Tensor,
    spec: QuantSpec,
    ratios: list[float],
    col_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, group) clipped grid of ``w`` [N, K]: the range ratio in ``ratios`` with the least error.

    Each candidate shrinks the round-to-nearest range (the signed extreme, or [min, max] when asymmetric)
    by the ratio; the error is sum_k c_k (w_k - Q(w_k))² with column weights c = ``col_weights`` ([K], or
    [N, K] for one set per output channel as in grouped convs; default 1). With c = diag of the input
    Hessian the search minimises each input's share of the output error (cross terms ignored). Ratio 1
    is RTN and ties keep the larger range, so the result is never worse than RTN under that metric. This
    is the mse grid of GPTQ's reference quantizer (Frantar et al. 2023, arXiv:2210.17323), weighted.
    Returns (scales, zeros) [N, G] like ``compute_scales``.
    """
    w = _as_matrix(w)
    n, k = w.shape
    if spec.bits == 1:  # the 1-bit scale is already the L2-optimal mean |w|
        return compute_scales(w, spec)
    gs = spec.group_size_for(k)
    groups, _ = _group_view(w, gs)  # [N, G, gs]
    c = torch.ones(1, k) if col_weights is None else col_weights.detach().to(torch.float32).reshape(-1, k)
    cg, _ = _group_view(c, gs)  # [1 or N, G, gs]; padded columns weigh 0
    base_s, base_z = compute_scales(w, spec)  # ratio 1 = RTN
    if spec.symmetric:
        idx = groups.abs().argmax(dim=-1, keepdim=True)
        extreme = groups.gather(-1, idx).squeeze(-1)  # [N, G] signed weight of largest magnitude
    else:
        lo = groups.amin(dim=-1).clamp(max=0.0)  # [N, G]
        hi = groups.amax(dim=-1).clamp(min=0.0)
    best_s, best_z, best_err = base_s, base_z, None
    for r in ratios:
        if r == 1.0:
            s, z = base_s, base_z
        elif spec.symmetric:
            s = round_scales(-r * extreme / (1 << (spec.bits - 1)))
            z = base_z
        else:
            s = round_scales((r * (hi - lo)) / spec.maxq)
            z = torch.round(-r * lo / s).clamp(0, spec.maxq)
        se, ze = s.unsqueeze(-1), z.unsqueeze(-1)  # [N, G, 1]
        q = (torch.round(groups / se) + ze).clamp(0, spec.maxq)
        err = ((q - ze) * se - groups).pow(2).mul(cg).sum(dim=-1)  # [N, G]
        if best_err is None:
            best_s, best_z, best_err = s, z, err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z


def round_to_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec
) -> torch.Tensor:
    """Elementwise (broadcasting) codes uint8 of ``w`` on the grid (scale, zero); for column-wise methods.

    ``scale`` is rounded to fp16 first (a no-op for ``compute_scales`` output); ``zero`` is ignored when
    symmetric. Pair with ``codes_to_weights`` to get exactly what the packed weight dequantizes to.
    """
    w = w.to(torch.float32)
    if spec.symmetric and spec.bits == 1:
        return (w >= 0).to(torch.uint8)
    s = round_scales(scale)
    if spec.symmetric:
        z: torch.Tensor | float = symmetric_zero(spec.bits)
    else:
        if zero is None:
            raise LowbitError("asymmetric quantization needs zero points; received zeros=None")
        z = torch.round(zero.to(torch.float32)).clamp(0, spec.maxq)
    return (torch.round(w / s) + z).clamp(0, spec.maxq).to(torch.uint8)


def codes_to_weights(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec
) -> torch.Tensor:
    """Elementwise (broadcasting) float32 weights of ``codes``: the packed format's dequantization."""
    s = round_scales(scale).to(torch.float16)
    z = None if spec.symmetric else torch.round(zero.to(torch.float32)).clamp(0, spec.maxq).to(torch.uint8)
    return codes_to_values(codes, s, z, spec.bits)


def quantize_codes(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, spec: QuantSpec
) -> torch.Tensor:
    """Codes uint8 [N, K] of ``w`` [N, K] for per-group ``scales``/``zeros`` [N, G]."""
    w = _as_matrix(w)
    k = w.shape[1]
    gs = spec.group_size_for(k)
    _check_grid(scales, zeros, w.shape[0], k, spec)
    s = expand_groups(scales, k, gs)  # [N, K]
    z = None if spec.symmetric else expand_groups(zeros, k, gs)  # [N, K]
    return round_to_codes(w, s, z, spec)


def dequantize_codes(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, spec: QuantSpec
) -> torch.Tensor:
    """Float32 [N, K] from codes [N, K] and per-group ``scales``/``zeros`` [N, G]."""
    n, k = codes.shape
    gs = spec.group_size_for(k)
    _check_grid(scales, zeros, n, k, spec)
    s = expand_groups(scales, k, gs)  # [N, K]
    z = None if spec.symmetric else expand_groups(zeros, k, gs)  # [N, K]
    return codes_to_weights(codes, s, z, spec)


def fake_quantize(
    w: torch.Tensor, spec: QuantSpec, scales: torch.Tensor | None = None, zeros: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize-dequantize ``w`` [N, K] -> float32 [N, K] (RTN grid unless scales/zeros are given)."""
    w = _as_matrix(w)
    if scales is None:
        scales, zeros = compute_scales(w, spec)
    return dequantize_codes(quantize_codes(w, scales, zeros, spec), scales, zeros, spec)


def packed_from_codes(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    spec: QuantSpec,
    shape: tuple[int, ...] | torch.Size,
) -> PackedWeight:
    """Store codes [N, K] + grid [N, G] as a ``PackedWeight`` of original weight ``shape``."""
    n, k = codes.shape
    if (shape[0], math.prod(shape[1:])) != (n, k):
        raise LowbitError(f"codes {tuple(codes.shape)} do not match weight shape {tuple(shape)}")
    _check_grid(scales, zeros, n, k, spec)
    return PackedWeight(
        qweight=pack_codes(codes.to(torch.uint8).contiguous(), spec.bits),
        scales=round_scales(scales).to(torch.float16).contiguous(),
        zeros=None if spec.symmetric else torch.round(zeros.float()).clamp(0, spec.maxq).to(torch.uint8),
        bits=spec.bits,
        group_size=spec.group_size_for(k),
        shape=tuple(shape),
    )


def to_packed(
    w: torch.Tensor, spec: QuantSpec, scales: torch.Tensor | None = None, zeros: torch.Tensor | None = None
) -> PackedWeight:
    """Quantize ``w`` ([N, K] or a conv kernel [N, C, kh, kw]) into a ``PackedWeight`` (RTN grid by default)."""
    shape = tuple(w.shape)
    w2 = _as_matrix(w)  # [N, K]
    if scales is None:
        scales, zeros = compute_scales(w2, spec)
    return packed_from_codes(quantize_codes(w2, scales, zeros, spec), scales, zeros, spec, shape)


def _check_grid(scales: torch.Tensor, zeros: torch.Tensor | None, n: int, k: int, spec: QuantSpec) -> None:
    g = spec.num_groups(k)
    if tuple(scales.shape) != (n, g):
        raise LowbitError(f"scales shape {tuple(scales.shape)} does not match [N, G] = [{n}, {g}] for {spec}")
    if not spec.symmetric and (zeros is None or tuple(zeros.shape) != (n, g)):
        got = None if zeros is None else tuple(zeros.shape)
        raise LowbitError(f"zeros shape {got} does not match [N, G] = [{n}, {g}] for asymmetric {spec}")
