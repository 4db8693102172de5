"""``quantize_``: apply a recipe to a model in place, layer by layer, and report what happened.

Each ``nn.Linear`` / ``nn.Conv2d`` of each tower (in definition order) gets the first matching recipe rule;
its method (RTN, GPTQ arXiv:2210.17323, AWQ arXiv:2306.00978, ...) returns a packed weight and the layer is
replaced from outside (``setattr`` on its parent(s), or an in-place class swap for generic convs, see
lowbit.kernels.quant_linear). Nothing is kept in float silently: every module with parameters that is not
quantized appears in the report with its reason.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels import act_quant
from lowbit.kernels.fusion import fuse_shared_inputs
from lowbit.kernels.quant_embedding import EMBEDDING_KINDS
from lowbit.kernels.quant_linear import PACKED_BUFFERS, QUANT_KINDS, QuantLinear, is_quantized
from lowbit.models.spec import pointwise_conv_class
from lowbit.quant.methods import CalibrationProvider, QuantContext, get_method
from lowbit.quant.recipe import HEAD_KIND, OPT_IN_KINDS, Recipe, Rule, load_recipe
from lowbit.quant.report import (
    NO_OPT_IN,
    NO_RULE,
    NOT_A_LAYER,
    OUTSIDE,
    SKIPPED,
    UNSUPPORTED,
    FloatModule,
    ModuleQuant,
    QuantReport,
)


def layer_kind(module: nn.Module) -> tuple[str | None, str]:
    """(kind, "") for a quantizable layer — kind in ``QUANT_KINDS`` — or (None, reason it is not)."""
    cls = type(module)
    if isinstance(module, nn.Linear):
        if cls.forward is not nn.Linear.forward:
            return None, f"{cls.__name__} overrides nn.Linear.forward, so a QuantLinear could change its output"
        return "linear", ""
    if isinstance(module, nn.Conv2d):
        pointwise = (
            tuple(module.kernel_size) == (1, 1)
            and tuple(module.stride) == (1, 1)
            and module.groups == 1
            and (module.padding in ("valid", "same") or tuple(module.padding) == (0, 0))
        )
        plain = pointwise_conv_class(cls)  # the family specs' pointwise_convs (lowbit.models.spec)
        return ("conv1x1" if pointwise and plain else "conv"), ""
    if isinstance(module, nn.Embedding):
        if cls.forward is not nn.Embedding.forward:
            return None, f"{cls.__name__} overrides nn.Embedding.forward, so a packed lookup could change its output"
        return "embedding", ""
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        return None, f"{cls.__name__} is not supported (lowbit quantizes nn.Linear, nn.Conv2d and nn.Embedding)"
    return None, ""


def output_heads(towers: dict[str, nn.Module]) -> set[int]:
    """ids of the towers' output heads (``get_output_embeddings()`` of transformers models): the ``lm_head``
    kind of recipes."""
    heads: set[int] = set()
    for root in towers.values():
        for m in root.modules():
            get = getattr(m, "get_output_embeddings", None)
            head = get() if callable(get) else None
            if isinstance(head, nn.Linear):
                heads.add(id(head))
    return heads


def model_towers(model: nn.Module) -> dict[str, nn.Module]:
    """``model.towers()`` for a DualEncoder, else ``{"model": model}``."""
    from lowbit.models.base import DualEncoder

    return model.towers() if isinstance(model, DualEncoder) else {"model": model}


def module_paths(model: nn.Module) -> dict[int, list[str]]:
    """id(module) -> every full name it has in ``model`` (shared modules have several)."""
    paths: dict[int, list[str]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(path)
    return paths


def replace_module(model: nn.Module, paths: list[str], new: nn.Module) -> None:
    """Put ``new`` at each full name in ``paths`` (setattr on the parent)."""
    for path in paths:
        if not path:
            raise LowbitError(f"cannot replace the root module {type(model).__name__} itself; wrap it in a container")
        parent_name, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)


def _own_params(module: nn.Module, float_bytes: int | None = None) -> tuple[int, int, list[str]]:
    """(params, stored bytes, names) of ``module``'s own parameters; ``float_bytes`` per element for floating
    ones when the recipe stores floats narrower than they are held (fp16)."""
    ps = list(module.named_parameters(recurse=False))
    size = sum(p.numel() * (float_bytes if float_bytes and p.is_floating_point() else p.element_size()) for _, p in ps)
    return sum(p.numel() for _, p in ps), size, [n for n, _ in ps]


@dataclasses.dataclass
class _Planned:
    tower: str
    name: str
    module: nn.Module
    kind: str
    rule_index: int
    rule: Rule
    tied_to: _Planned | None = None  # an output head sharing its weight with this planned embedding table


def _walk(towers: dict[str, nn.Module]) -> Iterator[tuple[str, str, nn.Module]]:
    seen: set[int] = set()
    for tower, root in towers.items():
        for name, m in root.named_modules():
            if id(m) not in seen:  # a module shared by two towers belongs to the first
                seen.add(id(m))
                yield tower, name, m


def plan_quantization(
    model: nn.Module, recipe: Recipe
) -> tuple[list[_Planned], list[FloatModule], list[int]]:
    """Which layers get which rule; float-kept modules with reasons; how often each rule matched."""
    towers = model_towers(model)
    heads = output_heads(towers)
    float_bytes = 2 if recipe.float_dtype == "fp16" else None
    planned: list[_Planned] = []
    kept: list[FloatModule] = []
    used = [0] * len(recipe.rules)
    covered: set[int] = set()
    for tower, name, m in _walk(towers):
        covered.add(id(m))
        if is_quantized(m):
            raise LowbitError(f"{tower}/{name} is already quantized ({type(m).__name__}); "
                              "quantize_ expects a float model")
        n_params, n_bytes, pnames = _own_params(m, float_bytes)
        kind, why = layer_kind(m)
        tname = type(m).__name__
        if kind is None:
            if n_params:
                category = UNSUPPORTED if why else NOT_A_LAYER
                reason = why or f"{tname} is not a weight layer lowbit quantizes (params: {', '.join(pnames)})"
                kept.append(FloatModule(tower, name, tname, n_params, n_bytes, reason, category))
            continue
        match_kind = HEAD_KIND if kind == "linear" and id(m) in heads else kind
        hit = recipe.match(tower, name, match_kind)
        if hit is None:
            category = NO_OPT_IN if match_kind in OPT_IN_KINDS else NO_RULE
            kept.append(FloatModule(tower, name, tname, n_params, n_bytes,
                                    f"no recipe rule matches ({tower}, {name!r}, {match_kind})", category))
            continue
        index, rule = hit
        used[index] += 1
        if rule.skip:
            kept.append(FloatModule(tower, name, tname, n_params, n_bytes,
                                    f"skipped by rule {index} ({rule.describe()})", SKIPPED))
        else:
            if kind == "embedding" and get_method(rule.method).needs_calibration:
                raise LowbitError(f"{tower}/{name}: an embedding table takes a method without calibration (rtn, "
                                  f"minmax); rule {index} ({rule.describe()}) asks for {rule.method!r}")
            planned.append(_Planned(tower, name, m, kind, index, rule))
    _tie_heads(planned)
    for path, m in model.named_modules():
        if id(m) not in covered:
            n_params, n_bytes, pnames = _own_params(m, float_bytes)
            if n_params:
                kept.append(FloatModule("", path, type(m).__name__, n_params, n_bytes,
                                        f"outside all towers (params: {', '.join(pnames)})", OUTSIDE))
    return planned, kept, used


def no_match_error(model: nn.Module, recipe: Recipe, examples: int = 4) -> LowbitError:
    """The one-line error for a recipe none of whose rules matches a layer of ``model``: the rules' patterns and
    a few real layer paths (with their kinds) they could have named."""
    towers = model_towers(model)
    layers = [(tower, name, kind) for tower, name, m in _walk(towers) if name
              for kind in [layer_kind(m)[0]] if kind is not None]
    patterns = ", ".join(r.describe() for r in recipe.rules)
    shown = ", ".join(f"{t}/{n} ({k})" for t, n, k in layers[:examples])
    more = f" and {len(layers) - examples} more" if len(layers) > examples else ""
    what = f"its layers are {shown}{more}" if layers else "it has no Linear, Conv2d or Embedding layer"
    return LowbitError(f"recipe {recipe.name or patterns!r} matches no layer of this {type(model).__name__} "
                       f"(rules: {patterns}; towers: {', '.join(towers)}); {what}; write TOWER/PATTERN with a "
                       "glob on these dotted paths (e.g. '*/layers.*=w4g32' or '*=w8')")


def _tie_heads(planned: list[_Planned]) -> None:
    """An output head whose weight IS a planned embedding's weight (tied, as in SmolLM2 / Llama with
    ``tie_word_embeddings``) reuses the table's packed tensors instead of being quantized on its own: one packed
    copy, on disk and in memory. It is moved after its table so the table exists when the head is built."""
    tables = {id(p.module.weight): p for p in planned if p.kind == "embedding"}
    tied = [p for p in planned if p.kind == "linear" and id(p.module.weight) in tables]
    for p in tied:
        p.tied_to = tables[id(p.module.weight)]
        planned.remove(p)
        planned.append(p)


FP16_MAX = float(torch.finfo(torch.float16).max)


def fits_fp16(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is within fp16's range. One that is not stays float32 where a recipe stores
    floats as fp16: batch-norm statistics re-estimated by QAT's moment matching on a block whose quantized
    input has a huge spread reach 1e13, and an inf running variance turns every output into NaN."""
    return t.numel() == 0 or float(t.detach().abs().max()) <= FP16_MAX


