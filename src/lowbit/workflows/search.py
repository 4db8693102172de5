"""``lowbit search``: a mixed-precision recipe under a budget (bits per weight, megabytes or kernel ms).

The searched layers are the Linear / 1x1 conv layers the base recipe's main rules (its lowest-width rules, as
``Recipe.with_method`` reads them) quantize; every other rule of the base recipe (embeddings, projector, k x k
convs, skips) is kept as is. Per searched layer and width the sensitivity is measured (``quant.mixed``) once and
cached under ``$LOWBIT_HOME/search/`` keyed by the float weights, method, widths, group size and calibration;
the costs come from the storage table (bytes) and the kernels timed on this machine (ms, batch 1). The chosen
widths are written as a YAML recipe (explicit rules for the layers off the most common width, then the base
recipe with its main rules at that width) with the expected costs and, unless ``measure=False``, the measured
result of quantizing with it for real, saving, loading and running the probe (and ``task``) on the kernels.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.eval.footprint import state_bytes
from lowbit.io import OutputKind, atomic_path, check_output, register_output_kind, write_json
from lowbit.kernels.formats import SUPPORTED_BITS
from lowbit.models.base import DualEncoder
from lowbit.paths import lowbit_home
from lowbit.quant.apply import plan_quantization
from lowbit.quant.calibration import TokenCalibrator
from lowbit.quant.defaults import DEFAULT_CALIB_SAMPLES
from lowbit.quant.methods import get_method
from lowbit.quant.mixed import (
    SEARCHABLE_KINDS,
    SENSITIVITIES,
    DualEncoderProbe,
    InfeasibleBudget,
    LanguageProbe,
    LayerWeights,
    PromptProbe,
    SearchLayer,
    anchored,
    measure_layer_ms,
    measure_sensitivity,
    refine,
    solve,
    summarize,
)
from lowbit.quant.primitives import QuantSpec
from lowbit.quant.recipe import Recipe, Rule, load_recipe
from lowbit.workflows.quantize import calibration_provider, default_calibration, quantize

HEADER = "# lowbit search"
register_output_kind(OutputKind("search-recipe", is_dir=False, recognize=lambda p: _is_search_recipe(p)))
CACHE_VERSION = 1
DEFAULT_WIDTHS = (2, 3, 4, 8)
DEFAULT_OPTIONS = {"gptq": {"act_order": True, "clip_search": True}}  # as the presets
MB = 10**6


def _is_search_recipe(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(HEADER)) == HEADER.encode()
    except OSError:
        return False


def main_rule_indices(recipe: Recipe) -> set[int]:
    """Indices of the base recipe's main rules: its non-skip rules for linear / conv1x1 layers of the lowest width
    (what a search re-widths; embedding-only and k x k conv rules stay as they are)."""
    def matmul(r: Rule) -> bool:
        return r.spec is not None and (r.kinds is None or bool(set(r.kinds) & set(SEARCHABLE_KINDS)))

    widths = [r.spec.bits for r in recipe.rules if matmul(r)]  # type: ignore[union-attr]
    if not widths:
        raise LowbitError(f"base recipe {recipe.name!r} has no rule for linear / conv1x1 layers to search; accepted: "
                          "a recipe with one (e.g. w4)")
    return {i for i, r in enumerate(recipe.rules) if matmul(r) and r.spec.bits == min(widths)}  # type: ignore


def searched_layers(model: nn.Module, base: Recipe) -> list[Any]:
    """The planned layers (``plan_quantization``) a search chooses widths for."""
    mains = main_rule_indices(base)
    planned, _, _ = plan_quantization(model, base)
    layers = [p for p in planned if p.rule_index in mains and p.kind in SEARCHABLE_KINDS and p.tied_to is None]
    if not layers:
        raise LowbitError(f"base recipe {base.name!r} leaves no linear / conv1x1 layer to search (its main rules: "
                          f"{', '.join(base.rules[i].describe() for i in sorted(mains))})")
    return layers


def _glob_literal(name: str) -> str:
    """``name`` as an fnmatch pattern matching only itself."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def mixed_recipe(base: Recipe, layers: Sequence[SearchLayer], chosen: Sequence[int], method: str,
                 group_size: int | None, options: dict[str, Any], name: str) -> Recipe:
    """Explicit rules for the layers off the most common width, then ``base`` with its main rules at it."""
    params: dict[int, int] = {}
    for layer, i in zip(layers, chosen, strict=False):
        params[layer.choices[i].bits] = params.get(layer.choices[i].bits, 0) + layer.params
    common = max(sorted(params), key=lambda b: params[b])
    rules: list[Rule] = []
    for layer, i in zip(layers, chosen, strict=False):
        bits = layer.choices[i].bits
        if bits != common:
            rules.append(Rule(layer.tower, _glob_literal(layer.name), method, QuantSpec(bits, group_size, True),
                              dict(options), kinds=(layer.kind,)))
    uniform = uniform_recipe(base, common, method, group_size, options, name)
    return Recipe(tuple(rules) + uniform.rules, name=name, float_dtype=base.float_dtype)


