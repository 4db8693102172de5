"""The manifest schema (``lowbit.workflows.manifest``): a real checkpoint's manifest with every field mutated
(wrong type, null, NaN, Infinity, negative, 10^20, fractional, missing, an extra key) loads or fails with one
``LowbitError`` naming the field, before any tensor is built, and invalid values are never accepted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from lowbit.errors import LowbitError
from lowbit.workflows.checkpoint import read_manifest
from lowbit.workflows.load import load
from lowbit.workflows.quantize import quantize, save
from tests.models.tiny_family import write_tiny_family

MISSING = object()
NAN, INF = float("nan"), float("inf")
BAD_VALUES: list[Any] = ["abc", None, NAN, INF, -1, 10**20, 4.5, [], {}, True, MISSING]


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("schema")
    model = load(f"tiny-family:{write_tiny_family(root / 'src')}")
    return save(model, root / "ck", report=quantize(model, "*=w4g32", progress=False))


def _mutated(real: Path, tmp_path: Path, mutate: Any) -> Path:
    out = tmp_path / "ck"
    shutil.copytree(real, out)
    manifest = json.loads((real / "manifest.json").read_text())
    mutate(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))  # NaN/Infinity written as JS literals
    return out


def _set(path: tuple[Any, ...], value: Any) -> Any:
    def mutate(manifest: dict[str, Any]) -> None:
        node = manifest
        for key in path[:-1]:
            node = node[key] if not callable(key) else key(node)
        if value is MISSING:
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
    return mutate


def _first_module(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["modules"][next(iter(manifest["modules"]))]


MODULE_FIELDS = ["tower", "name", "kind", "bits", "group_size", "symmetric", "method", "shape", "has_input_scale"]
@pytest.mark.parametrize("field", MODULE_FIELDS)
@pytest.mark.parametrize("value", BAD_VALUES, ids=repr)
def test_every_module_field_mutated(real: Path, tmp_path: Path, field: str, value: Any) -> None:
    out = _mutated(real, tmp_path, _set((_first_module, field), value))
    valid = (field in ("symmetric", "has_input_scale") and value is True) or (
        field in ("tower", "name", "method") and value == "abc")
    if valid:
        read_manifest(out)
        return
    with pytest.raises(LowbitError) as exc:
        load(str(out))
    message = str(exc.value)
    assert "\n" not in message and len(message) < 400
    if value is MISSING:
        assert f"lacks {field}" in message
    elif value in (NAN, INF) or value != value:
        assert "is not a JSON number" in message  # refused by the strict JSON reader, before the schema
    else:
        assert f"field '{field}" in message


@pytest.mark.parametrize(("path", "value", "message"), [
    (("format",), "other", r"'format' is 'other'; accepted: 'lowbit-packed'"),
    (("format_version",), 3, r"'format_version' is 3; accepted: 1 or 2"),
    (("format_version",), True, r"'format_version' is True"),
    (("format_version",), 2.0, None),  # 2.0 == 2 in JSON: the same version
    (("source",), "tiny", r"'source' is 'tiny'; accepted: a mapping"),
    (("source",), [1], r"'source' is \[1\]; accepted: a mapping"),
    (("source",), 7, r"'source' is 7"),
    (("source", "trust"), True, r"'source' key 'trust' is True; accepted: only the keys family, name, options"),
    (("source", "options"), {"trust_remote_code": True}, r"'source.options.trust_remote_code' is True; accepted: no "
                                                          r"remote code"),
    (("source", "options"), {"heads": {"a": 1}}, r"'source.options.heads' is \{'a': 1\}"),
    (("source", "options"), "x", r"'source.options' is 'x'"),
    (("storage", "float_dtype"), "fp8", r"'storage.float_dtype' is 'fp8'; accepted: fp32 or fp16"),
    (("storage", "tied"), [], r"'storage.tied' is \[\]"),
    (("storage", "extra"), 1, r"'storage' key 'extra'"),
    (("architecture",), "x", r"'architecture' is 'x'; accepted: a mapping"),
    (("architecture",), {"family": "lit", "record": {}, "files": {"../../etc/passwd": 1}},
     r"an 'architecture.files' name is '../../etc/passwd'; accepted: a relative path inside architecture/"),
    (("architecture",), {"family": "lit", "record": {}, "files": {"a": -1}}, r"'architecture.files.a' is -1"),
    (("modules",), [], r"'modules' is \[\]; accepted: a mapping"),
    (("recipe",), None, r"'recipe' is None; accepted: a mapping"),
    (("lowbit_version",), 1, r"'lowbit_version' is 1; accepted: a string"),
    (("surprise",), 1, r"the manifest key 'surprise' is 1; accepted: only the keys"),
    (("lowbit_version",), MISSING, None),
])
def test_top_level_and_sections(real: Path, tmp_path: Path, path: tuple[str, ...], value: Any,
                                message: str | None) -> None:
    out = _mutated(real, tmp_path, _set(path, value))
    if message is None:
        read_manifest(out)
        return
    with pytest.raises(LowbitError, match=message):
        load(str(out))


def test_a_source_pointing_at_the_checkpoint_itself_is_refused(real: Path, tmp_path: Path) -> None:
    out = tmp_path / "ck"
    out_abs = str(out.resolve())
    mutated = _mutated(real, tmp_path, _set(("source", "name"), f"tiny-family:{out_abs}"))
    with pytest.raises(LowbitError, match="'source.name' is .*; accepted: the float model it came from, not the "
                                          "checkpoint itself"):
        load(str(mutated))


def test_a_shape_larger_than_the_file_could_hold(real: Path, tmp_path: Path) -> None:
    out = _mutated(real, tmp_path, _set((_first_module, "shape"), [2**30, 2**30]))
    with pytest.raises(LowbitError, match=r"field 'shape' is \[1073741824, 1073741824\]; accepted: at most \d+ "
                                          r"weights \(8 per byte of the weights file\)"):
        load(str(out))


@pytest.mark.parametrize("text", ["[" * 10000 + "]" * 10000, "{" * 5 + "", "\x00\x01", "NaN", '{"format": NaN}'])
def test_garbled_manifest_text(real: Path, tmp_path: Path, text: str) -> None:
    out = tmp_path / "ck"
    shutil.copytree(real, out)
    (out / "manifest.json").write_text(text)
    with pytest.raises(LowbitError, match="manifest .*manifest.json"):
        load(str(out))


def test_the_real_manifest_is_valid(real: Path) -> None:
    manifest = read_manifest(real)
    assert manifest["format_version"] == 2 and len(manifest["modules"]) == 23