def round_floats_(model: nn.Module, float_dtype: str) -> None:
    """Round every float tensor that is not a packed buffer to ``float_dtype`` in place (kept as float32, so
    the model in memory computes exactly what the stored checkpoint will; beyond fp16's range: kept exact, as
    the checkpoint stores it)."""
    if float_dtype != "fp16":
        return
    with torch.no_grad():
        for module in model.modules():
            unsaved = module._non_persistent_buffers_set  # recomputed on load (RoPE inv_freq): never stored
            for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if (t is not None and t.dtype == torch.float32 and name not in PACKED_BUFFERS and name not in unsaved
                        and fits_fp16(t)):
                    t.copy_(t.half().float())


def quantize_(
    model: nn.Module,
    recipe: Recipe | str,
    calibration: CalibrationProvider | None = None,
    strict: bool = False,
    progress: bool = True,
) -> QuantReport:
    """Quantize ``model`` in place following ``recipe``; returns the ``QuantReport``.

    ``model`` is any ``nn.Module``: a ``DualEncoder``'s towers are its ``towers()``, anything else is one tower,
    ``model``, whose rules match the dotted module paths by glob (``*/layers.*.mlp.*=w4g32``) and the layer
    kinds. A recipe none of whose rules matches a layer is a ``LowbitError`` naming a few real paths.

    ``calibration`` feeds methods with ``needs_calibration`` (``stats_for`` before, ``on_quantized`` after
    each such layer). ``strict=True`` raises if any Linear/Conv2d would stay float without a skip rule.

    Example:
        >>> report = quantize_(model, "vision=w4g64,text=w4g64,projector=w8", progress=False)  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    recipe = load_recipe(recipe)
    planned, kept, used = plan_quantization(model, recipe)
    if not any(used):
        raise no_match_error(model, recipe)
    for index, count in enumerate(used):
        if count == 0 and not recipe.rules[index].optional:
            warnings.warn(f"recipe rule {index} ({recipe.rules[index].describe()}) matches no module",
                          UserWarning, stacklevel=2)
    report = QuantReport(float_modules=kept, recipe=recipe.name or recipe.describe(), recipe_spec=recipe.to_dict())
    violations = report.strict_violations()
    if strict and violations:
        listed = "; ".join(f"{f.label} ({f.reason})" for f in violations)
        raise LowbitError(f"strict: {len(violations)} weight layer(s) would stay float: {listed}; "
                          "add a rule for them (or an explicit skip rule)")
    if recipe.attention is not None and calibration is None:
        raise LowbitError(f"recipe attention={recipe.attention.short()} quantizes attention matmuls with static "
                          "scales, which need calibration data; received calibration=None")
    for p in planned:
        static = p.rule.activations is not None and not p.rule.activations.dynamic
        if static and calibration is None:
            raise LowbitError(f"rule {p.rule_index} ({p.rule.describe()}) quantizes activations with static scales, "
                              "which need calibration data; received calibration=None; pass a CalibrationProvider "
                              "or use dynamic activations (e.g. a8dk)")
        if get_method(p.rule.method).needs_calibration and calibration is None:
            raise LowbitError(
                f"method {p.rule.method!r} (rule {p.rule_index}: {p.rule.describe()}) needs calibration data; "
                f"received calibration=None; pass a CalibrationProvider or use a method that needs none (e.g. rtn)"
            )
    for name in dict.fromkeys(p.rule.method for p in planned):
        # a method may first transform the float model as a whole (RepQ-ViT reparameterises LayerNorms): exact in
        # float, before any of its layers is quantized
        prepare = getattr(get_method(name), "prepare_model", None)
        if callable(prepare):
            targets = [(p.tower, p.name, p.module, p.rule) for p in planned if p.rule.method == name]
            report.transforms[name] = prepare(calibration, model_towers(model), targets)
    paths = module_paths(model)
    bar = tqdm(planned, desc="quantize", unit="layer", disable=not progress, leave=False)
    built: dict[int, nn.Module] = {}  # id(float module) -> its quantized replacement
    for p in bar:
        bar.set_postfix_str(f"{p.tower}/{p.name}", refresh=False)
        entry = _tie_one(model, p, paths, built) if p.tied_to is not None else _quantize_one(
            model, p, paths, calibration, built, report.transforms.get(p.rule.method))
        report.modules.append(entry)
    static = [(p.tower, p.name, built[id(p.module)]) for p in planned
              if takes_activations(p, built.get(id(p.module), p.module)) and not p.rule.activations.dynamic]
    if static:  # one pass over the calibration data with every weight quantized (lowbit.quant.act_calibration)
        from lowbit.quant.act_calibration import calibrate_static

        calibrate_static(calibration, static)  # type: ignore[arg-type]
    if recipe.attention is not None:  # quantized QKᵀ / AV matmuls (lowbit.kernels.attn_quant), scales calibrated
        from lowbit.quant.act_calibration import calibrate_attention

        report.attention = calibrate_attention(calibration, model_towers(model), recipe.attention)
    round_floats_(model, recipe.float_dtype)
    fuse_shared_inputs(model)  # siblings reading one input share a kernel call (lowbit.kernels.fusion)
    guard_save_pretrained(model)
    return report


def guard_save_pretrained(model: nn.Module) -> None:
    """Make ``save_pretrained`` of every transformers model holding packed layers refuse in one line.

    transformers would write lowbit's buffers under names no loader knows, and ``from_pretrained`` would then
    initialise those layers at random without an error; ``lowbit.export(model, "hf", DIR)`` writes the
    compressed-tensors form transformers does load.
    """
    for module in model.modules():
        if callable(getattr(module, "save_pretrained", None)) and hasattr(module, "config") \
                and any(is_quantized(m) for m in module.modules()):
            name = type(module).__name__

            def refuse(*_: Any, _name: str = name, **__: Any) -> None:
                raise LowbitError(f"{_name}.save_pretrained would write lowbit's packed layers in a form "
                                  "transformers loads as random weights; use lowbit.export(model, 'hf', DIR) "
                                  "(compressed-tensors) or lowbit.save(model, DIR)")

            module.save_pretrained = refuse  # an instance attribute: the class stays untouched


def _tie_one(model: nn.Module, p: _Planned, paths: dict[int, list[str]], built: dict[int, nn.Module]) -> ModuleQuant:
    """Build a tied head as a ``QuantLinear`` holding its table's packed tensors (the same tensor objects)."""
    table = built[id(p.tied_to.module)]
    bias = getattr(p.module, "bias", None)
    head = QUANT_KINDS.get(table.HEAD_KIND).empty(p.module, table.bits, table.group_size, table.symmetric, False)
    for name, tensor in table._buffers.items():  # the table's packed tensors (its buffers are exactly those)
        if tensor is not None:
            setattr(head, name, tensor)
    if isinstance(bias, torch.Tensor):
        head.bias.copy_(bias.detach().float())
    full_paths = paths.get(id(p.module), [])
    replace_module(model, full_paths, head)
    table_path = paths[id(p.tied_to.module)][0]
    return ModuleQuant(
        tower=p.tower, name=p.name, path=full_paths[0], kind=table.HEAD_KIND, method=f"tied:{table_path}",
        bits=table.bits, group_size=table.group_size, symmetric=table.symmetric, shape=list(table.weight_shape),
        params=0, fp32_bytes=0, packed_bytes=0, bits_per_weight=0.0, weight_error=0.0, has_input_scale=False,
        rule=p.rule_index,  # params and bytes 0: they are the table's, counted once there
    )


