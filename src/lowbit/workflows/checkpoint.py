"""Save and load quantized models: ``model.safetensors`` (packed + float tensors) and ``manifest.json``.

Layout of a checkpoint directory (written atomically: a crash leaves no directory under the target name):

- ``model.safetensors``: the full state dict. Quantized layers hold the packed buffers of
  docs/PACKED_FORMAT.md (``qweight``, ``scales``, ``zeros``, ``input_scale``) instead of ``weight``;
  everything else is the float tensor as in the original model.
- ``manifest.json``: ``format``/``format_version``, ``lowbit_version``, ``torch_version``, ``source`` (how
  to rebuild the float model), ``recipe``, ``modules`` ({full module path: {tower, name, kind, bits,
  group_size, symmetric, method, shape, has_input_scale}}), ``report`` and ``extra``.

Loading rebuilds the float architecture from ``source``, swaps in empty quantized modules of the recorded
shapes, and loads the tensors strictly. Only safetensors are read — never pickles.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.errors import LowbitError
from lowbit.io import atomic_path
from lowbit.kernels.fold_bn import is_folded
from lowbit.kernels.fusion import fuse_shared_inputs
from lowbit.kernels.quant_linear import QUANT_KINDS
from lowbit.quant.apply import module_paths, replace_module
from lowbit.quant.recipe import Recipe
from lowbit.quant.report import QuantReport
from lowbit.version import __version__

FORMAT = "lowbit-packed"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
_MODULE_FIELDS = ("tower", "name", "kind", "bits", "group_size", "symmetric", "method", "shape", "has_input_scale")


def _tensors_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as contiguous tensors, cloning any that share storage (safetensors rejects sharing)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in model.state_dict().items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        if ptr in seen or not t.is_contiguous():
            t = t.contiguous().clone()  # tied weights, views: give each key its own storage
        elif ptr != -1:
            seen.add(ptr)
        out[key] = t.cpu()
    return out


def save_quantized(
    model: nn.Module,
    report: QuantReport,
    recipe: Recipe,
    out_dir: str | os.PathLike[str],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``out_dir`` (replacing it atomically) with ``model.safetensors`` and ``manifest.json``.

    Refuses a model whose BatchNorms were folded (``lowbit.kernels.fold_bn``): the checkpoint contract is the
    unfolded architecture, rebuilt from ``source``; fold after loading instead (``lowbit.load(dir, optimize=True)``).
    """
    if is_folded(model):
        raise LowbitError("cannot save a model with BatchNorm folded into its convs (an inference transform); "
                          "save the unfolded model and fold after loading: lowbit.load(dir, optimize=True)")
    modules = {
        m.path: {"tower": m.tower, "name": m.name, "kind": m.kind, "bits": m.bits, "group_size": m.group_size,
                 "symmetric": m.symmetric, "method": m.method, "shape": list(m.shape),
                 "has_input_scale": m.has_input_scale}
        for m in report.modules
    }
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lowbit_version": __version__,
        "torch_version": torch.__version__,
        "source": dict(getattr(model, "source", {}) or {}),
        "recipe": recipe.to_dict(),
        "modules": modules,
        "report": report.to_dict(),
        "extra": extra or {},
    }
    try:
        manifest_text = json.dumps(manifest, indent=2) + "\n"
    except TypeError as err:
        raise LowbitError(f"manifest is not JSON-serialisable ({err}); check model.source and extra") from None
    out_dir = Path(out_dir)
    with atomic_path(out_dir, is_dir=True) as tmp:
        save_file(_tensors_for_saving(model), str(tmp / WEIGHTS_FILE),
                  metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        (tmp / MANIFEST_FILE).write_text(manifest_text)
    return out_dir


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated manifest of checkpoint directory ``path`` (LowbitError if missing or garbled)."""
    file = Path(path) / MANIFEST_FILE
    if not file.is_file():
        raise LowbitError(f"no {MANIFEST_FILE} in {str(path)!r}; expected a directory written by save_quantized")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LowbitError(f"{str(file)!r} is not valid JSON ({err}); expected a lowbit manifest") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise LowbitError(f"{str(file)!r} has format {got!r}; expected {FORMAT!r}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise LowbitError(f"{str(file)!r} has format_version {version!r}; this lowbit reads {FORMAT_VERSION}")
    modules = manifest.get("modules")
    if not isinstance(modules, dict):
        raise LowbitError(f"{str(file)!r}: 'modules' must be a mapping of module path -> metadata")
    for path, meta in modules.items():
        missing = [f for f in _MODULE_FIELDS if not isinstance(meta, dict) or f not in meta]
        if missing:
            raise LowbitError(f"{str(file)!r}: module {path!r} lacks {', '.join(missing)}")
        if meta["kind"] not in QUANT_KINDS:
            raise LowbitError(f"{str(file)!r}: module {path!r} has kind {meta['kind']!r}; "
                              f"expected one of {', '.join(QUANT_KINDS.names())}")
    return manifest


def default_float_builder(source: dict[str, Any]) -> nn.Module:
    """Rebuild the float model with ``lowbit.models.load_model(source['name'], **source['options'])``."""
    if not source.get("name"):
        raise LowbitError(f"manifest 'source' {source!r} has no model name; pass build_float to load_quantized")
    from lowbit.models import load_model

    return load_model(source["name"], **source.get("options", {}))


def load_quantized(
    path: str | os.PathLike[str], build_float: Callable[[dict[str, Any]], nn.Module] | None = None
) -> nn.Module:
    """Load a ``save_quantized`` directory: float model from ``source``, quantized modules, strict tensors."""
    manifest = read_manifest(path)
    model = (build_float or default_float_builder)(manifest.get("source") or {})
    paths = module_paths(model)
    for mpath, meta in manifest["modules"].items():
        try:
            float_module = model.get_submodule(mpath)
        except AttributeError:
            raise LowbitError(f"checkpoint module {mpath!r} does not exist in the rebuilt model "
                              f"{type(model).__name__}; was it built from the same source?") from None
        weight = getattr(float_module, "weight", None)
        if not isinstance(weight, torch.Tensor) or list(weight.shape) != list(meta["shape"]):
            got = None if not isinstance(weight, torch.Tensor) else list(weight.shape)
            raise LowbitError(f"checkpoint module {mpath!r} has weight shape {meta['shape']}; "
                              f"the rebuilt model has {got}")
        new = QUANT_KINDS.get(meta["kind"]).empty(
            float_module, int(meta["bits"]), int(meta["group_size"]), bool(meta["symmetric"]),
            bool(meta["has_input_scale"]))
        if new is not float_module:
            replace_module(model, paths[id(float_module)], new)
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise LowbitError(f"no {WEIGHTS_FILE} in {str(path)!r}; the checkpoint is incomplete")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise LowbitError(f"cannot read {str(weights)!r} ({err}); expected a safetensors file") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = " ".join(str(err).split())[:500]
        raise LowbitError(f"{str(weights)!r} does not fit the rebuilt model: {first}") from None
    fuse_shared_inputs(model)  # siblings reading one input share a kernel call (lowbit.kernels.fusion)
    model.lowbit_manifest = manifest  # what was loaded, for reports and the CLI
    return model.eval()
