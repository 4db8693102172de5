"""GPTQ: second-order, error-compensating weight quantization of one [N, K] weight.

Frantar, Ashkboos, Hoefler, Alistarh (2022), "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", arXiv:2210.17323.

Columns of W are quantized one at a time (in order, or by descending Hessian diagonal with ``act_order``);
after each column the quantization error is spread over the not-yet-quantized columns through the
Cholesky factor of the inverse Hessian H = 2/S XᵀX of the layer's calibration inputs, so the layer output
XWᵀ is preserved much better than by round-to-nearest. Updates are applied lazily per block of columns
(``block_size``) as in the paper.

Scales and codes come from :mod:`lowbit.quant.primitives`, so the packed weight dequantizes to exactly the
matrix GPTQ produced. With ``act_order`` and groups, all group scales are computed up front from the
unpermuted weight on the ORIGINAL group indices ("static groups"), so the result is stored in the standard
packed format with no permutation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.quant.methods import METHODS, QuantContext, QuantResult, check_options
from lowbit.quant.primitives import (
    QuantSpec,
    clip_ratios,
    codes_to_weights,
    compute_scales,
    packed_from_codes,
    round_scales,
    round_to_codes,
    search_scales,
    to_packed,
)

_OPTIONS = {"percdamp", "block_size", "act_order", "static_groups", "clip_search", "clip_grid", "max_shrink"}
_MAX_DAMP_RETRIES = 6  # each retry multiplies the dampening by 10 when Cholesky fails


@dataclass
class GPTQOutput:
    """What :func:`gptq_quantize` returns: integer codes, their scales/zeros and the dequantized weight."""

    codes: torch.Tensor  # uint8 [N, K], original column order
    scales: torch.Tensor  # float32 [N, G] (fp16-representable)
    zeros: torch.Tensor  # float32 [N, G]
    weight: torch.Tensor  # float32 [N, K] = dequantize(codes), the matrix GPTQ settled on
    perm: torch.Tensor | None  # column order used with act_order, else None


def hessian_from_inputs(inputs: torch.Tensor) -> torch.Tensor:
    """H = 2/S XᵀX (float64 [K, K]) from calibration rows X [S, K]."""
    x = inputs.reshape(-1, inputs.shape[-1]).to(torch.float64)  # [S, K]
    return (2.0 / max(x.shape[0], 1)) * (x.T @ x)


def _inverse_hessian_cholesky(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = percdamp * mean(diag H), in float64.

    If H is too ill-conditioned for the factorisation (few calibration rows, float error), λ grows 10x per
    retry rather than failing the whole model.
    """
    k = hessian.shape[0]
    mean_diag = torch.diagonal(hessian).mean().item()
    unit = mean_diag if mean_diag > 0 else 1.0
    damp = percdamp * unit
    eye = torch.eye(k, dtype=hessian.dtype)
    for _ in range(_MAX_DAMP_RETRIES):
        lower, info = torch.linalg.cholesky_ex(hessian + damp * eye)
        if int(info) == 0:
            # cholesky_solve rather than cholesky_inverse: the latter stalls for seconds on a busy 2-core box
            hinv = torch.cholesky_solve(eye, lower)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper
        damp = max(damp * 10.0, 1e-4 * unit)  # also escapes percdamp = 0
    raise LowbitError(
        f"GPTQ: the calibration Hessian ({k}x{k}) is not positive definite even with dampening {damp:.3g}; "
        "use more calibration samples or a larger 'percdamp'"
    )