def _quantize_one(
    model: nn.Module, p: _Planned, paths: dict[int, list[str]], calibration: CalibrationProvider | None,
    built: dict[int, nn.Module], prepared: dict[str, Any] | None = None,
) -> ModuleQuant:
    method = get_method(p.rule.method)
    spec = p.rule.spec
    assert spec is not None  # skip rules are never planned
    if method.needs_calibration:
        ctx = calibration.stats_for(p.tower, p.name, p.module)  # type: ignore[union-attr]
    else:
        ctx = QuantContext()
    ctx.tower, ctx.name, ctx.kind = ctx.tower or p.tower, ctx.name or p.name, p.kind
    if p.rule.activations is not None:
        ctx.extra["act_spec"] = p.rule.activations  # methods that balance weights against activations read it
    if prepared is not None:
        ctx.extra["prepared"] = prepared  # what the method's own prepare_model did to the model as a whole
    shape = tuple(p.module.weight.shape)
    weight = p.module.weight.detach().to(torch.float32).reshape(shape[0], -1)  # [N, K]
    result = method.quantize_weight(weight.clone(), spec, ctx, dict(p.rule.options))
    packed = result.packed
    if packed.shape != shape:
        if (packed.out_features, packed.in_features) != tuple(weight.shape):
            raise LowbitError(f"method {p.rule.method!r} returned a weight of shape {packed.shape} for "
                              f"{p.tower}/{p.name} of shape {shape}")
        packed = dataclasses.replace(packed, shape=shape)
    full_paths = paths.get(id(p.module), [])
    if not full_paths:
        raise LowbitError(f"{p.tower}/{p.name} is not a submodule of the model, so it cannot be replaced")
    kind = result.kind or p.kind  # a storage variant (PB-LLM side, base-3) may replace the standard kind
    if p.kind == "embedding" and kind not in EMBEDDING_KINDS:
        raise LowbitError(f"{p.tower}/{p.name}: method {p.rule.method!r} stores its weights as {kind!r}, which has "
                          "no embedding lookup; accepted for embedding tables: rtn (integer codes with or without a "
                          "zero point, e.g. w4g32a) or kquant (super-blocks, e.g. w5g64:kquant)")
    new = QUANT_KINDS.get(kind).build(p.module, packed, result.input_scale)
    if takes_activations(p, new):
        act_quant.attach(new, p.rule.activations)  # static scales: filled by calibrate_static after every layer
    built[id(p.module)] = new
    if new is not p.module:
        replace_module(model, full_paths, new)
    on_quantized = getattr(calibration, "on_quantized", None)
    if callable(on_quantized):
        on_quantized(p.tower, p.name, new)
    stats = _module_stats(p, full_paths[0], weight, new, packed, kind)
    stats.activations = p.rule.activations.to_dict() if takes_activations(p, new) else None  # type: ignore[union-attr]
    return stats


