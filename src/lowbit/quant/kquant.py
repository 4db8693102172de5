"""``kquant``: the ``minmax`` grid with its group steps and minima quantized to 6 bits per super-block (Q4_K).

Stored as the ``superblock`` layout (``lowbit.kernels.superblock``): 4.5 bits per weight at 4 bits, group 32,
instead of ``minmax``'s 5.0. The grid actually stored is chosen first, then the weights are rounded on it:

1. each group's float min/max grid (the minimum clamped to at most 0, as Q4_K stores it): step ``s``, ``-m``;
2. per super-block of 8 groups, ``d = max s / 63`` and ``dmin = max(-m) / 63`` (fp16), group codes
   ``sc = round(s / d)`` in 1..63 and ``mn = round(-m / dmin)`` in 0..63;
3. each group tries its codes' neighbours (``sc`` and ``mn`` each -1, 0, +1: 9 grids, the steps and minima as
   the format rebuilds them, fp16) and keeps the one whose re-rounded weights have the least squared error;
4. the codes are ``round((w - m) / s)`` on that final grid, clamped to 0..2^b - 1.

llama.cpp's Q4_K (``make_qkx2_quants``) also searches each group's float grid before quantizing the scales;
here the float grid is min/max, which is exact for weights that came from GGUF Q4_1 (the built-in SmolLM2): the
only error is then the 6-bit precision of the steps and minima, which step 3 spends where it costs least.
No calibration. Option ``super_groups``: groups per super-block (default 8, Q4_K's; 16 spends 4.44 bits per weight
at w4 g32 for ~10% more error on SmolLM2's layers).

Example:
    >>> import torch
    >>> from lowbit.quant.primitives import QuantSpec
    >>> packed = kquant_pack(torch.randn(4, 512), QuantSpec(4, 32))
    >>> packed.nbytes * 8 / (4 * 512)
    4.5
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from lowbit.errors import LowbitError
from lowbit.kernels.formats import num_groups
from lowbit.kernels.storage import find_format
from lowbit.kernels.superblock import GROUPS_PER_SUPER, SUB_MAX, SuperBlockPacked, num_super, super_index
from lowbit.quant.methods import METHODS, QuantContext, QuantResult, check_options
from lowbit.quant.minmax import check_spec
from lowbit.quant.primitives import MAX_SCALE, MIN_SCALE, QuantSpec, _as_matrix

MAX_SUPER_GROUPS = 64
_NEIGHBOURS = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1))


def _super_max(v: torch.Tensor, supers: int) -> torch.Tensor:
    """[N, G] -> [N, S]: the largest value of each super-block's groups."""
    n, g = v.shape
    idx = super_index(g, supers).expand(n, g)
    return torch.zeros(n, supers).scatter_reduce_(1, idx, v, "amax", include_self=False)


def kquant_pack(weight: torch.Tensor, spec: QuantSpec, super_groups: int = GROUPS_PER_SUPER) -> SuperBlockPacked:
    """Quantize ``weight`` ([N, K] or a conv kernel) on the super-block grid (the module docstring's steps), in
    super-blocks of ``super_groups`` groups (S = max(1, G // super_groups) per row)."""
    check_spec(spec, "kquant")
    shape = tuple(weight.shape)
    w = _as_matrix(weight)  # [N, K]
    n, k = w.shape
    gs = spec.group_size_for(k)
    g = num_groups(k, gs)
    supers = num_super(g, super_groups)
    real = torch.zeros(g * gs, dtype=torch.bool)
    real[:k] = True
    groups = F.pad(w, (0, g * gs - k)).view(n, g, gs)  # [N, G, gs]; padding masked out below
    mask = real.view(1, g, gs)
    lo = torch.where(mask, groups, torch.inf).amin(-1).clamp(max=0.0)  # [N, G], never above 0 (Q4_K)
    hi = torch.where(mask, groups, -torch.inf).amax(-1)
    step = ((hi - lo) / spec.maxq).clamp(MIN_SCALE, MAX_SCALE)  # [N, G]
    d = (_super_max(step, supers) / SUB_MAX).clamp(MIN_SCALE, MAX_SCALE).to(torch.float16)  # [N, S]
    dmin = (_super_max(-lo, supers) / SUB_MAX).clamp(0.0, MAX_SCALE).to(torch.float16)
    idx = super_index(g, supers)
    d_g, dmin_g = d.float()[:, idx], dmin.float()[:, idx]  # [N, G]
    sc0 = torch.round(step / d_g).clamp(1, SUB_MAX)
    mn0 = torch.where(dmin_g > 0, torch.round(-lo / dmin_g.clamp_min(MIN_SCALE)), 0.0).clamp(0, SUB_MAX)

    def fit(sc: torch.Tensor, mn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes [N, G, gs] and squared error [N, G] of the groups on the grid (sc, mn) as the format rebuilds it."""
        s = (d_g * sc).to(torch.float16).float().unsqueeze(-1)  # [N, G, 1]
        m = (-(dmin_g * mn)).to(torch.float16).float().unsqueeze(-1)
        q = torch.round((groups - m) / s.clamp_min(MIN_SCALE)).clamp(0, spec.maxq)
        err = torch.where(mask, q * s + m - groups, 0.0).pow(2).sum(-1)
        return q, err

    best_sc, best_mn = sc0, mn0
    best_q, best_err = fit(sc0, mn0)
    for a, b in _NEIGHBOURS[1:]:
        sc, mn = (sc0 + a).clamp(1, SUB_MAX), (mn0 + b).clamp(0, SUB_MAX)
        q, err = fit(sc, mn)
        better = err < best_err  # [N, G]
        best_sc, best_mn = torch.where(better, sc, best_sc), torch.where(better, mn, best_mn)
        best_q = torch.where(better.unsqueeze(-1), q, best_q)
        best_err = torch.where(better, err, best_err)
    codes = best_q.reshape(n, g * gs)[:, :k].to(torch.uint8)
    return SuperBlockPacked.from_codes(codes, best_sc.to(torch.uint8), best_mn.to(torch.uint8), d, dmin, spec.bits,
                                       gs, shape)


class KQuant:
    """Calibration-free min/max grid with 6-bit group steps and minima per super-block; option ``super_groups``
    (groups per super-block, 1..64, default 8: Q4_K's)."""

    needs_calibration = False

    def quantize_weight(self, weight: torch.Tensor, spec: QuantSpec, ctx: QuantContext,
                        options: dict[str, Any]) -> QuantResult:
        check_options("kquant", options, ("super_groups",))
        check_spec(spec, "kquant")
        per = options.get("super_groups", GROUPS_PER_SUPER)
        if isinstance(per, bool) or not isinstance(per, int) or not 1 <= per <= MAX_SUPER_GROUPS:
            raise LowbitError(f"kquant option super_groups: received {per!r}; accepted: an integer in "
                              f"1..{MAX_SUPER_GROUPS} (groups per super-block, default {GROUPS_PER_SUPER})")
        kind = find_format("superblock", spec.bits).kind_for(ctx.kind, "kquant")
        return QuantResult(packed=kquant_pack(weight, spec, per), kind=kind)


METHODS.register("kquant")(KQuant())
