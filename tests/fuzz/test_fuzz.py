"""Property-based fuzzing (Hypothesis) of everything lowbit reads: recipe strings and YAML files, manifests
mutated from a real checkpoint, image bytes (truncated at every length, header bytes flipped, odd modes, huge
headers) and command lines. Every case ends in success or one ``LowbitError`` within a time bound: never another
exception, never a hang. The whole suite stays under a minute of CPU (``max_examples``, ``deadline``)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.limits import decode_image, load_yaml
from lowbit.quant.recipe import Recipe, load_recipe
from lowbit.workflows.load import load
from tests.fuzz import cases

FAST = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)


def _clean_or_ok(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except LowbitError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 1000, str(exc)[:200]
        return None


@FAST
@given(st.text(alphabet=cases.SHORT_ALPHABET, max_size=40) | st.text(max_size=40))
def test_recipe_strings(text: str) -> None:
    recipe = _clean_or_ok(load_recipe, text)
    assert recipe is None or isinstance(recipe, Recipe) and recipe.rules


@FAST
@given(json_values)
def test_recipe_mappings(data: Any) -> None:
    _clean_or_ok(Recipe.from_dict, {"rules": [data]})  # as one rule
    _clean_or_ok(Recipe.from_dict, data)  # as the whole recipe


@FAST
@given(st.text(max_size=200) | st.sampled_from([cases.billion_laughs(), "[" * 500 + "]" * 500, "&a [*a]"]))
def test_yaml_text(text: str) -> None:
    _clean_or_ok(load_yaml, text, "fuzzed YAML", "YAML")


@settings(max_examples=120, deadline=3000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_manifest_mutations_load_or_refuse(real_checkpoint: Path, real_manifest: dict[str, Any],
                                           tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    paths = [p for p in cases._paths(real_manifest) if p[0] in cases.LOAD_RELEVANT]
    path = data.draw(st.sampled_from(paths))
    value = data.draw(st.sampled_from([cases.MISSING, *cases.BAD_VALUES]) | json_values)
    out = tmp_path_factory.mktemp("m") / "ck"
    shutil.copytree(real_checkpoint, out)
    cases.write_manifest(out, cases.mutate(real_manifest, path, value))
    _clean_or_ok(load, str(out))


@pytest.mark.parametrize("name", sorted(cases.small_images()))
def test_images_truncated_at_every_byte_length(name: str) -> None:
    data = cases.small_images()[name]
    assert decode_image(data).size == (16, 12)
    decoded = 0
    for cut in range(len(data)):
        decoded += _clean_or_ok(decode_image, data[:cut]) is not None
    assert decoded < len(data) // 2  # most truncations are refused, none crash


@FAST
@given(name=st.sampled_from(sorted(cases.small_images())), flips=st.lists(
    st.tuples(st.integers(0, 63), st.integers(0, 255)), min_size=1, max_size=4))
def test_images_with_flipped_header_bytes(name: str, flips: list[tuple[int, int]]) -> None:
    buf = bytearray(cases.small_images()[name])
    for pos, byte in flips:
        buf[pos % len(buf)] = byte
    _clean_or_ok(decode_image, bytes(buf))


@pytest.fixture(scope="module")
def cli_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import os

    root = tmp_path_factory.mktemp("cli")
    (root / "docs").mkdir()
    (root / "docs" / "thesis.tex").write_text("keep")
    os.mkfifo(root / "fifo")
    return root


@settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1))
def test_command_lines(cli_root: Path, seed: int, capsys: pytest.CaptureFixture[str]) -> None:
    argv = next(cases.cli_argv(random.Random(seed), cli_root, 1))
    argv = [a for a in argv if a != "--debug"]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse: --help (0) and usage errors (2)
        code = exit_.code
    err = capsys.readouterr().err
    assert code in (0, 2), (argv, err[-500:])
    assert "Traceback" not in err and "internal error" not in err, (argv, err[-500:])
    assert (cli_root / "docs" / "thesis.tex").read_text() == "keep"


def test_manifest_every_field_every_bad_value(real_checkpoint: Path, real_manifest: dict[str, Any],
                                              tmp_path: Path) -> None:
    """The deterministic sweep: every field of every section, every bad value, missing, extra."""
    out = tmp_path / "ck"
    shutil.copytree(real_checkpoint, out)
    refused = 0
    for _, manifest in cases.manifest_mutations(real_manifest, random.Random(0), 0):
        cases.write_manifest(out, manifest)
        refused += _clean_or_ok(load, str(out)) is None
    assert refused > 300


def test_corpus_replays(real_checkpoint: Path, tmp_path: Path) -> None:
    """Files that once broke something, kept under tests/fuzz/corpus/ by kind; each is refused in one line."""
    corpus = Path(__file__).parent / "corpus"
    runners = {
        "recipes": lambda p: load_recipe(str(p)) if p.suffix == ".yaml" else load_recipe(p.read_text()),
        "images": lambda p: decode_image(p.read_bytes()),
        "manifests": lambda p: _load_with_manifest(real_checkpoint, tmp_path, p),
    }
    files = sorted(p for p in corpus.rglob("*") if p.is_file() and p.parent.name in runners)
    assert len(files) >= 10
    for path in files:
        with pytest.raises(LowbitError):
            runners[path.parent.name](path)


def _load_with_manifest(real_checkpoint: Path, tmp_path: Path, manifest: Path) -> None:
    out = tmp_path / manifest.stem
    shutil.copytree(real_checkpoint, out)
    shutil.copy(manifest, out / "manifest.json")
    load(str(out))


def test_corpus_manifests_are_real_mutations(real_manifest: dict[str, Any]) -> None:
    # the corpus manifests were made from this tiny checkpoint's manifest: their modules exist
    corpus = Path(__file__).parent / "corpus" / "manifests"
    for path in corpus.glob("*.json"):
        text = path.read_text()
        if text.startswith("{") and "modules" in text and "NaN" not in text and "Infinity" not in text:
            assert set(json.loads(text)["modules"]) <= set(real_manifest["modules"])