def uniform_recipe(base: Recipe, bits: int, method: str, group_size: int | None, options: dict[str, Any],
                   name: str) -> Recipe:
    """``base`` with its main rules at ``bits`` by ``method``: what a search writes when every searched layer takes
    one width (a search's uniform baseline, with nothing to measure)."""
    mains = main_rule_indices(base)
    rules = tuple(replace(r, method=method, spec=QuantSpec(bits, group_size, True), options=dict(options))
                  if i in mains else r for i, r in enumerate(base.rules))
    return Recipe(rules, name=name, float_dtype=base.float_dtype)


def _model_digest(model: nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    for key, t in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _prompt_inputs(model: Any, probe_data: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt embeddings and mask of ``n`` image + question prompts of the VQA set ``probe_data``'s
    *train* split (evaluation reads its test split: the probe never sees an evaluated question), in the model's
    chat format, the visual tokens computed once."""
    from lowbit.data.vqa import load_vqa

    if not (hasattr(model, "prompt_embeddings") and hasattr(model, "visual_embeddings")):
        raise LowbitError(f"probe_data {probe_data!r} (image + question prompts) needs a llava model; this is a "
                          f"{type(model).__name__}; accepted: probe_data=None")
    data = load_vqa(probe_data, "train", limit=n, seed=seed)
    with torch.no_grad():
        visual = model.visual_embeddings(model.preprocess(data.images))
        return model.prompt_embeddings(visual, [turns[0].question for turns in data.turns])


def _probe(model: nn.Module, provider: Any, n: int, probe_data: str | None = None, seed: int = 0) -> Any:
    """The probe of ``model``: on ``probe_data``'s image + question prompts (``PromptProbe``) if given, else on
    the first ``n`` calibration samples (a language model: the first batch of token windows)."""
    if probe_data is not None:
        embeds, mask = _prompt_inputs(model, probe_data, n, seed)
        return PromptProbe(model.language, embeds, mask)  # type: ignore[arg-type]
    if isinstance(provider, TokenCalibrator):
        return LanguageProbe(getattr(model, "language", model), provider.token_batches()[0])
    towers = model.towers() if isinstance(model, DualEncoder) else {}
    if "language" in towers and getattr(provider, "texts", None):  # a llava: its LM on the calibration texts
        return LanguageProbe(towers["language"], model.tokenize(provider.texts[:n]))
    if isinstance(model, DualEncoder) and getattr(provider, "images", None) and getattr(provider, "texts", None):
        return DualEncoderProbe(model, model.preprocess(provider.images[:n]), model.tokenize(provider.texts[:n]))
    raise LowbitError(f"search measures sensitivity on a dual encoder (images and texts) or a causal language "
                      f"model; this is a {type(model).__name__}")


def _fixed_bytes(model: nn.Module, base: Recipe, layers: Sequence[SearchLayer]) -> int:
    """Stored bytes of everything but the searched layers' packed weights: the model quantized by RTN with the
    base recipe (the bytes do not depend on the method), minus those layers' bytes."""
    rtn = Recipe(tuple(replace(r, method="rtn", options={}) if r.spec is not None else r for r in base.rules),
                 name="rtn", float_dtype=base.float_dtype)
    quant = copy.deepcopy(model)
    report = quantize(quant, rtn, progress=False)
    searched = {(layer.tower, layer.name) for layer in layers}
    inside = sum(m.packed_bytes for m in report.modules if (m.tower, m.name) in searched)
    total = state_bytes(quant, torch.float16 if base.float_dtype == "fp16" else None)
    return int(total - inside)


def _cost_budget(budget_bits: float | None, budget_mb: float | None, budget_ms: float | None
                 ) -> tuple[str, float]:
    given = [(m, v) for m, v in (("bits", budget_bits), ("bytes", budget_mb), ("ms", budget_ms)) if v is not None]
    if len(given) != 1:
        raise LowbitError("search takes exactly one budget; accepted: budget_bits (average bits per searched weight),"
                          " budget_mb (megabytes of tensors, 10^6 bytes) or budget_ms (kernel ms at batch 1)")
    metric, value = given[0]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or value == float("inf"):
        raise LowbitError(f"search budget {value!r}; accepted: a positive finite number")
    return metric, float(value)


def _check_widths(widths: Sequence[int]) -> tuple[int, ...]:
    out = tuple(sorted(set(widths)))
    bad = [w for w in out if isinstance(w, bool) or not isinstance(w, int) or w not in SUPPORTED_BITS]
    if bad or len(out) < 1:
        raise LowbitError(f"search widths {list(widths)!r}; accepted: a non-empty subset of "
                          f"{','.join(map(str, SUPPORTED_BITS))}")
    return out


def sensitivities(model: nn.Module, base: Recipe, method: str, widths: Sequence[int], group_size: int | None,
                  options: dict[str, Any], calib_data: Any, calib_samples: int, probe_samples: int, seed: int,
                  timings: bool = True, cache: bool = True, cache_dir: str | os.PathLike[str] | None = None,
                  progress: bool = False, probe_data: str | None = None, sensitivity: str = "kl",
                  keep: dict[str, Any] | None = None) -> tuple[list[SearchLayer], dict[str, Any]]:
    """The searched layers with their measured choices, and the cache record (``cached``: read from disk).
    ``keep``, when given and the sensitivities are measured here, receives the probe and the quantized weights
    (``LayerWeights``) so a refinement need not make them again."""
    planned = searched_layers(model, base)
    source = calib_data if calib_data is not None else default_calibration(model)
    key_fields = {"version": CACHE_VERSION, "model": _model_digest(model), "method": method, "options": options,
                  "widths": list(widths), "group_size": group_size, "calibration": str(source),
                  "calib_samples": calib_samples, "probe_samples": probe_samples, "seed": seed,
                  "layers": [f"{p.tower}/{p.name}" for p in planned], "base": base.to_dict()}
    if probe_data is not None or sensitivity != "kl":  # only then: the keys of earlier caches stay valid
        key_fields.update(probe_data=probe_data, sensitivity=sensitivity)
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True, default=str).encode()).hexdigest()[:24]
    path = Path(cache_dir or lowbit_home() / "search") / f"{key}.json"
    if cache and path.is_file():
        data = json.loads(path.read_text())
        layers = [SearchLayer.from_dict(d) for d in data["layers"]]
        if not timings or all(c.ms is not None for layer in layers for c in layer.choices if layer.input_shape):
            return layers, {**data["record"], "cached": True, "cache_file": str(path)}
    provider, calib_record = calibration_provider(model, source, calib_samples, seed)
    probe = _probe(model, provider, probe_samples, probe_data, seed)
    say = print if progress else None
    weights = LayerWeights(planned, widths, method, group_size, options, provider, progress=say)
    layers = measure_sensitivity(planned, probe, provider, widths, method, group_size, options, progress=say,
                                 sensitivity=sensitivity, weights=weights)
    if keep is not None:
        keep.update(probe=probe, weights=weights)
    if timings:
        by_name = {(p.tower, p.name): p for p in planned}
        for layer in layers:
            if layer.input_shape is None:
                continue  # never ran on the probe's inputs: no cost to measure
            p = by_name[(layer.tower, layer.name)]
            for c in layer.choices:
                c.ms = measure_layer_ms(p.module, p.kind, layer.input_shape, QuantSpec(c.bits, group_size, True))
    record = {"key": key, "calibration": calib_record, "probe": type(probe).__name__,
              "probe_samples": probe_samples, "probe_data": probe_data, "sensitivity": sensitivity,
              "fixed_bytes": _fixed_bytes(model, base, layers),
              "threads": torch.get_num_threads()}
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"key_fields": key_fields, "record": record, "layers": [la.to_dict() for la in layers]})
    return layers, {**record, "cached": False, "cache_file": str(path) if cache else None}