def takes_activations(p: _Planned, new: nn.Module) -> bool:
    """Does the rule quantize this layer's input? Its ``activations`` apply to the packed linears and pointwise
    convs in the standard storage (the kernels' matmul); other kinds (k x k convs, embedding tables, storage
    variants) keep float inputs under the same rule, which their report record (``activations: None``) shows."""
    return p.rule.activations is not None and isinstance(new, QuantLinear) and \
        type(new)._matmul is QuantLinear._matmul


def _module_stats(p: _Planned, path: str, weight: torch.Tensor, new: Any, packed: Any,
                  kind: str | None = None) -> ModuleQuant:
    cache = getattr(new, "_lowbit_cache", {})
    cached = "weight" in cache
    with torch.no_grad():
        wq = new.effective_weight().reshape(weight.shape)  # [N, K], input_scale folded
        norm = float(weight.norm())
        err = float((weight - wq).norm()) / norm if norm > 0 else float((weight - wq).norm())
    if not cached:  # a float copy made only for this error: the layer stays packed-sized in memory
        cache.pop("weight", None)
    params = weight.numel()
    return ModuleQuant(
        tower=p.tower, name=p.name, path=path, kind=kind or p.kind, method=p.rule.method, bits=packed.bits,
        group_size=packed.group_size, symmetric=packed.symmetric, shape=list(packed.shape), params=params,
        fp32_bytes=4 * params, packed_bytes=packed.nbytes, bits_per_weight=8 * packed.nbytes / params,
        weight_error=err, has_input_scale=getattr(new, "input_scale", None) is not None, rule=p.rule_index,
    )
