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

Where the graph allows, ``1/s`` is folded into the norm before the layers (``prepare_model``, through
lowbit.quant.norm_fold): the linears reading one LayerNorm / RMSNorm output and nothing else (a pre-norm block's
q/k/v, its MLP's first linears) share one ``s``, whose α is searched on their summed output error, and the
division costs nothing at run time. A fold the towers' outputs show not to be exact (a norm output that also
feeds a residual, as in post-LN BERT) is undone, and those layers, like every layer not read from a norm, keep
``s`` as their own ``input_scale`` (fp16-representable, like AWQ's), searched per layer. The final weight is
quantized by ``base`` (``rtn`` or ``gptq``: GPTQ on ``W·diag(s)`` with the Hessian of ``X / s``); the static
activation scales are calibrated afterwards on ``X / s`` (lowbit.quant.act_calibration).

Options: ``alpha`` (a fixed α, no search), ``alphas`` (the grid, default 0.3..0.9 by 0.1), ``base``.

Measured caveat: it is meant for transformer linears. On EfficientNet's pointwise convs (lit-fashion's image tower)
W8A8 with SmoothQuant scored far worse than plain min-max (image-embedding cosine 0.90 vs 0.98): channels nearly
dead on the calibration data get large 1/s and wider ranges later; use min-max or percentile scales there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels import act_quant
from lowbit.kernels.act_quant import ActSpec
from lowbit.quant.methods import METHODS, QuantContext, QuantResult, check_options, get_method
from lowbit.quant.norm_fold import EXACT_TOL, fold, norm_groups, relative_change, tower_outputs, unfold
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


def _checked(options: dict[str, Any]) -> tuple[str, list[float]]:
    """(base, alphas) of a rule's options, validated."""
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
    return base, [float(a) for a in alphas]


def shared_error(x: torch.Tensor, weights: Sequence[torch.Tensor], rules: Sequence[Any], s: torch.Tensor | None,
                 act_max: torch.Tensor) -> float:
    """``output_error`` summed over the linears reading one input ``x`` with one smoothing scale ``s``."""
    return sum(output_error(x, w, s, rule.spec, rule.activations, act_max) for w, rule in zip(weights, rules,
                                                                                               strict=True))


FOLD_ROWS = 512  # sampled rows of each norm's output the shared α is searched on


@torch.no_grad()
def fold_into_norms(calibration: Any, towers: dict[str, nn.Module],
                    targets: Sequence[tuple[str, str, nn.Module, Any]]) -> dict[str, Any]:
    """Fold a shared smoothing scale into each norm whose output only linears read (see the module docstring).
    Returns ``folded`` (norm -> the α chosen, None: no migration paid off) and ``layers`` ("tower/name" of every
    target layer decided here: ``quantize_weight`` only runs the base method on them)."""
    linear = [(t, n, m, rule) for t, n, m, rule in targets if isinstance(m, nn.Linear)]
    rule_of = {id(m): (f"{t}/{n}", rule) for t, n, m, rule in linear}
    groups = norm_groups(calibration, towers, [m for _, _, m, _ in linear], sample_rows=FOLD_ROWS)
    folded: dict[str, float | None] = {}
    decided: list[str] = []
    before = tower_outputs(calibration, towers) if groups else []
    for group in groups:
        mine = [(lin, *rule_of[id(lin)]) for lin in group.linears if id(lin) in rule_of]
        if group.rows is None or not mine:
            continue
        alphas = _checked(dict(mine[0][2].options))[1]
        act_max = torch.maximum(group.lo.abs(), group.hi.abs())
        weights = [lin.weight.detach().float() for lin, _, _ in mine]
        stacked = torch.cat(weights)
        rules = [rule for _, _, rule in mine]
        best: tuple[float, float | None, torch.Tensor | None] = (
            shared_error(group.rows, weights, rules, None, act_max), None, None)
        for alpha in alphas:
            s = smoothing_scale(act_max, stacked, alpha)
            err = shared_error(group.rows, weights, rules, s, act_max)
            if err < best[0]:
                best = (err, alpha, s)
        if best[2] is not None:
            fold(group, best[2])
            if relative_change(tower_outputs(calibration, towers), before) > EXACT_TOL:
                unfold(group)  # the norm's output feeds more than linears: these layers keep an input scale
                continue
        folded[group.label] = best[1]
        decided += [label for _, label, _ in mine]
    return {"folded": folded, "layers": decided}


class SmoothQuant:
    """SmoothQuant (see the module docstring); needs calibration rows and per-channel activation maxima."""

    needs_calibration = True

    def prepare_model(self, calibration: Any, towers: dict[str, nn.Module],
                      targets: Sequence[tuple[str, str, nn.Module, Any]]) -> dict[str, Any]:
        """Before any layer is quantized: fold the scales into the norms where the graph allows."""
        return fold_into_norms(calibration, towers, targets)

    def quantize_weight(
        self, weight: torch.Tensor, spec: QuantSpec, ctx: QuantContext, options: dict[str, Any]
    ) -> QuantResult:
        base, alphas = _checked(options)
        if f"{ctx.tower}/{ctx.name}" in (ctx.extra.get("prepared") or {}).get("layers", ()):
            return get_method(base).quantize_weight(weight, spec, ctx, {})  # smoothed by its norm already
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
