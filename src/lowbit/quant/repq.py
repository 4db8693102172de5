"""RepQ-ViT: post-LayerNorm per-channel activation scales reparameterised into one per-tensor scale.

Li, Xiao, Liu, Lu, Zhang (2023), "RepQ-ViT: Scale Reparameterization for Post-Training Quantization of Vision
Transformers", arXiv:2212.08254.

A LayerNorm's output X has channels of very different ranges, which a per-tensor activation scale serves badly.
RepQ-ViT calibrates per-channel grids (scale s_c and, for asymmetric schemes, integer zero point z_c), picks the
per-tensor grid s̃ = mean(s_c), z̃ = round(mean(z_c)), and moves the difference out of the activations:
r1 = s / s̃, r2 = z - z̃, the LayerNorm's affine becomes γ' = γ / r1, β' = (β + s ⊙ r2) / r1, and every linear
reading it W' = W · diag(r1), b' = b - W (s ⊙ r2). In float the function is unchanged (X = X' ⊙ r1 - s ⊙ r2),
and rounding X' on the per-tensor grid (s̃, z̃) is rounding X on its per-channel grids. Then the weights are
quantized (``base``: rtn or gptq, on W') and the static per-tensor activation scales calibrated as usual.

The LayerNorms feeding the layers are found and folded by lowbit.quant.norm_fold; after reparameterising, the
towers' outputs on a calibration batch are compared with the float ones, and anything but float rounding undoes
it with one error (a LayerNorm output that also feeds something other than linears, as in post-LN transformers,
cannot take the new affine). RepQ-ViT's log√2
quantizer for post-softmax attention is the recipe's ``attention=a4l`` (lowbit.kernels.attn_quant, log2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels.act_quant import ActSpec
from lowbit.quant.methods import METHODS, QuantContext, QuantResult, check_options, get_method
from lowbit.quant.norm_fold import EXACT_TOL, fold, norm_groups, relative_change, tower_outputs, unfold
from lowbit.quant.primitives import QuantSpec

BASES = ("rtn", "gptq")


def _grid(lo: torch.Tensor, hi: torch.Tensor, spec: ActSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, zero) of ``spec``'s grid for the ranges [lo, hi] (zero 0 when symmetric)."""
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    if spec.symmetric:
        return (torch.maximum(-lo, hi) / spec.qmax).clamp_min(1e-8), torch.zeros_like(lo)
    s = ((hi - lo) / spec.qmax).clamp_min(1e-8)
    return s, torch.round(-lo / s)


@torch.no_grad()
def reparameterize(calibration: Any, towers: dict[str, nn.Module], targets: Sequence[tuple[str, str, nn.Module]],
                   specs: Sequence[ActSpec]) -> list[str]:
    """Reparameterise the LayerNorms feeding ``targets`` (float linears) in place; returns "tower/name"s of the
    LayerNorms changed. ``specs``: each target's activation scheme (the grid the per-channel scales are of)."""
    spec_of = {id(m): spec for (_, _, m), spec in zip(targets, specs, strict=True)}
    groups = [g for g in norm_groups(calibration, towers, [m for _, _, m in targets])
              if isinstance(g.norm, nn.LayerNorm)]  # an RMSNorm has no bias to take the zero-point shift
    if not groups:
        return []
    before = tower_outputs(calibration, towers)
    for group in groups:
        spec = next(spec_of[id(lin)] for lin in group.linears if id(lin) in spec_of)
        s, z = _grid(group.lo, group.hi, spec)
        r1 = s / s.mean()
        r2 = z - torch.round(z.mean())
        fold(group, r1, shift=s * r2)
    worst = relative_change(tower_outputs(calibration, towers), before)
    if worst > EXACT_TOL:
        for group in groups:  # undo: the model is as it was
            unfold(group)
        raise LowbitError(f"repq: reparameterising the LayerNorms changed the model's outputs (relative {worst:.2g}); "
                          "a LayerNorm output also feeds something other than linears here (a post-LN "
                          "residual?); use smoothquant or minmax activations instead")
    return [g.label for g in groups]


class RepQ:
    """RepQ-ViT (see the module docstring): ``prepare_model`` reparameterises, ``quantize_weight`` runs ``base``."""

    needs_calibration = True

    def prepare_model(self, calibration: Any, towers: dict[str, nn.Module],
                      targets: Sequence[tuple[str, str, nn.Module, Any]]) -> dict[str, Any]:
        """Before any layer is quantized: reparameterise the LayerNorms feeding the rule's layers."""
        chosen = [((t, n, m), rule.activations or ActSpec(8)) for t, n, m, rule in targets if isinstance(m, nn.Linear)]
        changed = reparameterize(calibration, towers, [c[0] for c in chosen], [c[1] for c in chosen])
        return {"repq_layernorms": changed}

    def quantize_weight(self, weight: torch.Tensor, spec: QuantSpec, ctx: QuantContext,
                        options: dict[str, Any]) -> QuantResult:
        check_options("repq", options, ("base",))
        base = options.get("base", "rtn")
        if base not in BASES:
            raise LowbitError(f"repq option base={base!r}; accepted: {', '.join(BASES)}")
        return get_method(base).quantize_weight(weight, spec, ctx, {})


METHODS.register("repq")(RepQ())