def _measured(model: nn.Module, recipe: Recipe, calib_data: Any, calib_samples: int, seed: int,
              probe_samples: int, task: str | None, limit: int | None, save_dir: Path,
              probe_data: str | None = None) -> dict[str, Any]:
    """Quantize a copy with ``recipe`` for real, save, load from disk and measure on the kernels."""
    from lowbit.eval.report import whole_bytes
    from lowbit.eval.tasks import evaluate
    from lowbit.workflows.load import load
    from lowbit.workflows.quantize import save

    quant = copy.deepcopy(model)
    report = quantize(quant, recipe, calib_data, calib_samples=calib_samples, progress=False, seed=seed)
    save(quant, save_dir, report=report)
    del quant
    packed = load(str(save_dir))
    source = calib_data if calib_data is not None else default_calibration(model)
    provider, _ = calibration_provider(model, source, calib_samples, seed)
    probe = _probe(model, provider, probe_samples, probe_data, seed)
    probe.model = packed if isinstance(probe, DualEncoderProbe) else probe.model
    if isinstance(probe, (LanguageProbe, PromptProbe)):
        probe.lm = getattr(packed, "language", packed)
    if isinstance(probe, PromptProbe):  # the packed model's own visual tokens (its vision tower is quantized too)
        probe.embeds, probe.mask = _prompt_inputs(packed, probe_data, probe_samples, seed)  # type: ignore[arg-type]
    out: dict[str, Any] = {"probe_loss": probe.loss("*"), "bits_per_weight": report.totals()["total"].get(
        "bits_per_weight")}
    if task is not None:
        reference = evaluate(model, task, limit=limit, progress=False, footprint=False)
        result = evaluate(packed, task, limit=limit, reference=reference, progress=False, checkpoint_dir=save_dir)
        metrics, ref = result.get("metrics") or {}, reference.get("metrics") or {}
        key = next((k for k in ("top1", "accuracy", "i2t_r1") if k in metrics), None)
        out.update(task=task, limit=limit, metric=key, value=metrics.get(key), float_value=ref.get(key),
                   file_bytes=whole_bytes(result.get("footprint") or {}))
        if key is not None and ref.get(key) is not None:
            out["drop_pt"] = round(100 * (ref[key] - metrics[key]), 2)
    return out


