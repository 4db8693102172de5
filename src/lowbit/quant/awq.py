"""AWQ: activation-aware per-input-channel scaling before round-to-nearest weight quantization.

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han (2023), "AWQ: Activation-aware Weight Quantization
for LLM Compression and Acceleration", arXiv:2306.00978.

Input channels with large activations matter most for the output, so their weight columns are scaled up
by s = s_xᵅ (s_x = mean |x| per input channel, normalised so that max·min = 1) before quantization, which
gives them finer effective steps: the layer computes (X / s) · Q(W·diag(s))ᵀ ≈ X Wᵀ. α is grid-searched in
[0, 1] to minimise that output error on the calibration rows (α = 0 is plain RTN, so the search never picks
something worse than RTN on the calibration data). An optional clipping search then shrinks each
(row, group) range, picking the ratio with the least output error.

The scale is returned as ``QuantResult.input_scale`` (the quantized layer divides its input by it). Folding
1/s into a preceding LayerNorm / BatchNorm / Linear that feeds only this layer would save that division,
but is not done here: it needs graph knowledge the per-weight method interface does not have.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.quant.methods import METHODS, QuantContext, QuantResult, check_options
from lowbit.quant.primitives import (
    QuantSpec,
    compute_scales,
    fake_quantize,
    packed_from_codes,
    quantize_codes,
    to_packed,
)

_OPTIONS = {"n_grid", "alpha", "clip", "clip_grid", "max_shrink", "max_rows"}


@dataclass
class AWQOutput:
    """What :func:`awq_search` returns."""

    input_scale: torch.Tensor  # float32 [K], fp16-representable; the layer divides its input by it
    alpha: float  # chosen exponent
    scaled_weight: torch.Tensor  # float32 [N, K] = W · diag(input_scale)
    scales: torch.Tensor  # float32 [N, G] quantization scales of scaled_weight (after clipping)
    zeros: torch.Tensor  # float32 [N, G]
    errors: dict[float, float]  # alpha -> output error ||X Wᵀ - (X/s) Q(W s)ᵀ||² (search metric)


def _output_error(diff: torch.Tensor, x: torch.Tensor | None, h: torch.Tensor | None) -> float:
    """||X diffᵀ||² via the rows X [S, K] or the Gram matrix H = XᵀX [K, K], whichever is cheaper."""
    if h is not None and (x is None or x.shape[0] > h.shape[0]):
        return float(((diff @ h) * diff).sum())  # tr(D H Dᵀ)
    assert x is not None
    return float((x @ diff.T).pow(2).sum())


def _grouped_errors(diff: torch.Tensor, h: torch.Tensor, group: int) -> torch.Tensor:
    """Per (row, group) output error d_g H_gg d_gᵀ [N, G] (block-diagonal part of H; exact when G = 1)."""
    n, k = diff.shape
    n_groups = -(-k // group)
    pad = n_groups * group - k
    if pad:  # zero-pad the short last group; padded entries contribute nothing
        diff = torch.nn.functional.pad(diff, (0, pad))
        h = torch.nn.functional.pad(h, (0, pad, 0, pad))
    d = diff.reshape(n, n_groups, group)  # [N, G, gs]
    idx = torch.arange(n_groups)
    hb = h.reshape(n_groups, group, n_groups, group)[idx, :, idx, :]  # [G, gs, gs] diagonal blocks
    return torch.einsum("ngi,gij,ngj->ng", d, hb, d)


def _clip_search(
    w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, ratios: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, group), the range-shrink ratio with the least output error -> (scales, zeros) [N, G]."""
    k = w.shape[1]
    group = spec.group_size if spec.group_size is not None and spec.group_size < k else k
    best_err = best_s = best_z = None
    for r in ratios:
        # Scales of r·W are those of the range shrunk by r; codes of W itself then clip at that range.
        s, z = compute_scales(w * r, spec)  # [N, G]
        err = _grouped_errors(w - fake_quantize(w, spec, s, z), h, group)  # [N, G]
        if best_err is None:
            best_err, best_s, best_z = err, s.clone(), z.clone()
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            best_z = torch.where(better, z, best_z)
    assert best_s is not None and best_z is not None
    return best_s, best_z


