"""The verbs users call: ``load``, ``evaluate``, ``quantize``, ``save``, ``sweep``, ``build``, ``demo``, ``chat``.

Each is a plain function over the rooms (models, data, quant, eval, kernels); the CLI only parses arguments.
Heavy rooms are imported inside the functions so ``import lowbit`` stays light.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowbit.errors import LowbitError
from lowbit.quant.defaults import DEFAULT_CALIB_SAMPLES

if TYPE_CHECKING:
    from lowbit.models.base import DualEncoder
    from lowbit.quant.recipe import Recipe
    from lowbit.quant.report import QuantReport


def load(name_or_path: str, **options: Any) -> DualEncoder:
    """Load a model: built-in name (``lit-fashion``), CLIP/SigLIP directory, or lowbit quantized directory.

    Example:
        >>> import lowbit
        >>> model = lowbit.load("lit-fashion")  # doctest: +SKIP
    """
    from lowbit.models import load_model

    return load_model(name_or_path, **options)


def evaluate(model: DualEncoder, task: str, **options: Any) -> dict[str, Any]:
    """Evaluate ``model`` on a registered task; returns the JSON-ready result (see ``lowbit.eval``).

    Example:
        >>> result = lowbit.evaluate(model, "fashion-mnist", limit=1000)  # doctest: +SKIP
        >>> result["metrics"]["top1"]  # doctest: +SKIP
    """
    from lowbit.eval import evaluate as run

    return run(model, task, **options)


def quantize(
    model: DualEncoder,
    recipe: str | Recipe,
    calib_data: str = "fashion-mnist",
    calib_samples: int = DEFAULT_CALIB_SAMPLES,
    strict: bool = False,
    progress: bool = True,
) -> QuantReport:
    """Quantize ``model`` in place with a recipe (preset, YAML path or short string); returns the report.

    Calibration data (images for the vision tower, captions for the text tower) is drawn from ``calib_data``
    only when a rule's method needs it (GPTQ, AWQ).

    Example:
        >>> report = lowbit.quantize(model, "vision=w4g64:gptq,text=w4g64:gptq,projector=w8")  # doctest: +SKIP
    """
    from lowbit.quant.apply import quantize_
    from lowbit.quant.methods import get_method
    from lowbit.quant.recipe import Recipe, load_recipe

    parsed = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    calibration = None
    if any(rule.spec is not None and get_method(rule.method).needs_calibration for rule in parsed.rules):
        from lowbit.quant.calibration import calibration_from_dataset

        calibration = calibration_from_dataset(model, calib_data, n_samples=calib_samples)
    report = quantize_(model, parsed, calibration=calibration, strict=strict, progress=progress)
    return report


def save(model: DualEncoder, out_dir: str | os.PathLike[str], report: QuantReport | None = None) -> Path:
    """Write a packed checkpoint (safetensors + manifest.json) atomically; returns its directory."""
    from lowbit.checkpoint import save_quantized
    from lowbit.quant.recipe import Recipe

    if report is None or not report.recipe_spec:
        raise LowbitError("save() needs the QuantReport returned by quantize(); quantize the model first")
    save_quantized(model, report, Recipe.from_dict(report.recipe_spec, name=report.recipe), out_dir)
    return Path(out_dir)


def sweep(model_name: str, recipes: list[str], methods: list[str], task: str, out_dir: str | os.PathLike[str],
          **options: Any) -> list[dict[str, Any]]:
    """Quantize with every recipe x method, evaluate each against the float model, write JSON/Markdown/PNG.

    Example:
        >>> rows = lowbit.sweep("lit-fashion", ["w4"], ["rtn", "gptq"], "fashion-mnist", "out/s")  # doctest: +SKIP
    """
    from lowbit.sweep import sweep as run

    return run(model_name, recipes, methods, task, out_dir, **options)


def qat(model_name: str, recipe: str, out_dir: str | os.PathLike[str], **options: Any) -> dict[str, Any]:
    """Quantization-aware training with distillation from the float model; writes a packed model to OUT/model.

    ``options`` are the fields of ``lowbit.train.qat.QATArgs`` (data, steps, lr, batch_size, distill, ...).

    Example:
        >>> lowbit.qat("lit-fashion", "text=w1:binary", "out/qat", steps=150)  # doctest: +SKIP
    """
    from lowbit.train.qat import QATArgs, run_qat

    return run_qat(QATArgs(model=model_name, recipe=recipe, out=str(out_dir), **options))


def build(name: str = "lit-fashion", out: str | os.PathLike[str] | None = None, seed: int = 0,
          steps: int | None = None, **options: Any) -> dict[str, Any]:
    """Re-train the trained parts of a built-in model (``lowbit.models.builders``); returns the build log.

    ``lit-fashion`` options: ``n_train``, ``n_test``; ``llava-fashion(-hd)``: ``run_dir`` (checkpoints; resumes).
    """
    import inspect

    from lowbit.models.builders import BUILDERS

    builder = BUILDERS.get(name)
    accepted = [p for p in inspect.signature(builder).parameters if p not in ("out", "seed", "steps")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise LowbitError(f"build {name!r} does not take {', '.join(unknown)}; accepted options: "
                          f"{', '.join(accepted) or '(none)'}")
    return builder(out=out, seed=seed, steps=steps, **options)


def bench_kernels(json_path: str | os.PathLike[str] | None = None, quick: bool = False) -> list[dict[str, Any]]:
    """Time every packed format against torch and ONNX Runtime baselines, interleaved in one run.

    ``quick`` times two shapes at M in {1, 16} with few repeats (a smoke run); the full run takes minutes.
    """
    from lowbit.kernels.bench import run_kernel_bench

    if quick:
        return run_kernel_bench(shapes=[(768, 768), (4096, 4096)], ms=[1, 16], repeats=5, json_path=json_path,
                                budget_s=3.0)
    return run_kernel_bench(json_path=json_path)


def bench_model(name_or_path: str, batch_sizes: tuple[int, ...] = (1, 32), optimize: bool = False,
                act_block: int | str | None = None) -> dict[str, Any]:
    """End-to-end latency of a model; for a packed checkpoint also of its float source, with the ratio.

    ``optimize`` loads both with ``optimize=True`` (``lowbit.kernels.inference.optimize_for_inference_``: BatchNorm
    folding, the depthwise kernel, fused activations), so the ratio compares like with like. ``act_block``: the
    packed layers' activation quantization blocks (``lowbit.kernels.quant_linear.set_act_block``).

    Example:
        >>> lowbit.bench_model("out/w4")["speedup"]["image_ms_b32"]  # doctest: +SKIP
    """
    from lowbit.data import resolve_dataset
    from lowbit.eval.footprint import measure_footprint

    data = resolve_dataset("fashion-mnist", split="test", limit=32)
    texts = [t.format(c) for c in (data.classnames or []) for t in data.templates][:32]
    model = load(name_or_path, optimize=optimize, act_block=act_block)
    packed_dir = model.source.get("checkpoint")
    result: dict[str, Any] = {
        "model": name_or_path, "task": "bench", "optimized": optimize, "act_block": act_block,
        "footprint": measure_footprint(model, data.images, texts, checkpoint=packed_dir, batch_sizes=batch_sizes),
    }
    float_source = model.source.get("float_source")
    if float_source:
        reference = load(float_source["name"], **{**float_source.get("options", {}), "optimize": optimize})
        ref = measure_footprint(reference, data.images, texts, batch_sizes=batch_sizes)
        result["float_footprint"] = ref
        result["speedup"] = {k: ref[k] / result["footprint"][k] for k in ref
                             if k.endswith(tuple(f"_b{b}" for b in batch_sizes)) and result["footprint"].get(k)}
    return result


def chat(model: Any, image: Any, question: str, **options: Any) -> str:
    """Answer ``question`` about ``image`` (PIL image, path or bytes) with a generative (llava) model.

    ``model`` is a loaded model or a name/directory; ``options``: ``max_new_tokens``, ``do_sample``,
    ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stream`` (a callable receiving text pieces), ``use_cache``.

    Example:
        >>> lowbit.chat("llava-fashion-hd", "shoe.png", "What is this item?")  # doctest: +SKIP
        'sneaker'
    """
    from lowbit.models.llava import LlavaModel
    from lowbit.models.llava_generate import generate

    loaded = load(model) if isinstance(model, str) else model
    if not isinstance(loaded, LlavaModel):
        kind = getattr(loaded, "family", type(loaded).__name__)
        raise LowbitError(f"chat needs a generative model; received a {kind!r} model; accepted: llava-fashion-hd, "
                          "llava-fashion, a Llava checkpoint directory or a quantized llava model")
    return generate(loaded, image, question, **options)


def list_models() -> list[dict[str, str]]:
    """Built-in models, quantized checkpoints cached under ``$LOWBIT_HOME/models``, and families."""
    from lowbit.models import FAMILIES, builtin_models
    from lowbit.paths import lowbit_home

    rows = [{"name": n, "kind": "built-in", "description": FAMILIES.get(f).description}
            for n, f in sorted(builtin_models().items())]
    for manifest in sorted((lowbit_home() / "models").glob("*/manifest.json")):
        rows.append({"name": str(manifest.parent), "kind": "cached", "description": "lowbit packed checkpoint"})
    rows += [{"name": f"{f}:<name or dir>", "kind": "family", "description": FAMILIES.get(f).description}
             for f in FAMILIES]
    return rows


def demo(limit: int | None = None, out_dir: str | None = None) -> list[dict[str, Any]]:
    """The main job: the default model on Fashion-MNIST (zero-shot) and shapes (retrieval)."""
    model = load("lit-fashion")
    results = [evaluate(model, "fashion-mnist", limit=limit), evaluate(model, "shapes", limit=limit,
                                                                        footprint=False)]
    if out_dir:
        from lowbit.eval.report import write_report

        write_report(results, Path(out_dir))
    return results
