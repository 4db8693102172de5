"""The schema of a packed checkpoint's ``manifest.json`` (docs/PACKED_FORMAT.md), checked before anything is built.

An explicit validator (no runtime dependency): every field's type, range and known values; unknown keys are
refused where lowbit writes a closed set; the ``source`` may not ask for remote code nor point back at the
checkpoint itself. Each problem is one ``LowbitError`` naming the file, the field path and what is accepted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from lowbit.errors import LowbitError
from lowbit.kernels.act_quant import ActSpec
from lowbit.kernels.formats import SUPPORTED_BITS
from lowbit.kernels.quant_linear import QUANT_KINDS
from lowbit.limits import MAX_DIM, MAX_GROUP_SIZE

TOP_LEVEL_KEYS = ("format", "format_version", "lowbit_version", "torch_version", "source", "architecture", "storage",
                  "recipe", "modules", "report", "extra")
SOURCE_KEYS = ("family", "name", "options")
REFUSED_OPTIONS = ("trust_remote_code",)  # a checkpoint never asks to run code from elsewhere
MODULE_FIELDS = ("tower", "name", "kind", "bits", "group_size", "symmetric", "method", "shape", "has_input_scale")
OPTIONAL_MODULE_FIELDS = ("activations",)  # the layer's activation quantization (lowbit.kernels.act_quant)
MAX_SHAPE_RANK = 5  # [N, C, kh, kw] at most (+1 for safety)


class _Check:
    """Field checks of one manifest file; every failure names the file and the field path."""

    def __init__(self, file: Path) -> None:
        self.file = file

    def fail(self, where: str, received: Any, accepted: str) -> LowbitError:
        text = repr(received)
        text = text if len(text) <= 60 else text[:57] + "..."
        return LowbitError(f"{str(self.file)!r}: {where} is {text}; accepted: {accepted}")

    def mapping(self, value: Any, where: str, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, value, "a mapping" + (f" of {', '.join(keys)}" if keys else ""))
        if keys is not None:
            unknown = sorted(str(k) for k in value if k not in keys)
            if unknown:
                raise self.fail(f"{where} key {unknown[0]!r}", value[unknown[0]] if unknown[0] in value else None,
                                f"only the keys {', '.join(keys)}")
        return value

    def string(self, value: Any, where: str, optional: bool = False) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise self.fail(where, value, "a string" + (" or null" if optional else ""))
        return value

    def flag(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(where, value, "true or false")
        return value

    def integer(self, value: Any, where: str, low: int, high: int, choices: tuple[int, ...] = ()) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high or (
                choices and value not in choices):
            raise self.fail(where, value, f"one of {', '.join(map(str, choices))}" if choices
                            else f"an integer in {low}..{high}")
        return value


def _json_scalar(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, (str, int, bool))


def _source(c: _Check, source: Any, root: Path) -> None:
    source = c.mapping(source, "'source'", SOURCE_KEYS)
    c.string(source.get("family"), "'source.family'", optional=True)
    name = c.string(source.get("name"), "'source.name'", optional=True)
    options = c.mapping(source.get("options", {}), "'source.options'")
    for key, value in options.items():
        if key in REFUSED_OPTIONS:
            raise c.fail(f"'source.options.{key}'", value, "no remote code (the option is refused)")
        if not (_json_scalar(value) or (isinstance(value, list) and all(_json_scalar(v) for v in value))):
            raise c.fail(f"'source.options.{key}'", value, "a string, number, boolean, null or a list of them")
    if name:
        own = root.resolve()
        for candidate in {name, name.split(":", 1)[-1]}:
            try:
                target = Path(candidate).resolve()
            except (OSError, ValueError, RuntimeError):
                continue
            if target == own or own in target.parents:
                raise c.fail("'source.name'", name, "the float model it came from, not the checkpoint itself")


def _architecture(c: _Check, architecture: Any) -> None:
    if architecture is None:
        return
    architecture = c.mapping(architecture, "'architecture'", ("family", "record", "files"))
    c.string(architecture.get("family"), "'architecture.family'")
    c.mapping(architecture.get("record"), "'architecture.record'")
    files = c.mapping(architecture.get("files"), "'architecture.files'")
    for name, size in files.items():
        parts = PurePosixPath(name).parts
        if not name or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name or "\x00" in name:
            raise c.fail("an 'architecture.files' name", name, "a relative path inside architecture/")
        c.integer(size, f"'architecture.files.{name}'", 0, 2**40)


def _storage(c: _Check, storage: Any, float_dtypes: tuple[str, ...]) -> None:
    storage = c.mapping(storage, "'storage'", ("float_dtype", "tied"))
    if not isinstance(storage.get("float_dtype"), str) or storage.get("float_dtype") not in float_dtypes:
        raise c.fail("'storage.float_dtype'", storage.get("float_dtype"), " or ".join(float_dtypes))
    tied = c.mapping(storage.get("tied"), "'storage.tied'")
    for alias, stored in tied.items():
        c.string(stored, f"'storage.tied.{alias}'")


def kinds_summary(names: list[str]) -> str:
    """The registered kinds, storage variants brace-grouped by prefix (``offset_{conv,linear}``): a one-line error
    stays short as variants are added."""
    groups: dict[str, list[str]] = {}
    for name in sorted(names):
        prefix, _, base = name.rpartition("_") if "_" in name else ("", "", name)
        groups.setdefault(prefix, []).append(base)
    parts = [", ".join(groups.pop("", []))]
    parts += [f"{p}_{{{','.join(b)}}}" if len(b) > 1 else f"{p}_{b[0]}" for p, b in groups.items()]
    return ", ".join(x for x in parts if x)


def _modules(c: _Check, modules: Any, weights_bytes: int | None) -> None:
    modules = c.mapping(modules, "'modules'")
    most = MAX_DIM if weights_bytes is None else 8 * weights_bytes  # no weight takes under one bit on disk
    for path, meta in modules.items():
        where = f"module {path!r}"
        meta = c.mapping(meta, where, MODULE_FIELDS + OPTIONAL_MODULE_FIELDS)
        missing = [f for f in MODULE_FIELDS if f not in meta]
        if missing:
            raise LowbitError(f"{str(c.file)!r}: {where} lacks {', '.join(missing)}; accepted: a module record with "
                              f"{', '.join(MODULE_FIELDS)}")
        for key in ("tower", "name", "method"):
            c.string(meta[key], f"{where} field '{key}'")
        if not isinstance(meta["kind"], str) or meta["kind"] not in QUANT_KINDS:
            raise c.fail(f"{where} field 'kind'", meta["kind"], kinds_summary(QUANT_KINDS.names()))
        c.integer(meta["bits"], f"{where} field 'bits'", 1, 8, SUPPORTED_BITS)
        shape = meta["shape"]
        if not isinstance(shape, list) or not 1 <= len(shape) <= MAX_SHAPE_RANK:
            raise c.fail(f"{where} field 'shape'", shape, f"a list of 1..{MAX_SHAPE_RANK} non-negative integers")
        elements = 1
        for i, d in enumerate(shape):
            elements *= c.integer(d, f"{where} field 'shape[{i}]'", 0, MAX_DIM)
        if elements > most:
            raise c.fail(f"{where} field 'shape'", shape, f"at most {most} weights (8 per byte of the weights file)")
        width = max(1, elements // max(shape[0], 1))  # K: the input width groups run along
        c.integer(meta["group_size"], f"{where} field 'group_size'", 1, min(MAX_GROUP_SIZE, width))
        c.flag(meta["symmetric"], f"{where} field 'symmetric'")
        c.flag(meta["has_input_scale"], f"{where} field 'has_input_scale'")
        if meta.get("activations") is not None:
            if meta["kind"] not in ("linear", "conv1x1"):
                raise c.fail(f"{where} field 'activations'", meta["activations"], "null for a kind other than "
                             "linear and conv1x1")
            try:
                ActSpec.from_dict(meta["activations"])
            except (LowbitError, TypeError) as err:
                raise c.fail(f"{where} field 'activations'", meta["activations"],
                             f"an activation scheme ({err})") from None


_SECTIONS: tuple[tuple[str, Callable[[_Check, Any], Any]], ...] = (
    ("recipe", lambda c, v: c.mapping(v, "'recipe'")),
    ("report", lambda c, v: c.mapping(v, "'report'")),
    ("extra", lambda c, v: c.mapping(v, "'extra'")),
    ("lowbit_version", lambda c, v: c.string(v, "'lowbit_version'")),
    ("torch_version", lambda c, v: c.string(v, "'torch_version'")),
)


def validate_manifest(manifest: Any, file: Path, fmt: str, versions: tuple[int, ...], float_dtypes: tuple[str, ...],
                      weights_bytes: int | None = None) -> dict[str, Any]:
    """Check a parsed manifest against the schema; returns it with format-1 defaults filled in.

    ``weights_bytes`` (the size of ``model.safetensors``) bounds the shapes: no module may claim more weights
    than the file could hold at one bit each.
    """
    c = _Check(file)
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise c.fail("'format'", got, repr(fmt))
    version = manifest.get("format_version")
    if isinstance(version, bool) or version not in versions:
        newest = max(versions)
        older = ", ".join(str(v) for v in versions if v != newest)
        raise c.fail("'format_version'", version, f"{' or '.join(map(str, versions))} (this lowbit reads {newest}"
                     + (f", and {older}" if older else "") + ")")
    c.mapping(manifest, "the manifest", TOP_LEVEL_KEYS)
    for key, check in _SECTIONS:
        if key in manifest:
            check(c, manifest[key])
    _source(c, manifest.get("source", {}), file.parent)
    _modules(c, manifest.get("modules"), weights_bytes)
    storage = manifest.setdefault("storage", {"float_dtype": "fp32", "tied": {}})  # format 1: fp32, no ties
    _storage(c, storage, float_dtypes)
    _architecture(c, manifest.setdefault("architecture", None))
    return manifest
