"""Quantize a model with a recipe (calibrating where a method needs it) and save it packed.

``quantize`` takes a lowbit model (a ``DualEncoder``: towers, preprocess, tokenize) or any ``nn.Module`` (one
tower, ``model``). Calibration data, only drawn when a rule's method needs it (GPTQ, AWQ), comes from
``calibration``: a ``CalibrationProvider``, example inputs of a bare module (tensors, tuples, mappings), or a
dataset spec of ``lowbit.data.resolve_dataset`` for a lowbit model. Given none, a lowbit model calibrates on its
family's declared set (``FamilySpec.calibration_data``: Fashion-MNIST only for the models built on it), a
language model on text it samples itself (data-free, LLM-QAT style, in its chat template), any other on the
domain-general generated scenes (``DEFAULT_IMAGE_CALIBRATION``); what was used is recorded in the report (and so
in the manifest). A language model also takes a text file, chat JSONL or captions.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.data import resolve_dataset
from lowbit.data.text import is_text_data, read_text_items
from lowbit.errors import LowbitError
from lowbit.models.base import DualEncoder
from lowbit.models.causal_lm import CausalLM, self_generated_windows, token_windows
from lowbit.models.spec import family_calibration_data
from lowbit.quant.act_calibration import STATIC_ACTIVATIONS
from lowbit.quant.apply import plan_quantization, quantize_
from lowbit.quant.calibration import ModuleCalibrator, TokenCalibrator, calibration_from_dataset
from lowbit.quant.defaults import (
    DEFAULT_CALIB_SAMPLES,
    DEFAULT_IMAGE_CALIBRATION,
    LM_CALIB_SEQUENCES,
    LM_CALIB_TOKENS,
    SELF_GENERATED,
)
from lowbit.quant.methods import get_method
from lowbit.quant.recipe import Recipe, load_recipe
from lowbit.quant.report import QuantReport
from lowbit.workflows.checkpoint import save_imported, save_loaded, save_quantized

Calibration = Any  # a CalibrationProvider, example inputs (a tensor or a sequence of them) or a dataset spec


def calibrated_methods(model: nn.Module, recipe: Recipe) -> list[str]:
    """The methods needing calibration data that ``recipe`` applies to some layer of ``model`` (a preset's GPTQ
    rule for convs costs a model without convs no calibration)."""
    planned, _, _ = plan_quantization(model, recipe)
    methods = {p.rule.method for p in planned if get_method(p.rule.method).needs_calibration}
    if any(p.rule.activations is not None and not p.rule.activations.dynamic for p in planned):
        methods.add(STATIC_ACTIVATIONS)  # calibrated scales (lowbit.quant.act_calibration)
    if recipe.attention is not None:
        methods.add(f"attention={recipe.attention.short()}")  # q/k/v scales, calibrated too
    return sorted(methods)


def default_calibration(model: nn.Module) -> str | None:
    """The calibration set used when none is given: the family's own, else text the model samples itself for a
    language model (``SELF_GENERATED``), else the domain-general image set for a lowbit model; None for a bare
    module (it has no preprocessing to feed a dataset through)."""
    declared = family_calibration_data(model)
    if declared is not None:
        return declared
    if isinstance(model, CausalLM):
        return SELF_GENERATED
    return DEFAULT_IMAGE_CALIBRATION if isinstance(model, DualEncoder) else None


def _language_calibration(model: CausalLM, source: str, n_samples: int, seed: int) -> tuple[Any, dict[str, Any]]:
    """Token windows of ``LM_CALIB_TOKENS`` from the model itself, a text / chat-JSONL file, or a dataset's
    captions."""
    n = min(n_samples, LM_CALIB_SEQUENCES)
    if source == SELF_GENERATED:
        windows = self_generated_windows(model, n, LM_CALIB_TOKENS, seed)
        kind = "self-generated (chat template)" if getattr(model.tokenizer, "chat_template", None) else \
            "self-generated"
    elif is_text_data(source):
        windows = token_windows(model, read_text_items(source), n, LM_CALIB_TOKENS)
        kind = "texts"
    else:
        data = resolve_dataset(source, split="train", limit=n_samples)
        if not data.captions:
            raise LowbitError(f"calibration data {source!r} has no text for a language model; accepted: a .txt file, "
                              "chat JSONL, captions (CSV/JSONL, shards), or none (the model's own samples)")
        windows = token_windows(model, data.captions, n, LM_CALIB_TOKENS)
        kind = "captions"
    record = {"source": source, "kind": kind, "samples": len(windows), "tokens": int(sum(w.numel() for w in windows)),
              "seed": seed}
    return TokenCalibrator(model, windows, seed=seed), record


def calibration_provider(model: nn.Module, calibration: Calibration, n_samples: int = DEFAULT_CALIB_SAMPLES,
                         seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """(provider, record of what it calibrates on) for ``calibration`` given to ``quantize``."""
    if hasattr(calibration, "stats_for"):
        return calibration, {"source": type(calibration).__name__, "kind": "provider"}
    if isinstance(calibration, (str, os.PathLike)) and isinstance(model, CausalLM):
        return _language_calibration(model, os.fspath(calibration), n_samples, seed)
    if isinstance(calibration, (str, os.PathLike)):
        if not isinstance(model, DualEncoder):
            raise LowbitError(f"calibration {os.fspath(calibration)!r} is a dataset, which calibrates a lowbit model "
                              f"(it preprocesses images and tokenizes texts); this is a {type(model).__name__}; "
                              "accepted for any module: example inputs (a tensor, or a list of tensors, tuples or "
                              "dicts of model(...) arguments)")
        provider = calibration_from_dataset(model, os.fspath(calibration), n_samples=n_samples, seed=seed)
        kind = "+".join(k for k, v in (("images", provider.images), ("texts", provider.texts)) if v)
        return provider, {"source": os.fspath(calibration), "kind": kind, "samples": max(
            len(provider.images), len(provider.texts)), "seed": seed}
    if isinstance(calibration, (torch.Tensor, dict)):
        inputs: Sequence[Any] = [calibration]  # one batch
    elif isinstance(calibration, (list, tuple)):
        inputs = calibration  # batches, each a tensor, a tuple of arguments or a mapping of keyword arguments
    else:
        raise LowbitError(f"calibration of type {type(calibration).__name__} is not understood; accepted: a dataset "
                          "name or path, a tensor, a list of tensors / tuples / dicts of model arguments, or a "
                          "CalibrationProvider")
    if isinstance(model, DualEncoder):
        raise LowbitError(f"example inputs calibrate a bare module; this {type(model).__name__} is a lowbit model "
                          "with several towers; accepted: a dataset name or path (images, captions, text)")
    return ModuleCalibrator(model, list(inputs), seed=seed), {"source": "example inputs", "kind": "inputs",
                                                               "samples": len(inputs), "seed": seed}


def quantize(model: nn.Module, recipe: str | Recipe, calib_data: Calibration = None,
             calib_samples: int = DEFAULT_CALIB_SAMPLES, strict: bool = False, progress: bool = True,
             seed: int = 0) -> QuantReport:
    """Quantize ``model`` in place (any ``nn.Module``); calibration data (``calib_data``: see the module
    docstring) is drawn only when a rule's method needs it (GPTQ, AWQ). Returns the report, which records the
    calibration source."""
    parsed = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    provider, record = None, None
    methods = calibrated_methods(model, parsed)
    if methods:
        source = calib_data if calib_data is not None else default_calibration(model)
        if source is None:
            raise LowbitError(f"method(s) {', '.join(methods)} need calibration data and this {type(model).__name__} "
                              "has no default; accepted: calibration= example inputs (a tensor, or a list of "
                              "tensors / argument tuples / keyword dicts such as {'input_ids': ...}), a "
                              "CalibrationProvider, a method without calibration (rtn, minmax), or a model loaded "
                              "with lowbit.load (language models then calibrate on their own samples)")
        if source is not None:
            provider, record = calibration_provider(model, source, calib_samples, seed)
            if calib_data is None:
                record["default"] = True  # nothing was given: say so in the report
    report = quantize_(model, parsed, calibration=provider, strict=strict, progress=progress)
    report.calibration = record
    return report


def save(model: nn.Module, out_dir: str | os.PathLike[str], report: QuantReport | None = None,
         overwrite: bool = False) -> Path:
    """Write a packed checkpoint (safetensors + architecture + manifest.json) atomically; returns its directory.

    ``report`` is the one ``quantize()`` returned; a model loaded from a packed directory needs none (its
    manifest is kept on it) and saves to the same bytes.
    """
    if report is None and getattr(model, "lowbit_manifest", None) is not None:
        return save_loaded(model, out_dir, overwrite=overwrite)
    if report is None and getattr(model, "lowbit_import", None) is not None:
        return save_imported(model, out_dir, overwrite=overwrite)  # the producer's integers, as imported
    if report is None or not report.recipe_spec:
        raise LowbitError("save() needs the QuantReport returned by quantize(); quantize the model first")
    save_quantized(model, report, Recipe.from_dict(report.recipe_spec, name=report.recipe), out_dir,
                   overwrite=overwrite)
    return Path(out_dir)