def search(model: str | nn.Module, budget_bits: float | None = None, budget_mb: float | None = None,
           budget_ms: float | None = None, task: str | None = None, method: str = "gptq",
           widths: Sequence[int] = DEFAULT_WIDTHS, group_size: int | None = 32, base: str | Recipe = "w4",
           calib_data: Any = None, calib_samples: int = DEFAULT_CALIB_SAMPLES, probe_samples: int = 64,
           seed: int = 0, limit: int | None = None, out: str | os.PathLike[str] | None = None,
           overwrite: bool = False, measure: bool = True, cache: bool = True,
           cache_dir: str | os.PathLike[str] | None = None, progress: bool = False, probe_data: str | None = None,
           sensitivity: str = "kl", refine_measures: int = 0) -> dict[str, Any]:
    """Search a mixed-precision recipe under one budget; returns the result (recipe dict, expected costs,
    measured result) and writes the YAML recipe to ``out`` if given (see the module docstring).

    ``probe_data``: a VQA set (``fashion-vqa``, ``shapes-vqa``) whose train-split image + question prompts a
    llava's probe runs (next-token KL after each prompt) instead of the calibration captions. ``sensitivity``:
    ``kl`` (measured, one probe run per layer and width) or ``fisher`` (the probe's diagonal Fisher, one pass).
    ``refine_measures``: if > 0, at most this many measurements of whole assignments on the probe
    (``quant.mixed.refine``: the better of the knapsack and the widest uniform recipe in budget, then moves
    accepted only when the measured loss falls)."""
    metric, budget = _cost_budget(budget_bits, budget_mb, budget_ms)
    widths = _check_widths(widths)
    if sensitivity not in SENSITIVITIES:
        raise LowbitError(f"search sensitivity {sensitivity!r}; accepted: {', '.join(SENSITIVITIES)}")
    if isinstance(refine_measures, bool) or not isinstance(refine_measures, int) or refine_measures < 0:
        raise LowbitError(f"search refine_measures {refine_measures!r}; accepted: an integer >= 0 (0: no refinement)")
    if probe_data is not None:
        from lowbit.data.vqa import VQA_SETS

        VQA_SETS.get(probe_data)
    get_method(method)
    if out is not None:
        check_output(out, "search-recipe", overwrite=overwrite, sources=[model if isinstance(model, str) else None])
    if task is not None:
        from lowbit.eval.tasks import check_task_and_data

        check_task_and_data(task)
    name = model if isinstance(model, str) else type(model).__name__
    if isinstance(model, str):
        from lowbit.workflows.load import load

        model = load(model)
    base_recipe = load_recipe(base)
    options = dict(DEFAULT_OPTIONS.get(method, {}))
    keep: dict[str, Any] = {}
    layers, record = sensitivities(model, base_recipe, method, widths, group_size, options, calib_data,
                                   calib_samples, probe_samples, seed, timings=True, cache=cache, cache_dir=cache_dir,
                                   progress=progress, probe_data=probe_data, sensitivity=sensitivity, keep=keep)
    params = sum(layer.params for layer in layers)
    fixed = record["fixed_bytes"]
    total = {"bits": budget * params, "bytes": budget * MB - fixed, "ms": budget}[metric]
    try:
        chosen = solve(layers, metric, total)
    except InfeasibleBudget as err:
        smallest = {"bits": err.smallest / params, "bytes": (err.smallest + fixed) / MB, "ms": err.smallest}[metric]
        unit = {"bits": "bits per searched weight", "bytes": "MB", "ms": "ms"}[metric]
        raise LowbitError(f"budget {budget:g} {unit} cannot be met; the smallest feasible budget is "
                          f"{_ceil(smallest):g} {unit} (every searched layer at its cheapest width, "
                          f"w{min(widths)})") from None
    refinement = None
    if refine_measures:
        chosen, refinement = _refine(model, base_recipe, layers, chosen, metric, total, keep, method, widths,
                                     group_size, options, calib_data, calib_samples, probe_samples, seed, probe_data,
                                     refine_measures, progress)
    label = {"bits": f"{budget:g} bits", "bytes": f"{budget:g} MB", "ms": f"{budget:g} ms"}[metric]
    recipe = mixed_recipe(base_recipe, layers, chosen, method, group_size, options, f"search {name} {label}")
    expected = summarize(layers, chosen)
    expected["tensor_bytes"] = expected["bytes"] + fixed
    result: dict[str, Any] = {
        "model": name, "budget": {"metric": metric, "value": budget, "searched_total": total},
        "method": method, "widths": list(widths), "group_size": group_size, "base": base_recipe.name,
        "expected": expected, "sensitivity": record, "recipe": recipe.to_dict(),
        "layers": [{"tower": la.tower, "name": la.name, "params": la.params, "bits": la.choices[i].bits}
                   for la, i in zip(layers, chosen, strict=False)],
    }
    if refinement is not None:
        result["refinement"] = refinement
    if measure:
        with tempfile.TemporaryDirectory(prefix="lowbit-search-") as tmp:
            result["measured"] = _measured(model, recipe, calib_data, calib_samples, seed, probe_samples, task,
                                           limit, Path(tmp) / "packed", probe_data)
    if out is not None:
        write_recipe(result, out)
    return result