def awq_search(
    weight: torch.Tensor,
    spec: QuantSpec,
    inputs: torch.Tensor | None,
    hessian: torch.Tensor | None = None,
    *,
    n_grid: int = 20,
    alpha: float | None = None,
    clip: bool = True,
    clip_grid: int = 20,
    max_shrink: float = 0.5,
    max_rows: int = 4096,
    act_abs_mean: torch.Tensor | None = None,
) -> AWQOutput:
    """Search the AWQ input-channel scale (and clipping) for ``weight`` [N, K].

    ``inputs`` [S, K] are calibration rows (≤ ``max_rows`` are used); ``hessian`` (any positive multiple of
    XᵀX over all calibration rows) makes error evaluation cheaper and is required for the clip search when
    no rows are given. ``alpha`` fixes the exponent instead of searching ``n_grid`` points in [0, 1].
    ``act_abs_mean`` [K] (mean |x| over all calibration rows) overrides the estimate from ``inputs``.
    """
    if weight.dim() != 2:
        raise LowbitError(f"AWQ expects a 2-D weight [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    w = weight.detach().to(torch.float32)
    x = None
    if inputs is not None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float32)  # [S, K]
        if x.shape[1] != k:
            raise LowbitError(f"AWQ: calibration rows have {x.shape[1]} features, weight expects K={k}")
        if x.shape[0] > max_rows:  # evenly spaced subsample keeps it deterministic
            x = x[torch.linspace(0, x.shape[0] - 1, max_rows).long()]
    h = None
    if hessian is not None:
        if hessian.shape != (k, k):
            raise LowbitError(f"AWQ: Hessian shape {tuple(hessian.shape)} does not match weight K={k}")
        h = hessian.detach().to(torch.float32)
    if x is None and h is None:
        raise LowbitError("method 'awq' needs calibration data (input rows or a Hessian); none was given")

    # Activation magnitude per input channel; the RMS from diag(H) stands in when only H is known.
    if act_abs_mean is not None:
        s_x = act_abs_mean.detach().to(torch.float32).reshape(k)
    elif x is not None:
        s_x = x.abs().mean(dim=0)  # [K]
    else:
        s_x = torch.diagonal(h).clamp(min=0).sqrt()  # type: ignore[arg-type]
    s_x = s_x.clamp(min=1e-8)

    alphas = [float(alpha)] if alpha is not None else torch.linspace(0.0, 1.0, max(n_grid, 1)).tolist()
    errors: dict[float, float] = {}
    best: tuple[float, float, torch.Tensor] | None = None
    for a in alphas:
        s = s_x.pow(a)
        s = s / (s.max() * s.min()).sqrt()  # geometric centring keeps W·s in a similar range
        s = s.clamp(min=1e-4, max=1e4).half().float()  # fp16-exact, so a stored fp16 scale is lossless
        q_eff = fake_quantize(w * s, spec) / s  # effective dequantized weight in the input's units
        err = _output_error(w - q_eff, x, h)
        errors[a] = err
        if best is None or err < best[1]:
            best = (a, err, s)
    assert best is not None
    chosen_alpha, _, s = best
    ws = w * s  # [N, K]

    if clip and max_shrink > 0:
        h_unscaled = h if h is not None else x.T @ x  # type: ignore[union-attr]
        h_s = h_unscaled / (s[:, None] * s[None, :])  # Gram matrix of the scaled inputs X / s
        n_ratios = max(1, int(round(max_shrink * clip_grid)))
        ratios = [1.0 - i / clip_grid for i in range(n_ratios)]
        scales, zeros = _clip_search(ws, h_s, spec, ratios)
    else:
        scales, zeros = compute_scales(ws, spec)
    return AWQOutput(input_scale=s, alpha=chosen_alpha, scaled_weight=ws, scales=scales, zeros=zeros,
                     errors=errors)


def _parse_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    opts = dict(options or {})
    check_options("awq", opts, _OPTIONS)
    out: dict[str, Any] = {}
    try:
        for key in ("n_grid", "clip_grid", "max_rows"):
            if key in opts:
                out[key] = int(opts[key])
        for key in ("max_shrink",):
            if key in opts:
                out[key] = float(opts[key])
        if opts.get("alpha") is not None:
            out["alpha"] = float(opts["alpha"])
    except (TypeError, ValueError) as exc:
        raise LowbitError(f"awq options: {exc}") from exc
    if "clip" in opts:
        if not isinstance(opts["clip"], bool):
            raise LowbitError(f"awq option 'clip' must be true/false, got {opts['clip']!r}")
        out["clip"] = opts["clip"]
    if "alpha" in out and not 0.0 <= out["alpha"] <= 1.0:
        raise LowbitError(f"awq option 'alpha' must be in [0, 1], got {out['alpha']}")
    if not 0.0 <= out.get("max_shrink", 0.5) < 1.0:
        raise LowbitError(f"awq option 'max_shrink' must be in [0, 1), got {out['max_shrink']}")
    return out


class AWQMethod:
    """The ``awq`` entry of :data:`lowbit.quant.methods.METHODS`.

    Options: ``n_grid`` (20), ``alpha`` (None = search), ``clip`` (True), ``clip_grid`` (20),
    ``max_shrink`` (0.5), ``max_rows`` (4096).
    """

    name = "awq"
    needs_calibration = True

    def quantize_weight(
        self,
        weight: torch.Tensor,
        spec: QuantSpec,
        ctx: QuantContext | None,
        options: Mapping[str, Any] | None = None,
    ) -> QuantResult:
        """AWQ-quantize ``weight`` [N, K]; the chosen per-input-channel scale is ``input_scale``."""
        opts = _parse_options(options)
        if ctx is not None and ctx.extra.get("n_rows") == 0:  # layer never ran on calibration data
            return QuantResult(packed=to_packed(weight, spec), input_scale=None)
        inputs = None if ctx is None else ctx.inputs
        hessian = None if ctx is None else ctx.hessian
        w2 = weight.detach().reshape(weight.shape[0], -1)  # [N, K]
        act = None if ctx is None else ctx.extra.get("act_abs_mean")
        out = awq_search(w2, spec, inputs, hessian, act_abs_mean=act, **opts)
        codes = quantize_codes(out.scaled_weight, out.scales, out.zeros, spec)  # [N, K]
        packed = packed_from_codes(codes, out.scales, out.zeros, spec, tuple(weight.shape))
        identity = bool((out.input_scale == 1).all())  # α = 0: nothing to divide by
        return QuantResult(packed=packed, input_scale=None if identity else out.input_scale)


AWQ = METHODS.register("awq")(AWQMethod())
