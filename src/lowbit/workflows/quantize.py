"""Quantize a loaded model with a recipe (calibrating where a method needs it) and save it packed."""

from __future__ import annotations

import os
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.models.base import DualEncoder
from lowbit.quant.apply import quantize_
from lowbit.quant.calibration import calibration_from_dataset
from lowbit.quant.defaults import DEFAULT_CALIB_SAMPLES
from lowbit.quant.methods import get_method
from lowbit.quant.recipe import Recipe, load_recipe
from lowbit.quant.report import QuantReport
from lowbit.workflows.checkpoint import save_loaded, save_quantized


def quantize(model: DualEncoder, recipe: str | Recipe, calib_data: str = "fashion-mnist",
             calib_samples: int = DEFAULT_CALIB_SAMPLES, strict: bool = False, progress: bool = True) -> QuantReport:
    """Quantize ``model`` in place; calibration data is drawn from ``calib_data`` only when a rule's method
    needs it (GPTQ, AWQ). Returns the report."""
    parsed = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    calibration = None
    if any(rule.spec is not None and get_method(rule.method).needs_calibration for rule in parsed.rules):
        calibration = calibration_from_dataset(model, calib_data, n_samples=calib_samples)
    return quantize_(model, parsed, calibration=calibration, strict=strict, progress=progress)


def save(model: DualEncoder, out_dir: str | os.PathLike[str], report: QuantReport | None = None,
         overwrite: bool = False) -> Path:
    """Write a packed checkpoint (safetensors + architecture + manifest.json) atomically; returns its directory.

    ``report`` is the one ``quantize()`` returned; a model loaded from a packed directory needs none (its
    manifest is kept on it) and saves to the same bytes.
    """
    if report is None and getattr(model, "lowbit_manifest", None) is not None:
        return save_loaded(model, out_dir, overwrite=overwrite)
    if report is None or not report.recipe_spec:
        raise LowbitError("save() needs the QuantReport returned by quantize(); quantize the model first")
    save_quantized(model, report, Recipe.from_dict(report.recipe_spec, name=report.recipe), out_dir,
                   overwrite=overwrite)
    return Path(out_dir)