@contextmanager
def _single_thread() -> Iterator[None]:
    """Run the column loop on one thread: its ops touch a few thousand floats each, so intra-op threading
    costs more in fork/join than it saves (measured 4x slower with 2 threads on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Grid:
    """The fp16-exact (scale, zero) rows [G, N] of the layer and the elementwise rounding on them.

    ``quantize`` is ``round_to_codes`` + ``codes_to_weights`` of :mod:`lowbit.quant.primitives` written out
    for stored (already rounded) scales: the same float32 operations, so packing reproduces the values bit
    for bit, without re-rounding the scales twice per column (which dominated the column loop's time).
    """

    def __init__(self, spec: QuantSpec, scales_t: torch.Tensor, zeros_t: torch.Tensor) -> None:
        self.spec = spec
        self.scales_t, self.zeros_t = scales_t, zeros_t  # [G, N] each

    def set_group(self, g: int, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        """Store a group's grid (scales [N], zeros [N]) after rounding it like ``packed_from_codes``."""
        self.scales_t[g] = round_scales(scales)
        if self.spec.symmetric:
            self.zeros_t[g] = zeros
        else:
            self.zeros_t[g] = torch.round(zeros).clamp(0, self.spec.maxq)

    def quantize(self, w: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (uint8 [N]) and their dequantized values (float32 [N]) of one column ``w`` [N] in group g."""
        s, z = self.scales_t[g], self.zeros_t[g]
        if self.spec.bits == 1:
            c = round_to_codes(w, s, z, self.spec)
            return c, codes_to_weights(c, s, z, self.spec)
        c = (torch.round(w / s) + z).clamp_(0, self.spec.maxq)  # float codes
        return c.to(torch.uint8), (c - z) * s


def _quantize_block(
    w1: torch.Tensor,
    err1: torch.Tensor,
    hinv1: torch.Tensor,
    i1: int,
    order: list[int] | None,
    gs: int | None,
    new_group: Callable[[int, torch.Tensor], None] | None,
    grid: _Grid,
    codes_t: torch.Tensor,
    q_t: torch.Tensor,
) -> None:
    """Quantize the block's columns w1 [B, N] (transposed) in place, filling err1 [B, N] and codes/values.

    ``new_group(g, cols)`` (dynamic groups) sets group g's grid from its not-yet-quantized columns [gs, N].
    """
    for i in range(w1.shape[0]):
        col = i1 + i
        orig = order[col] if order is not None else col
        g = 0 if gs is None else orig // gs
        if new_group is not None and col % gs == 0:  # type: ignore[operator]
            new_group(g, w1[i : i + gs])
        c, q = grid.quantize(w1[i], g)  # [N] uint8, [N] float32
        codes_t[col] = c
        q_t[col] = q
        e = (w1[i] - q) / hinv1[i, i]  # [N]
        # why: compensate the rounding error on the remaining columns of this block (OBS update)
        w1[i + 1 :].addr_(hinv1[i, i + 1 :], e, alpha=-1.0)
        err1[i] = e


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    *,
    percdamp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    clip_search: bool = False,
    clip_grid: int = 20,
    max_shrink: float = 0.5,
) -> GPTQOutput:
    """Quantize ``weight`` [N, K] with GPTQ given the layer Hessian [K, K] (any positive multiple of XᵀX).

    ``act_order`` visits columns by descending diag(H); ``static_groups`` (implied by ``act_order`` when
    grouped) computes every group's scales up front from the unpermuted weight instead of when the group
    starts. ``clip_search`` picks each (row, group) range among ``clip_grid``-step shrink ratios down to
    ``1 - max_shrink`` by the diag(H)-weighted rounding error (``primitives.search_scales``) instead of
    taking the plain absmax/min-max range.
    """
    if weight.dim() != 2:
        raise LowbitError(f"GPTQ expects a 2-D weight [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise LowbitError(f"GPTQ: Hessian shape {tuple(hessian.shape)} does not match weight K={k}")
    if not bool(torch.isfinite(hessian).all()):
        raise LowbitError("GPTQ: the calibration Hessian has non-finite entries (NaN/inf activations?)")
    if block_size < 1 or percdamp < 0:
        raise LowbitError(f"GPTQ: need block_size >= 1 and percdamp >= 0, got {block_size}, {percdamp}")

    w = weight.detach().to(torch.float32).clone()  # [N, K]
    h = hessian.detach().to(torch.float64).clone()  # [K, K]

    # Inputs that were always zero carry no information: pin their Hessian diagonal and drop the weight.
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    diag = torch.diagonal(h).to(torch.float32).clone()  # [K] per-input weight of the clip search
    ratios = clip_ratios(clip_grid, max_shrink) if clip_search else [1.0]

    def grid_of(cols: torch.Tensor, col_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scales, zeros) [N, G] of weight columns [N, <=K]: RTN range, or the searched clip."""
        if not clip_search:
            return compute_scales(cols, spec)
        return search_scales(cols, spec, ratios, col_weights)

    gs = spec.group_size if spec.group_size is not None and spec.group_size < k else None
    n_groups = spec.num_groups(k)
    grid = _Grid(spec, torch.empty(n_groups, n), torch.empty(n_groups, n))  # [G, N] each
    dynamic_groups = gs is not None and not (static_groups or act_order)
    if not dynamic_groups:  # per-channel, or static groups: every grid from the weight before any update
        s_all, z_all = grid_of(w, diag)  # [N, G]
        for g in range(n_groups):
            grid.set_group(g, s_all[:, g], z_all[:, g])

    new_group = None
    if dynamic_groups:
        assert gs is not None

        def new_group(g: int, cols_t: torch.Tensor) -> None:
            # a slice no wider than the group size is one group -> [N, 1]
            s_g, z_g = grid_of(cols_t.T, diag[g * gs : g * gs + cols_t.shape[0]])
            grid.set_group(g, s_g[:, 0], z_g[:, 0])

        # A dynamic group must lie inside one block so its scales see all earlier in-block updates.
        block_size = max(gs, block_size // gs * gs)

    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w = w[:, perm]
        h = h[perm][:, perm]
    hinv = _inverse_hessian_cholesky(h, percdamp).to(torch.float32)  # upper [K, K]
    order = perm.tolist() if perm is not None else None

    # Work on transposed copies so each column (and each remaining-column update) is a contiguous row.
    wt = w.T.contiguous()  # [K, N]
    codes_t = torch.empty(k, n, dtype=torch.uint8)  # in visiting order; un-permuted at the end
    q_t = torch.empty(k, n, dtype=torch.float32)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wt[i1:i2].clone()  # [B, N]
        err1 = torch.empty_like(w1)  # [B, N]
        hinv1 = hinv[i1:i2, i1:i2]  # [B, B]
        with _single_thread():
            _quantize_block(w1, err1, hinv1, i1, order, gs, new_group, grid, codes_t, q_t)
        # lazy batch update: the columns after this block receive the whole block's error at once
        wt[i2:] -= hinv[i1:i2, i2:].T @ err1  # [K-i2, B] @ [B, N]

    codes, q_all = codes_t.T, q_t.T  # [N, K]
    scales, zeros = grid.scales_t.T.contiguous(), grid.zeros_t.T.contiguous()  # [N, G]
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        q_all = q_all[:, inv]
    codes, q_all = codes.contiguous(), q_all.contiguous()
    return GPTQOutput(codes=codes, scales=scales, zeros=zeros, weight=q_all, perm=perm)


def gptq_quantize_grouped(
    weight: torch.Tensor,
    hessians: torch.Tensor,
    spec: QuantSpec,
    *,
    percdamp: float = 0.01,
    clip_search: bool = False,
    clip_grid: int = 20,
    max_shrink: float = 0.5,
) -> GPTQOutput:
    """GPTQ for a grouped conv (e.g. depthwise): weight [N, Kg], one Hessian per conv group [G, Kg, Kg].

    Output channel n belongs to conv group n // (N / G) and only sees that group's inputs, so each group is
    its own small GPTQ problem; all are solved at once, column by column (Kg = C/G*kh*kw is small: 9 or 25
    for depthwise, so no lazy blocks). Grids are static (from the weight before any update). ``act_order``
    does not apply (the column order would differ per group).
    """
    if weight.dim() != 2 or hessians.dim() != 3:
        raise LowbitError(f"grouped GPTQ expects weight [N, Kg] and Hessians [G, Kg, Kg]; "
                          f"got {tuple(weight.shape)} and {tuple(hessians.shape)}")
    n, kg = weight.shape
    n_conv_groups = hessians.shape[0]
    if hessians.shape[1:] != (kg, kg) or n % n_conv_groups:
        raise LowbitError(f"grouped GPTQ: Hessians {tuple(hessians.shape)} do not fit weight {tuple(weight.shape)}")
    if not bool(torch.isfinite(hessians).all()):
        raise LowbitError("GPTQ: the calibration Hessian has non-finite entries (NaN/inf activations?)")
    per = n // n_conv_groups  # output channels per conv group
    w = weight.detach().to(torch.float32).clone().reshape(n_conv_groups, per, kg)  # [G, P, Kg]
    h = hessians.detach().to(torch.float64).clone()  # [G, Kg, Kg]
    diag = torch.diagonal(h, dim1=1, dim2=2)  # [G, Kg] (a view: the dead-input fix below writes through)
    dead = diag == 0
    diag[dead] = 1.0
    w[dead.unsqueeze(1).expand_as(w)] = 0.0
    row_diag = diag.to(torch.float32).repeat_interleave(per, dim=0)  # [N, Kg]

    flat = w.reshape(n, kg)
    ratios = clip_ratios(clip_grid, max_shrink) if clip_search else [1.0]
    scales, zeros = search_scales(flat, spec, ratios, row_diag) if clip_search else compute_scales(flat, spec)
    grid = _Grid(spec, torch.empty(scales.shape[1], n), torch.empty(scales.shape[1], n))  # [Gq, N]
    for g in range(scales.shape[1]):
        grid.set_group(g, scales[:, g], zeros[:, g])
    gs = spec.group_size_for(kg)

    eye = torch.eye(kg, dtype=torch.float64)
    damp = percdamp * diag.mean(dim=1).clamp(min=1e-12)  # [G]
    for _ in range(_MAX_DAMP_RETRIES):
        lower, info = torch.linalg.cholesky_ex(h + damp[:, None, None] * eye)
        if int(info.max()) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_solve(eye.expand_as(h), lower), upper=True)
            if int(info.max()) == 0:
                break
        damp = torch.where(info > 0, torch.maximum(damp * 10.0, 1e-4 * diag.mean(dim=1)), damp)
    else:
        raise LowbitError("GPTQ: a grouped conv's calibration Hessian is not positive definite even with "
                          "dampening; use more calibration samples or a larger 'percdamp'")
    hinv = upper.to(torch.float32).repeat_interleave(per, dim=0)  # [N, Kg, Kg] upper factors, one per row

    codes = torch.empty(n, kg, dtype=torch.uint8)
    q_all = torch.empty(n, kg, dtype=torch.float32)
    for i in range(kg):
        c, q = grid.quantize(flat[:, i], i // gs)  # [N]
        codes[:, i], q_all[:, i] = c, q
        e = (flat[:, i] - q) / hinv[:, i, i]  # [N]
        flat[:, i + 1 :] -= e[:, None] * hinv[:, i, i + 1 :]  # OBS update inside each row's own group
    return GPTQOutput(codes=codes, scales=grid.scales_t.T.contiguous(), zeros=grid.zeros_t.T.contiguous(),
                      weight=q_all, perm=None)


def _parse_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    opts = dict(options or {})
    check_options("gptq", opts, _OPTIONS)
    out: dict[str, Any] = {}
    for key, kind in (("percdamp", float), ("block_size", int), ("clip_grid", int), ("max_shrink", float)):
        if key in opts:
            val = opts[key]
            if isinstance(val, bool) or not isinstance(val, (int, float)) or (kind is int and val != int(val)):
                raise LowbitError(f"gptq option {key!r} must be a {kind.__name__}, got {val!r}")
            out[key] = kind(val)
    for key in ("act_order", "static_groups", "clip_search"):
        if key in opts:
            if not isinstance(opts[key], bool):
                raise LowbitError(f"gptq option {key!r} must be true/false, got {opts[key]!r}")
            out[key] = opts[key]
    return out


class GPTQMethod:
    """The ``gptq`` entry of :data:`lowbit.quant.methods.METHODS`.

    Options: ``percdamp`` (0.01), ``block_size`` (128), ``act_order`` (False), ``static_groups`` (False),
    ``clip_search`` (False), ``clip_grid`` (20), ``max_shrink`` (0.5).
    """

    name = "gptq"
    needs_calibration = True

    def quantize_weight(
        self,
        weight: torch.Tensor,
        spec: QuantSpec,
        ctx: QuantContext | None,
        options: Mapping[str, Any] | None = None,
    ) -> QuantResult:
        """GPTQ-quantize ``weight`` [N, K] using the Hessian (or inputs) in ``ctx``."""
        opts = _parse_options(options)
        if ctx is not None and ctx.extra.get("n_rows") == 0:  # layer never ran on calibration data
            return QuantResult(packed=to_packed(weight, spec), input_scale=None)
        w2 = weight.detach().reshape(weight.shape[0], -1)  # [N, K]
        grouped = None if ctx is None else ctx.extra.get("group_hessians")
        if grouped is not None:  # grouped / depthwise conv: one Hessian per conv group
            keep = {key: opts[key] for key in ("percdamp", "clip_search", "clip_grid", "max_shrink") if key in opts}
            out = gptq_quantize_grouped(w2, grouped, spec, **keep)
            packed = packed_from_codes(out.codes, out.scales, out.zeros, spec, tuple(weight.shape))
            return QuantResult(packed=packed, input_scale=None)
        hessian = None if ctx is None else ctx.hessian
        if hessian is None and ctx is not None and ctx.inputs is not None:
            hessian = hessian_from_inputs(ctx.inputs)
        if hessian is None:
            raise LowbitError("method 'gptq' needs calibration data (a Hessian or input rows); none was given")
        out = gptq_quantize(w2, hessian, spec, **opts)
        packed = packed_from_codes(out.codes, out.scales, out.zeros, spec, tuple(weight.shape))
        return QuantResult(packed=packed, input_scale=None)


GPTQ = METHODS.register("gptq")(GPTQMethod())
