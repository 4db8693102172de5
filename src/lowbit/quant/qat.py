"""Quantization-aware training: wrap layers with fake quantizers (``prepare_qat``), fold them (``convert_qat``).

The recipe rules of post-training quantization decide which layers get which format (``plan_quantization``
is shared with ``quantize_``). ``prepare_qat`` wraps each chosen layer from outside in a ``QATLayer``: the
original module stays inside (its ``weight`` becomes the trainable latent weight) and runs its own forward
with the fake-quantized weight (``torch.func.functional_call``), so padding logic of conv subclasses and
anything else in the module keep working. The quantizers (``lowbit.quant.fake_quant``: LSQ, Esser et al.
2020, arXiv:1902.08153, with binary / ternary / PB-LLM level sets) start exactly on the post-training grid
of the rule's method (RTN for rtn/gptq/awq), so an untrained ``convert_qat`` equals ``quantize_`` with RTN,
binary, ternary, pbllm, pbllm-hessian (same calibration) or minmax. Every method of ``METHODS`` is registered in
``QAT_QUANTIZERS`` except the post-training ones: smoothquant and repq (transforms over a base method) and kquant
(its steps are re-rounded to 6 bits after they are chosen: a trained grid would not fold exactly).

``convert_qat`` folds latent weights and learned steps into the packed format and the same quantized module
kinds as ``quantize_`` (``QUANT_KINDS``), so ``lowbit.save``/``lowbit.load``/``lowbit eval`` cannot tell a QAT
model from a PTQ one; the folded model computes exactly the fake-quant weights.

Example:
    >>> report = prepare_qat(model, "vision=w1:binary,text=w1.58,projector=w8")  # doctest: +SKIP
    >>> ...  # train the latent weights and scales (lowbit.train.qat.train_qat)
    >>> report = convert_qat(model)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels.quant_linear import QUANT_KINDS
from lowbit.quant.apply import module_paths, plan_quantization, replace_module, round_floats_
from lowbit.quant.fake_quant import QAT_QUANTIZERS, FakeQuantizer, make_quantizer
from lowbit.quant.methods import CalibrationProvider, QuantContext
from lowbit.quant.recipe import Recipe, load_recipe
from lowbit.quant.report import FloatModule, ModuleQuant, QuantReport

_PLAN_ATTR = "_lowbit_qat_plan"  # set on the model by prepare_qat, read by convert_qat


@dataclass
class QATPlan:
    """What ``prepare_qat`` decided, kept on the model for ``convert_qat``."""

    recipe: Recipe
    float_modules: list[FloatModule]


class QATLayer(nn.Module):
    """A layer with a fake-quantized weight: ``module`` (original, latent ``weight``) + ``quantizer``.

    Attributes: ``tower``, ``name`` (inside the tower), ``kind`` (linear, conv1x1, conv), ``method`` and
    ``rule`` (recipe rule index). ``weight`` reads the fake-quantized weight in the original shape.
    """

    def __init__(self, module: nn.Module, quantizer: FakeQuantizer, tower: str, name: str, kind: str,
                 method: str, rule: int) -> None:
        super().__init__()
        self.module = module
        self.quantizer = quantizer
        self.tower, self.name, self.kind, self.method, self.rule = tower, name, kind, method, rule

    @property
    def weight(self) -> torch.Tensor:
        w = self.module.weight
        return self.quantizer(w.reshape(w.shape[0], -1)).reshape(w.shape).to(w.dtype)  # [N, K] -> original shape

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.module, {"weight": self.weight}, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        # Code that introspects the wrapped layer (in_features, kernel_size, bias...) sees the original's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if name == "module" or "module" not in modules:
                raise
            return getattr(modules["module"], name)

    def latent_matrix(self) -> torch.Tensor:
        """The latent weight as float32 [N, K] (conv kernels flattened), detached."""
        w = self.module.weight.detach()
        return w.reshape(w.shape[0], -1).to(torch.float32)


def qat_layers(model: nn.Module) -> list[tuple[str, QATLayer]]:
    """(full name, layer) of every ``QATLayer`` in ``model``, in definition order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QATLayer)]