def _refine(model: nn.Module, base: Recipe, layers: list[SearchLayer], chosen: list[int], metric: str,
            total: float, keep: dict[str, Any], method: str, widths: Sequence[int], group_size: int | None,
            options: dict[str, Any], calib_data: Any, calib_samples: int, probe_samples: int, seed: int,
            probe_data: str | None, measures: int, progress: bool) -> tuple[list[int], dict[str, Any]]:
    """``quant.mixed.refine`` from the knapsack's answer and the widest uniform assignment in budget, each
    assignment measured with the layers' quantized weights in place (made now if the sensitivities came from the
    cache); prompt probes measure on held-out prompts of the same split."""
    if "weights" not in keep:
        source = calib_data if calib_data is not None else default_calibration(model)
        provider, _ = calibration_provider(model, source, calib_samples, seed)
        keep.update(probe=_probe(model, provider, probe_samples, probe_data, seed),
                    weights=LayerWeights(searched_layers(model, base), widths, method, group_size, options, provider))
    probe, weights = keep["probe"], keep["weights"]
    # the assignments are measured on held-out probe prompts (the next ``probe_samples`` of the same train split):
    # moves are ranked on the probe's own prompts, so a move kept fits more than the prompts that proposed it
    check = probe
    if probe_data is not None:
        embeds, mask = _prompt_inputs(model, probe_data, 2 * probe_samples, seed)
        check = PromptProbe(probe.lm, embeds[probe_samples:], mask[probe_samples:])
    names, starts = ["knapsack"], [chosen]
    for w in sorted(widths, reverse=True):  # the widest uniform assignment in budget
        uniform = [next(i for i, c in enumerate(layer.choices) if c.bits == w) for layer in layers]
        if math.fsum(layer.cost(i, metric) for layer, i in zip(layers, uniform, strict=True)) <= total:
            names.append(f"uniform w{w}")
            starts.append(uniform)
            break

    def rank(assignment: list[int]) -> list[SearchLayer]:
        """Moves from the kept start ranked by the loss's change around it (``anchored``: the gradient there)."""
        if not hasattr(probe, "gradient"):
            return layers
        planned = [p.module.weight for p in weights.planned]
        if weights.fisher is None:
            weights.fisher = [f.float() for f in probe.fisher(planned)]
        bits = [layer.choices[i].bits for layer, i in zip(layers, assignment, strict=True)]
        weights.apply(bits)
        return anchored(layers, weights, bits, probe.gradient(planned), weights.fisher)

    def measure(assignment: list[int]) -> float:
        weights.apply([layer.choices[i].bits for layer, i in zip(layers, assignment, strict=True)])
        return check.loss("*")

    c0 = time.process_time()
    try:
        best, record = refine(layers, starts, metric, total, measure, measures, progress=print if progress else None,
                              rank=rank)
    finally:
        weights.restore()
    record.update(cpu_seconds=round(time.process_time() - c0, 1), probe=type(probe).__name__,
                  probe_data=probe_data, starts=names, measured_on=(
                      f"held-out probe prompts ({probe_data} train split, samples {probe_samples}.."
                      f"{2 * probe_samples - 1})" if probe_data is not None else "the probe"))
    return best, record


