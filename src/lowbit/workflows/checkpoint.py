"""Save and load quantized models as self-contained directories (docs/PACKED_FORMAT.md, "Checkpoint directory").

Layout of a checkpoint directory (written atomically: a crash leaves no directory under the target name):

- ``model.safetensors``: the state dict. Quantized layers hold the packed buffers of docs/PACKED_FORMAT.md
  (``qweight``, ``scales``, ``zeros``, ``input_scale``) instead of ``weight``; every other floating tensor is
  stored in the recipe's ``float_dtype`` (fp16 or fp32) and read back as float32. Tensors sharing storage
  (tied embeddings / LM heads) are written once.
- ``architecture/``: what the model's family needs to build the model without weights (configs, tokenizer
  with its chat template, image processor), written by the family's ``FamilySpec.save_architecture``.
- ``manifest.json``: ``format``/``format_version`` (2), ``lowbit_version``, ``torch_version``, ``source`` (the
  float model it came from: provenance only, never read to load), ``architecture`` ({family, record, files:
  {path: bytes}} or null), ``storage`` ({float_dtype, tied: {alias key: stored key}}), ``recipe``, ``modules``
  ({full module path: {tower, name, kind, bits, group_size, symmetric, method, shape, has_input_scale[,
  activations]}}: ``activations`` is the layer's ``ActSpec``, whose static scales are the ``act_scale`` /
  ``act_zero`` tensors),
  ``report`` and ``extra``. No timestamps: saving the same model twice gives the same bytes.

Loading builds the family's skeleton on the meta device (``accelerate.init_empty_weights``: parameters empty,
buffers real), swaps in empty quantized modules of the recorded shapes (meta too), and assigns the
memory-mapped safetensors tensors strictly (``load_state_dict(assign=True)``: no copy, pages read on first
touch). Nothing outside the directory is read, and only safetensors and JSON are read — never pickles.
A directory without an architecture (format 1, or a model whose family has no hooks) is rebuilt from its float
source instead, as format 1 did.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lowbit.errors import LowbitError
from lowbit.io import OutputKind, atomic_path, check_output, mmap_safetensors, register_output_kind
from lowbit.kernels import act_quant, quant_embedding  # noqa: F401  (quant_embedding registers the ``embedding`` kind)
from lowbit.kernels.attn_quant import AttnSpec, attention_modules
from lowbit.kernels.attn_quant import attach as attn_attach
from lowbit.kernels.fold_bn import is_folded
from lowbit.kernels.fusion import fuse_shared_inputs
from lowbit.kernels.quant_linear import QUANT_KINDS
from lowbit.models import (
    FAMILY_SPECS,
    hf_quantized,  # noqa: F401  (registers the ``permuted_linear`` kind of GPTQ desc_act)
)
from lowbit.models.spec import architecture_spec
from lowbit.quant.apply import fits_fp16, model_towers, module_paths, replace_module
from lowbit.quant.recipe import Recipe
from lowbit.quant.report import QuantReport
from lowbit.version import __version__

FORMAT = "lowbit-packed"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: no architecture, no storage section (rebuilt from the float source)
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
ARCHITECTURE_DIR = "architecture"
FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
ArchitectureWriter = Callable[[Path], "dict[str, Any] | None"]


def is_packed_checkpoint(path: Path) -> bool:
    """A directory whose ``manifest.json`` carries lowbit's format key (what ``--out`` may replace)."""
    file = path / MANIFEST_FILE
    try:
        if not file.is_file() or file.stat().st_size > 256 * 2**20:
            return False
        return json.loads(file.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


register_output_kind(OutputKind("packed-checkpoint", is_dir=True, recognize=is_packed_checkpoint))


def model_sources(model: nn.Module) -> list[str]:
    """The paths a model was made from (its float source directory, the packed directory it was loaded from):
    an output must never equal, contain or lie inside one."""
    source = getattr(model, "source", None) or {}
    named = [source.get("name")] if isinstance(source, dict) and isinstance(source.get("name"), str) else []
    loaded = getattr(model, "lowbit_path", None)
    return [*named, *([str(loaded)] if loaded else [])]


# --- saving ------------------------------------------------------------------------------------------------------
def packed_keys(model: nn.Module, modules: dict[str, Any]) -> set[str]:
    """State-dict keys of packed buffers (stored as they are): a quantized module's buffers except its bias."""
    keys: set[str] = set()
    for path in modules:
        module = model.get_submodule(path)
        keys.update(f"{path}.{name}" for name, t in module._buffers.items() if t is not None and name != "bias")
    return keys


def _tensors_for_saving(model: nn.Module, packed: set[str],
                        float_dtype: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(contiguous CPU tensors, {alias key: stored key}): a tensor reached under several keys (a tied weight, a
    LM head holding the embedding's packed buffers) is stored once; floats not packed are cast to ``float_dtype``
    (fp16: those beyond its range stay float32)."""
    out: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    first: dict[tuple[Any, ...], str] = {}
    storages: set[int] = set()
    for key, t in model.state_dict().items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        ident = (ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if ptr != -1 and ident in first:
            tied[key] = first[ident]
            continue
        if ptr in storages or not t.is_contiguous():
            t = t.contiguous().clone()  # a view of another tensor: its own storage (safetensors rejects sharing)
        elif ptr != -1:
            storages.add(ptr)
            first[ident] = key
        if t.is_floating_point() and key not in packed and (float_dtype != "fp16" or fits_fp16(t)):
            t = t.to(FLOAT_DTYPES[float_dtype])  # fp16: exact, quantize_ rounded the floats to fp16 values
        out[key] = t.cpu()
    return out, tied


COMPACT_JSON = "tokenizer.json"  # written indented by tokenizers (SmolLM2's: 3.52 MB, 1.49 MB without the indent)


def _compact_json(path: Path) -> None:
    """Rewrite the JSON file ``path`` without indentation or escapes: the same document in fewer bytes (read back
    by the same parser; a re-save compacts the same document to the same bytes)."""
    text = json.dumps(json.loads(path.read_text(encoding="utf-8")), ensure_ascii=False, separators=(",", ":"))
    path.write_text(text, encoding="utf-8")


def _family_architecture(model: nn.Module) -> ArchitectureWriter:
    """Writes ``model``'s architecture files through its family's hook; None when the family has none."""

    def write(arch_dir: Path) -> dict[str, Any] | None:
        spec = architecture_spec(model)
        if spec is None or spec.save_architecture is None:
            return None
        arch_dir.mkdir()
        record = spec.save_architecture(model, arch_dir)  # type: ignore[arg-type]
        if record is None:
            return None
        for tok in sorted(arch_dir.rglob(COMPACT_JSON)):
            _compact_json(tok)
        files = {p.relative_to(arch_dir).as_posix(): p.stat().st_size
                 for p in sorted(arch_dir.rglob("*")) if p.is_file()}
        return {"family": spec.name, "record": record, "files": files}

    return write


def _loaded_architecture(manifest: dict[str, Any], files: dict[str, bytes]) -> ArchitectureWriter:
    """Writes back the architecture files a packed model was loaded with, byte for byte."""

    def write(arch_dir: Path) -> dict[str, Any] | None:
        for name, data in files.items():
            (arch_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (arch_dir / name).write_bytes(data)
        return manifest.get("architecture")

    return write


def _write(model: nn.Module, out_dir: str | os.PathLike[str], parts: dict[str, Any],
           architecture: ArchitectureWriter, overwrite: bool) -> Path:
    """The one writer: ``parts`` = source, recipe, modules, report, extra of the manifest."""
    check_output(out_dir, "packed-checkpoint", overwrite=overwrite, sources=model_sources(model))
    if is_folded(model):
        raise LowbitError("cannot save a model with BatchNorm folded into its convs (an inference transform); "
                          "save the unfolded model and fold after loading: lowbit.load(dir, optimize=True)")
    float_dtype = parts["recipe"].get("float_dtype", "fp32")
    if float_dtype not in FLOAT_DTYPES:
        raise LowbitError(f"recipe float_dtype {float_dtype!r} is not stored; accepted: {', '.join(FLOAT_DTYPES)}")
    tensors, tied = _tensors_for_saving(model, packed_keys(model, parts["modules"]), float_dtype)
    out_dir = Path(out_dir)
    with atomic_path(out_dir, is_dir=True) as tmp:
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "lowbit_version": __version__,
            "torch_version": torch.__version__,
            "source": parts["source"],
            "architecture": architecture(tmp / ARCHITECTURE_DIR),
            "storage": {"float_dtype": float_dtype, "tied": tied},
            "recipe": parts["recipe"],
            "modules": parts["modules"],
            "report": parts["report"],
            "extra": parts["extra"],
        }
        try:
            manifest_text = json.dumps(manifest, indent=2) + "\n"
        except TypeError as err:
            raise LowbitError(f"manifest is not JSON-serialisable ({err}); check model.source and extra") from None
        # One metadata key: safetensors keeps metadata in a hash map, so several keys come out in random order.
        save_file(tensors, str(tmp / WEIGHTS_FILE),
                  metadata={"lowbit": json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION})})
        (tmp / MANIFEST_FILE).write_text(manifest_text)
    return out_dir


def save_quantized(
    model: nn.Module,
    report: QuantReport,
    recipe: Recipe,
    out_dir: str | os.PathLike[str],
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``out_dir`` (replacing it atomically): ``model.safetensors``, ``architecture/``, ``manifest.json``.

    An existing ``out_dir`` is replaced only when it is a packed checkpoint or empty, unless ``overwrite``; it
    is never the model's source directory (``lowbit.io.check_output``).

    Refuses a model whose BatchNorms were folded (``lowbit.kernels.fold_bn``): the checkpoint contract is the
    unfolded architecture; fold after loading instead (``lowbit.load(dir, optimize=True)``).
    """
    modules = {
        m.path: {"tower": m.tower, "name": m.name, "kind": m.kind, "bits": m.bits, "group_size": m.group_size,
                 "symmetric": m.symmetric, "method": m.method, "shape": list(m.shape),
                 "has_input_scale": m.has_input_scale,
                 **({} if m.activations is None else {"activations": dict(m.activations)})}
        for m in report.modules
    }
    parts = {"source": dict(getattr(model, "source", {}) or {}), "recipe": recipe.to_dict(), "modules": modules,
             "report": report.to_dict(), "extra": extra or {}}
    return _write(model, out_dir, parts, _family_architecture(model), overwrite)


def manifest_kind(module: nn.Module) -> str:
    """The manifest ``kind`` (a ``QUANT_KINDS`` name) that rebuilds the packed ``module`` empty for loading: its
    class's own ``manifest_kind`` (e.g. GPTQ's permuted linear), else its storage row's kind for its shape."""
    from lowbit.kernels.quant_embedding import QuantEmbedding
    from lowbit.kernels.quant_linear import QuantConv2d1x1, QuantLinear
    from lowbit.kernels.storage import format_of

    own = getattr(type(module), "manifest_kind", None)
    if isinstance(own, str):
        return own
    if isinstance(module, QuantEmbedding):
        return "embedding"
    standard = "conv1x1" if isinstance(module, QuantConv2d1x1) else "linear" if isinstance(module, QuantLinear) \
        else "conv"
    return format_of(module.packed).kind_for(standard)  # type: ignore[union-attr]


def save_imported(model: nn.Module, out_dir: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Save a model ``lowbit.load`` imported packed from another format (GGUF, GPTQ, AWQ, compressed-tensors) as
    a normal packed checkpoint: every packed layer as it holds the producer's integers (method
    ``import:<format>``, weight error 0: nothing is re-rounded), every float tensor in fp32 (as imported, so the
    reloaded model computes the same numbers). What was imported is kept under ``extra.imported``."""
    from lowbit.kernels.quant_linear import is_quantized
    from lowbit.quant.apply import model_towers
    from lowbit.quant.report import ModuleQuant

    imported = dict(getattr(model, "lowbit_import", None) or {})
    fmt = str(imported.get("method") or ("gguf" if "packed" in imported else "hf"))
    paths = {id(m): p for p, m in model.named_modules()}
    towers = [(name, paths.get(id(t), "")) for name, t in model_towers(model).items()]
    report = QuantReport(recipe=f"imported:{fmt}")
    for path, module in model.named_modules():
        if not is_quantized(module):
            continue
        tower, prefix = max(((t, p) for t, p in towers if not p or path.startswith(f"{p}.")),
                            key=lambda tp: len(tp[1]), default=("", ""))
        packed = module.packed  # type: ignore[attr-defined]
        params = packed.out_features * packed.in_features
        report.modules.append(ModuleQuant(
            tower=tower, name=path[len(prefix) + 1:] if prefix else path, path=path, kind=manifest_kind(module),
            method=f"import:{fmt}", bits=packed.bits, group_size=packed.group_size, symmetric=packed.symmetric,
            shape=list(packed.shape), params=params, fp32_bytes=4 * params, packed_bytes=packed.nbytes,
            bits_per_weight=8 * packed.nbytes / max(params, 1), weight_error=0.0,
            has_input_scale=module._buffers.get("input_scale") is not None))
    if not report.modules:
        raise LowbitError("this imported model holds no packed layer to save; load it with packed=False and quantize "
                          "it, or export it")
    recipe = Recipe(rules=(), name=report.recipe, float_dtype="fp32")
    report.recipe_spec = recipe.to_dict()
    return save_quantized(model, report, recipe, out_dir, extra={"imported": imported}, overwrite=overwrite)


def save_loaded(model: nn.Module, out_dir: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Save a model loaded by ``load_quantized`` again: same manifest, architecture files and tensors, so an
    unchanged model gives a byte-identical directory."""
    manifest = getattr(model, "lowbit_manifest", None)
    if not isinstance(manifest, dict):
        raise LowbitError("this model was not loaded from a packed checkpoint; save() needs the QuantReport "
                          "returned by quantize() (quantize the model first)")
    parts = {k: manifest[k] for k in ("source", "recipe", "modules", "report", "extra")}
    files = getattr(model, "lowbit_architecture_files", {})
    return _write(model, out_dir, parts, _loaded_architecture(manifest, files), overwrite)


# --- loading -----------------------------------------------------------------------------------------------------
def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated manifest of checkpoint directory ``path`` (``workflows/manifest.py``: types, ranges, known
    format and version, a closed ``source``); one ``LowbitError`` if missing, garbled or out of range. Nothing
    is built before this passes."""
    from lowbit.limits import read_json
    from lowbit.workflows.manifest import validate_manifest

    file = Path(path) / MANIFEST_FILE
    if not file.exists():
        raise LowbitError(f"no {MANIFEST_FILE} in {str(path)!r}; expected a directory written by save_quantized")
    manifest = read_json(file, "manifest", "a lowbit manifest (written by save_quantized)")
    weights = Path(path) / WEIGHTS_FILE
    size = weights.stat().st_size if weights.is_file() else None
    return validate_manifest(manifest, file, FORMAT, READABLE_VERSIONS, tuple(FLOAT_DTYPES), size)


def _read_architecture_files(root: Path, architecture: dict[str, Any]) -> dict[str, bytes]:
    """Every recorded architecture file's bytes (kept on the model so it can be saved again as it was)."""
    files: dict[str, bytes] = {}
    for name, size in architecture["files"].items():
        file = root / ARCHITECTURE_DIR / name
        if not file.is_file():
            raise LowbitError(f"{str(root)!r} lacks {ARCHITECTURE_DIR}/{name}, which its manifest lists; the "
                              "checkpoint is incomplete (copy the whole directory)")
        files[name] = file.read_bytes()
        if len(files[name]) != size:
            raise LowbitError(f"{str(file)!r} has {len(files[name])} bytes, its manifest says {size}; the "
                              "checkpoint is damaged")
    return files


def _skeleton(root: Path, architecture: dict[str, Any]) -> nn.Module:
    """The family's model without weights: parameters on the meta device, buffers real (RoPE tables etc.)."""
    from accelerate import init_empty_weights

    family = architecture.get("family")
    if family not in FAMILY_SPECS or FAMILY_SPECS.get(family).skeleton is None:
        known = [n for n in FAMILY_SPECS if FAMILY_SPECS.get(n).skeleton is not None]
        raise LowbitError(f"{str(root)!r} was saved by model family {family!r}, which this lowbit cannot build; "
                          f"accepted: {', '.join(known)}")
    build = FAMILY_SPECS.get(family).skeleton
    assert build is not None
    try:
        with init_empty_weights(include_buffers=False):
            return build(root / ARCHITECTURE_DIR, architecture["record"])
    except LowbitError:
        raise
    except (KeyError, TypeError, ValueError, OSError) as err:
        first = " ".join(str(err).split())[:300]
        raise LowbitError(f"cannot build the {family} architecture recorded in {str(root)!r} "
                          f"({type(err).__name__}: {first})") from None


def default_float_builder(source: dict[str, Any]) -> nn.Module:
    """Rebuild the float model with ``lowbit.models.load_model(source['name'], **source['options'])``."""
    if not source.get("name"):
        raise LowbitError(f"manifest 'source' {source!r} has no model name; pass build_float to load_quantized")
    from lowbit.models import load_model

    return load_model(source["name"], **source.get("options", {}))


def _swap_in_empty(model: nn.Module, modules: dict[str, Any]) -> None:
    """Replace each recorded float module by an empty quantized one (on the meta device: the file fills it)."""
    paths = module_paths(model)
    for mpath, meta in modules.items():
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
        try:
            with torch.device("meta"):
                new = QUANT_KINDS.get(meta["kind"]).empty(
                    float_module, int(meta["bits"]), int(meta["group_size"]), bool(meta["symmetric"]),
                    bool(meta["has_input_scale"]))
        except AttributeError:  # e.g. kind 'embedding' recorded for a Linear: the kind cannot hold this module
            raise LowbitError(f"checkpoint module {mpath!r} is a {type(float_module).__name__} in the rebuilt model; "
                              f"its manifest kind {meta['kind']!r} cannot hold one") from None
        if meta.get("activations") is not None:  # a static scheme's act_scale / act_zero come from the file
            act_quant.attach(new, act_quant.ActSpec.from_dict(meta["activations"]))
        if new is not float_module:
            replace_module(model, paths[id(float_module)], new)


def _attach_attention(model: nn.Module, manifest: dict[str, Any]) -> None:
    """Empty attention quantizers (their scales come from the file) where the recipe quantized attention."""
    try:
        spec = AttnSpec.parse((manifest.get("recipe") or {}).get("attention"))
    except (LowbitError, TypeError) as err:
        raise LowbitError(f"manifest 'recipe.attention' is not an attention scheme ({err})") from None
    if spec is None:
        return
    for root in model_towers(model).values():
        for _, module in attention_modules(root):
            attn_attach(module, spec)


FINITE_CHECK_ELEMENTS = 2**20  # float tensors up to this size are checked for NaN/Inf at load; packed buffers always


def _check_finite(weights: Path, state: dict[str, torch.Tensor], packed: set[str]) -> None:
    """Refuse NaN/Inf in the scales (and other float buffers) of packed layers and in every float tensor up to
    ``FINITE_CHECK_ELEMENTS`` (norms, biases, small heads): a checkpoint with them would score garbage. The
    big float tensors (embedding tables) stay memory-mapped and unread; the codes are integers."""
    for key, t in state.items():
        if not t.is_floating_point() or (key not in packed and t.numel() > FINITE_CHECK_ELEMENTS):
            continue
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise LowbitError(f"{str(weights)!r}: tensor {key!r} holds {bad} NaN/Inf value{'s' * (bad > 1)} of "
                              f"{t.numel()}; accepted: finite values (the checkpoint is damaged; quantize again)")


def _read_tensors(root: Path, model: nn.Module, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The file's tensors, memory-mapped; fp16-stored floats as float32, tied keys sharing one tensor."""
    weights = root / WEIGHTS_FILE
    if not weights.is_file():
        raise LowbitError(f"no {WEIGHTS_FILE} in {str(root)!r}; the checkpoint is incomplete")
    try:
        state = mmap_safetensors(weights)  # nothing is read until a page is touched, and then only that page
    except OSError as err:
        raise LowbitError(f"cannot read {str(weights)!r} ({err}); expected a safetensors file") from None
    except LowbitError as err:
        raise LowbitError(f"cannot read {err}; expected the checkpoint's safetensors file") from None
    storage = manifest["storage"]
    packed = packed_keys(model, manifest["modules"])
    _check_finite(weights, state, packed)
    if storage["float_dtype"] == "fp16":
        for key, t in state.items():
            if t.dtype == torch.float16 and key not in packed:
                state[key] = t.float()
    for alias, stored in storage["tied"].items():
        if stored not in state:
            raise LowbitError(f"{str(root / MANIFEST_FILE)!r} ties {alias!r} to {stored!r}, which {WEIGHTS_FILE} "
                              "lacks; the checkpoint is damaged")
        state[alias] = state[stored]
    return state


def load_quantized(
    path: str | os.PathLike[str], build_float: Callable[[dict[str, Any]], nn.Module] | None = None
) -> nn.Module:
    """Load a ``save_quantized`` directory in place: the family's weightless skeleton, empty quantized modules,
    then the memory-mapped tensors assigned strictly. ``build_float(source)`` instead builds the model to fill
    (needed for a directory without an architecture: format 1, or a family without checkpoint hooks)."""
    root = Path(path)
    manifest = read_manifest(root)
    architecture = manifest["architecture"]
    files: dict[str, bytes] = {}
    if build_float is None and architecture is not None:
        files = _read_architecture_files(root, architecture)
        model = _skeleton(root, architecture)
    else:
        model = (build_float or default_float_builder)(manifest.get("source") or {})
    _swap_in_empty(model, manifest["modules"])
    _attach_attention(model, manifest)
    state = _read_tensors(root, model, manifest)
    try:
        model.load_state_dict(state, strict=True, assign=True)  # assign: the mapped tensors themselves, no copy
    except RuntimeError as err:
        first = " ".join(str(err).split())[:500]
        raise LowbitError(f"{str(root / WEIGHTS_FILE)!r} does not fit the rebuilt model: {first}") from None
    empty = [n for n, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if empty:
        raise LowbitError(f"{len(empty)} tensors of the rebuilt {type(model).__name__} got no value from "
                          f"{str(root)!r} (first: {empty[0]}); the family's skeleton does not match the checkpoint")
    fuse_shared_inputs(model)  # siblings reading one input share a kernel call (lowbit.kernels.fusion)
    if architecture is not None and build_float is None:
        model.source = dict(manifest["source"])  # the float model it came from (bench_model compares with it)
    model.lowbit_manifest = manifest  # what was loaded: reports, the CLI, and save_loaded
    model.lowbit_architecture_files = files
    model.lowbit_path = str(root)  # where it came from: saving onto it again is refused
    return model.eval()