def qat_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The trainable tensors of QAT: ``weights`` (latent weights) and ``quant`` (steps, zero points).

    Give them separate optimizer groups: weight decay on latent weights only.
    """
    weights: list[nn.Parameter] = []
    quant: list[nn.Parameter] = []
    for _, layer in qat_layers(model):
        weights.append(layer.module.weight)
        quant.extend(layer.quantizer.parameters())
    return {"weights": weights, "quant": quant}


def _stats(tower: str, name: str, path: str, kind: str, method: str, rule: int, w: torch.Tensor,
           result: Any, shape: tuple[int, ...]) -> ModuleQuant:
    packed = result.packed
    with torch.no_grad():
        wq = packed.dequantize()
        norm = float(w.norm())
        err = float((w - wq).norm()) / norm if norm > 0 else float((w - wq).norm())
    params = w.numel()
    return ModuleQuant(
        tower=tower, name=name, path=path, kind=result.kind or kind, method=method, bits=packed.bits,
        group_size=packed.group_size, symmetric=packed.symmetric, shape=list(shape), params=params,
        fp32_bytes=4 * params, packed_bytes=packed.nbytes, bits_per_weight=8 * packed.nbytes / params,
        weight_error=err, has_input_scale=False, rule=rule,
    )


def prepare_qat(model: nn.Module, recipe: Recipe | str, strict: bool = False,
                calibration: CalibrationProvider | None = None) -> QuantReport:
    """Wrap every layer a recipe rule quantizes in a ``QATLayer``, in place; returns the starting report.

    Latent weights and quantizer parameters get ``requires_grad=True``; nothing else is touched (freeze or
    unfreeze the rest yourself). The report's sizes and errors are those of folding right away.
    ``calibration`` feeds the quantizers that start from calibration statistics (``pbllm-hessian``'s salient
    mask), as ``quantize_`` feeds its methods (``stats_for`` before, ``on_quantized`` after each such layer).

    Example:
        >>> report = prepare_qat(model, "text=w1:pbllm,vision=skip,projector=skip")  # doctest: +SKIP
    """
    recipe = load_recipe(recipe)
    if getattr(model, _PLAN_ATTR, None) is not None or any(True for _ in qat_layers(model)):
        raise LowbitError("prepare_qat: the model already has QAT layers; call it once per model")
    planned, kept, _ = plan_quantization(model, recipe)
    report = QuantReport(float_modules=kept, recipe=recipe.name or recipe.describe())
    violations = report.strict_violations()
    if strict and violations:
        listed = "; ".join(f"{f.label} ({f.reason})" for f in violations)
        raise LowbitError(f"strict: {len(violations)} weight layer(s) would stay float: {listed}")
    tied = [p for p in planned if p.tied_to is not None]
    if tied:  # one packed copy after folding would need the head to train through the table's quantizer
        raise LowbitError(f"QAT of an output head tied to its embedding table ({tied[0].tower}/{tied[0].name}) is "
                          "not supported; accepted: quantize the table post-training, or skip one of the two")
    calibrated = [p for p in planned if QAT_QUANTIZERS.get(p.rule.method).needs_calibration]
    if calibrated and calibration is None:
        raise LowbitError(f"the QAT quantizer of method {calibrated[0].rule.method!r} (rule "
                          f"{calibrated[0].rule_index}) needs calibration data; received calibration=None; "
                          "pass a CalibrationProvider")
    calibrated_ids = {id(p) for p in calibrated}
    on_quantized = getattr(calibration, "on_quantized", None)
    paths = module_paths(model)
    for p in planned:
        assert p.rule.spec is not None  # skip rules are never planned
        w = p.module.weight.detach().reshape(p.module.weight.shape[0], -1).to(torch.float32)  # [N, K]
        ctx = QuantContext(tower=p.tower, name=p.name, kind=p.kind)
        if id(p) in calibrated_ids:
            ctx = calibration.stats_for(p.tower, p.name, p.module)  # type: ignore[union-attr]
            ctx.tower, ctx.name, ctx.kind = ctx.tower or p.tower, ctx.name or p.name, p.kind
        quantizer = make_quantizer(p.rule.method, w, p.rule.spec, p.rule.options, p.kind, ctx)
        quantizer.to(p.module.weight.device)
        layer = QATLayer(p.module, quantizer, p.tower, p.name, p.kind, p.rule.method, p.rule_index)
        full = paths.get(id(p.module), [])
        if not full:
            raise LowbitError(f"{p.tower}/{p.name} is not a submodule of the model, so it cannot be wrapped")
        replace_module(model, full, layer)
        if callable(on_quantized):  # the provider's contract: told after each layer's replacement
            on_quantized(p.tower, p.name, layer)
        p.module.weight.requires_grad_(True)
        for t in quantizer.parameters():
            t.requires_grad_(True)
        with torch.no_grad():
            report.modules.append(_stats(p.tower, p.name, full[0], p.kind, _method_label(layer), p.rule_index, w,
                                         quantizer.pack(w, tuple(p.module.weight.shape)),
                                         tuple(p.module.weight.shape)))
    object.__setattr__(model, _PLAN_ATTR, QATPlan(recipe, kept))  # plain attribute, not a submodule
    return report


def _method_label(layer: QATLayer) -> str:
    """Manifest ``method`` of a folded layer, e.g. ``qat-binary`` or ``qat-lsq(gptq)`` (RTN-initialised)."""
    base = f"qat-{layer.quantizer.name}"
    return base if layer.quantizer.name == layer.method else f"{base}({layer.method})"


@torch.no_grad()
def convert_qat(model: nn.Module) -> QuantReport:
    """Fold every ``QATLayer`` into the packed quantized module of its kind, in place; returns the report.

    The result is what ``quantize_`` produces (same module classes, buffers and manifest fields), so
    ``lowbit.save(model, dir, report)`` writes a checkpoint ``lowbit.load(dir)`` reads back. Weight errors
    are relative to the latent weights.

    Example:
        >>> report = convert_qat(model); lowbit.save(model, "out/qat", report)  # doctest: +SKIP
    """
    plan: QATPlan | None = getattr(model, _PLAN_ATTR, None)
    layers = qat_layers(model)
    if plan is None or not layers:
        raise LowbitError("convert_qat: the model has no QAT layers; call prepare_qat (and train) first")
    report = QuantReport(float_modules=list(plan.float_modules), recipe=plan.recipe.name or plan.recipe.describe(),
                         recipe_spec=plan.recipe.to_dict())
    paths = module_paths(model)
    for path, layer in layers:
        w = layer.latent_matrix()  # [N, K]
        inner = layer.module
        shape = tuple(inner.weight.shape)
        result = layer.quantizer.pack(w, shape)
        kind = result.kind or layer.kind
        inner.weight.requires_grad_(False)
        new = QUANT_KINDS.get(kind).build(inner, result.packed, None)
        replace_module(model, paths[id(layer)], new)
        report.modules.append(_stats(layer.tower, layer.name, path, layer.kind, _method_label(layer), layer.rule,
                                     w, result, shape))
    round_floats_(model, plan.recipe.float_dtype)  # as quantize_ does: memory holds what the checkpoint stores
    object.__setattr__(model, _PLAN_ATTR, None)
    return report
