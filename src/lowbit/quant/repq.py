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

The LayerNorm feeding a layer is found from the calibration forward itself (the layer's input tensor is the
LayerNorm's output object); after reparameterising, the towers' outputs on a calibration batch are compared
with the float ones, and anything but float rounding undoes it with one error (a LayerNorm output that also
feeds something other than linears, as in post-LN transformers, cannot take the new affine). RepQ-ViT's log√2
quantizer for post-softmax attention is the recipe's ``attention=a4l`` (lowbit.kernels.attn_quant, log2).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels.act_quant import ActSpec
from lowbit.quant.act_calibration import run_calibration
from lowbit.quant.methods import METHODS, QuantContext, QuantResult, check_options, get_method
from lowbit.quant.primitives import QuantSpec

BASES = ("rtn", "gptq")
EXACT_TOL = 1e-4  # relative max difference of the towers' outputs allowed after reparameterising (float rounding)


class _Channels:
    def __init__(self) -> None:
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def add(self, y: torch.Tensor) -> None:
        y = y.detach().reshape(-1, y.shape[-1]).float()
        lo, hi = y.amin(0), y.amax(0)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)


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
    norms = {id(m): (tower, name, m) for tower, root in towers.items() for name, m in root.named_modules()
             if isinstance(m, nn.LayerNorm) and m.elementwise_affine}
    outputs: dict[int, int] = {}  # id(output tensor) -> id(norm), for the batch in flight
    stats: dict[int, _Channels] = {k: _Channels() for k in norms}
    fed: dict[int, set[int]] = {id(m): set() for _, _, m in targets}  # id(linear) -> ids of the norms feeding it
    all_linears = {id(m): m for root in towers.values() for m in root.modules() if isinstance(m, nn.Linear)}
    fed_any: dict[int, set[int]] = {k: set() for k in all_linears}

    def norm_hook(key: int) -> Callable[..., None]:
        def hook(mod: nn.Module, args: Any, out: torch.Tensor) -> None:
            outputs[id(out)] = key
            stats[key].add(out)
        return hook

    def linear_hook(key: int) -> Callable[..., None]:
        def hook(mod: nn.Module, args: Any) -> None:
            fed_any[key].add(outputs.get(id(args[0]), -1))  # -1: not a norm's output
        return hook

    handles = [m.register_forward_hook(norm_hook(k)) for k, (_, _, m) in norms.items()]
    handles += [m.register_forward_pre_hook(linear_hook(k)) for k, m in all_linears.items()]
    try:
        run_calibration(calibration, list(dict.fromkeys(t for t, _, _ in targets)))
    finally:
        for h in handles:
            h.remove()
    for k in fed:
        fed[k] = fed_any[k]
    groups: dict[int, list[nn.Linear]] = {}
    spec_of: dict[int, ActSpec] = {}
    for (_, _, m), spec in zip(targets, specs, strict=True):
        sources = fed[id(m)]
        if len(sources) == 1 and next(iter(sources)) in norms:
            key = next(iter(sources))
            groups.setdefault(key, [])
            spec_of.setdefault(key, spec)
    for key in groups:  # every linear the norm feeds takes W' (a consumer outside the targets too: exactness)
        groups[key] = [all_linears[k] for k, src in fed_any.items() if src == {key}]
    if not groups:
        return []
    batch_outputs = _tower_outputs(calibration, towers)
    saved = {key: (norms[key][2].weight.clone(), norms[key][2].bias.clone() if norms[key][2].bias is not None
                   else None, [(lin, lin.weight.clone(), None if lin.bias is None else lin.bias.clone())
                               for lin in groups[key]]) for key in groups}
    for key, linears in groups.items():
        ln = norms[key][2]
        st = stats[key]
        assert st.lo is not None and st.hi is not None
        s, z = _grid(st.lo, st.hi, spec_of[key])
        r1 = s / s.mean()
        r2 = z - torch.round(z.mean())
        shift = s * r2  # s ⊙ r2
        bias = ln.bias if ln.bias is not None else torch.zeros_like(ln.weight)
        if ln.bias is None and bool(shift.any()):
            ln.bias = nn.Parameter(torch.zeros_like(ln.weight))
        ln.weight.copy_(ln.weight / r1)
        if ln.bias is not None:
            ln.bias.copy_((bias + shift) / r1)
        for lin in linears:
            if lin.bias is None and bool(shift.any()):
                lin.bias = nn.Parameter(torch.zeros(lin.out_features))
            if lin.bias is not None:
                lin.bias.copy_(lin.bias - lin.weight @ shift)
            lin.weight.copy_(lin.weight * r1)
    after = _tower_outputs(calibration, towers)
    worst = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in zip(after, batch_outputs,
                                                                                            strict=True))
    if worst > EXACT_TOL:
        for key, (w, b, lins) in saved.items():  # undo: the model is as it was
            norms[key][2].weight.copy_(w)
            if b is not None:
                norms[key][2].bias.copy_(b)
            for lin, lw, lb in lins:
                lin.weight.copy_(lw)
                if lb is not None:
                    lin.bias.copy_(lb)
        raise LowbitError(f"repq: reparameterising the LayerNorms changed the model's outputs (relative {worst:.2g}); "
                          "a LayerNorm output also feeds something other than linears here (a post-LN "
                          "residual?); use smoothquant or minmax activations instead")
    return [f"{norms[k][0]}/{norms[k][1]}" for k in groups]


def _tower_outputs(calibration: Any, towers: dict[str, nn.Module]) -> list[torch.Tensor]:
    """The towers' outputs on the first calibration batch of each input path (for the exactness check)."""
    outs: list[torch.Tensor] = []
    for tower in towers:
        try:
            paths = calibration._paths(tower)
        except LowbitError:
            continue
        for _, forward, batches in paths[:1]:
            if batches:
                out = forward(batches[0])
                outs.append(out if isinstance(out, torch.Tensor) else torch.as_tensor(out))
    return outs


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
