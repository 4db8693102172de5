"""SmoothQuant: migrate activation outliers into the weights before W8A8 / W4A8 quantization.

Xiao, Lin, Seznec, Wu, Demouth, Han (2023), "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models", arXiv:2211.10438.

Per input channel j, ``s_j = max|X_j|^α / max|W_j|^(1-α)``; the layer then computes ``(X / s) · (W·diag(s))ᵀ``,
the same function in float, whose input has its outlier channels divided down (easy to quantize per tensor) and
whose weight columns are scaled up in their place. α is searched per layer on the calibration rows: each
candidate's weight is quantized (RTN on the rule's grid) and its input rounded to the rule's activation grid
(a static per-tensor scale from the calibrated range of X / s), and the α with the least output error
``||X Wᵀ - Q_a(X / s) · Q_w(W·diag(s))ᵀ||²`` wins; ``α = None`` (no migration, s = 1) is always a candidate,
so the search never does worse than plain quantization on the calibration rows.

The final weight is quantized by ``base`` (``rtn`` or ``gptq``: GPTQ on ``W·diag(s)`` with the Hessian of
``X / s``). ``s`` is returned as the layer's ``input_scale`` (fp16-representable, like AWQ's); the static
activation scales are calibrated afterwards on ``X / s`` (lowbit.quant.act_calibration). Folding ``1/s`` into
the LayerNorm before the layer would save the division, but the per-weight interface does not see the graph:
it is kept as an input scale.

Options: ``alpha`` (a fixed α, no search), ``alphas`` (the grid, default 0.3..0.9 by 0.1), ``base``.

Measured caveat: it is meant for transformer linears. On EfficientNet's pointwise convs (lit-fashion's image tower)
W8A8 with SmoothQuant scored far worse than plain min-max (image-embedding cosine 0.90 vs 0.98): channels nearly
dead on the calibration data get large 1/s and wider ranges later; use min-max or percentile scales there.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.kernels import act_quant
from lowbit.kernels.act_quant import ActSpec
from lowbit.quant.methods import METHODS, QuantContext, QuantResult, check_options, get_method
from lowbit.quant.primitives import QuantSpec, fake_quantize

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
BASES = ("rtn", "gptq")
MIN_SCALE = 1e-4


def smoothing_scale(act_max: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^α / max|W_j|^(1-α)`` [K] (max|X_j| at least a tenth of the median channel's), clamped
    away from 0 and rounded to fp16 values."""
    w_max = weight.abs().amax(dim=0).clamp_min(1e-8)
    # a channel (nearly) dead on the calibration data must not get a tiny s: an input it rarely sees would then be
    # multiplied by up to 1/s and blow the per-tensor range (seen on EfficientNet's ReLU6 channels)
    floor = max(1e-5, 0.1 * float(act_max.median()))
    s = act_max.clamp_min(floor).pow(alpha) / w_max.pow(1.0 - alpha)
    s = s.clamp(MIN_SCALE, 1.0 / MIN_SCALE)
    return s.half().float()


def output_error(x: torch.Tensor, weight: torch.Tensor, s: torch.Tensor | None, spec: QuantSpec,
                 act: ActSpec | None, act_max: torch.Tensor) -> float:
    """``||X Wᵀ - Q_a(X / s) Q_w(W s)ᵀ||²`` on the rows ``x`` [S, K] (static per-tensor activation range from
    the calibrated ``act_max`` [K]; None: the rows' own)."""
    xs, ws, top = (x, weight, act_max) if s is None else (x / s, weight * s, act_max / s)
    wq = fake_quantize(ws, spec)
    if act is not None:
        a = act_quant.ActSpec(act.bits, symmetric=True)  # the search scores the symmetric per-tensor grid
        scale = (top.max() / a.qmax).reshape(1)
        xs = act_quant.fake_quant(xs, a, scale)
    return float((x @ weight.T - xs @ wq.T).pow(2).sum())


class SmoothQuant:
    """SmoothQuant (see the module docstring); needs calibration rows and per-channel activation maxima."""

    needs_calibration = True

    def quantize_weight(
        self, weight: torch.Tensor, spec: QuantSpec, ctx: QuantContext, options: dict[str, Any]
    ) -> QuantResult:
        check_options("smoothquant", options, ("alpha", "alphas", "base"))
        base = options.get("base", "rtn")
        if base not in BASES:
            raise LowbitError(f"smoothquant option base={base!r}; accepted: {', '.join(BASES)}")
        alphas = options.get("alphas", ALPHAS)
        if "alpha" in options:
            alphas = [options["alpha"]]
        if not isinstance(alphas, (list, tuple)) or not alphas or not all(
                isinstance(a, (int, float)) and not isinstance(a, bool) and 0.0 <= a <= 1.0 for a in alphas):
            raise LowbitError(f"smoothquant alpha(s) {alphas!r}; accepted: numbers in [0, 1]")
        act_max, x = ctx.extra.get("act_abs_max"), ctx.inputs
        if act_max is None or x is None or x.shape[0] == 0:  # the layer saw no calibration input: plain base
            return get_method(base).quantize_weight(weight, spec, ctx, {})
        act_max = act_max.to(torch.float32)
        act = ctx.extra.get("act_spec")
        best = (output_error(x, weight, None, spec, act, act_max), None)
        for alpha in alphas:
            s = smoothing_scale(act_max, weight, float(alpha))
            err = output_error(x, weight, s, spec, act, act_max)
            if err < best[0]:
                best = (err, s)
        s = best[1]
        ctx.extra["smoothquant_alpha"] = None if s is None else next(
            float(a) for a in alphas if torch.equal(smoothing_scale(act_max, weight, float(a)), s))
        if s is None:
            return get_method(base).quantize_weight(weight, spec, ctx, {})
        inner = replace(ctx, inputs=x / s, extra=dict(ctx.extra))
        if ctx.hessian is not None:  # H of X / s = diag(1/s) H diag(1/s)
            inv = (1.0 / s).to(ctx.hessian.dtype)
            inner.hessian = ctx.hessian * inv[:, None] * inv[None, :]
        result = get_method(base).quantize_weight(weight * s, spec, inner, {})
        if result.input_scale is not None:
            raise LowbitError(f"smoothquant base {base!r} returned its own input scale")
        return replace(result, input_scale=s)


METHODS.register("smoothquant")(SmoothQuant())