def _ceil(x: float, digits: int = 4) -> float:
    """``x`` rounded up at ``digits`` decimals (a smallest budget that still fits when typed back)."""
    return math.ceil(x * 10**digits - 1e-9) / 10**digits


def write_recipe(result: dict[str, Any], out: str | os.PathLike[str]) -> None:
    """The recipe as YAML under a comment header of the expected costs and the measured result."""
    import yaml

    e, b = result["expected"], result["budget"]
    lines = [f"{HEADER}: {result['model']}, budget {b['value']:g} {b['metric']} ({result['method']}, widths "
             f"{','.join(map(str, result['widths']))}, groups of {result['group_size']}, base {result['base']})",
             f"# expected: {e['avg_bits']:.4f} bits per searched weight over {e['layers']} layers "
             f"({e['params']} weights), {e['bytes']} bytes of them, {e['tensor_bytes']} bytes of tensors in all, "
             f"{'?' if e['ms'] is None else format(e['ms'], '.3f')} kernel ms at batch 1; predicted probe loss "
             f"{e['predicted_loss']:.4g}; weights by width {e['params_by_width']}",
             f"# sensitivity: {result['sensitivity'].get('probe')} over {result['sensitivity'].get('probe_samples')} "
             f"samples, calibration {json.dumps(result['sensitivity'].get('calibration'))}"]
    if "measured" in result:
        lines.append(f"# measured after save + load on the kernels: {json.dumps(result['measured'])}")
    recipe = result["recipe"]
    head = {k: v for k, v in recipe.items() if k != "rules"}
    body = yaml.safe_dump(head, sort_keys=False) + "rules:\n" + "".join(  # one rule a line, as the presets
        f"  - {yaml.safe_dump(r, sort_keys=False, default_flow_style=True, width=10**6).strip()}\n"
        for r in recipe["rules"])
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(lines) + "\n" + body)
