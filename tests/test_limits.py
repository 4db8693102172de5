"""Bounded readers (``lowbit.limits``) and recipes under hostile input: one ``LowbitError`` each, fast, small."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import pytest

from lowbit.errors import LowbitError
from lowbit.limits import MAX_YAML_ALIASES, check_regular_file, load_yaml, loads_json, read_json
from lowbit.quant.recipe import load_recipe

BILLION_LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(8))


@pytest.mark.parametrize(("recipe", "message"), [
    ("*=w²", r"character 1 .*missing bit width after 'w' \(ASCII digits\)"),
    ("*=w٤", r"missing bit width after 'w' \(ASCII digits\)"),  # Arabic-Indic four
    ("*=w" + "9" * 5000, r"bits must be one of 1,2,3,4,5,6,8; received 5000 digits"),
    ("*=w4g" + "9" * 5000, r"group size after 'g' must be an integer in 1\.\.1048576"),
    ("*=w4g100000000000000000000", r"group size after 'g' must be an integer in 1\.\.1048576"),
    ("*=w4g0", r"group size after 'g' must be an integer"),
    ("*=w4," * 30000, r"recipe of 150000 characters; accepted: at most 10000"),
    ("*=w4\x00", r"with a NUL"),
])
def test_short_recipes_hostile(recipe: str, message: str) -> None:
    with pytest.raises(LowbitError, match=message) as exc:
        load_recipe(recipe)
    assert len(str(exc.value)) < 400  # the offending item is quoted cut short, not echoed whole


def _yaml(tmp_path: Path, data: str | bytes) -> str:
    path = tmp_path / "r.yaml"
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


@pytest.mark.parametrize(("data", "message"), [
    (BILLION_LAUGHS, rf"uses more than {MAX_YAML_ALIASES} YAML aliases"),
    ("[" * 10000 + "]" * 10000, r"nests deeper than 16 levels"),
    ("rules: " + "{a: " * 100 + "1" + "}" * 100, r"nests deeper than 16 levels"),
    ("rules: [{bits: 4, tower: café}]".encode("latin-1"), r"is not UTF-8 text \(byte 28: b'\\xe9'\)"),
    (bytes(range(256)), r"is not UTF-8 text \(byte 128"),
    ("rules:\n - {bits: 4, [1]: 2}\n", r"is not valid YAML \(while constructing a mapping"),
    ("rules: [{bits: 4.0}]", r"field 'bits': received 4.0"),
    ("rules: [{bits: 4, group_size: 100000000000000000000}]", r"field 'group_size': received 100000000000000000000"),
    ("rules: [{bits: 4, group_size: 1e20}]", r"field 'group_size': received '1e20'"),
    ("rules: [{bits: " + "9" * 5000 + "}]", r"holds a value lowbit cannot read \(Exceeds the limit \(4300 digits\)"),
    ("x" * (300 * 1024), r"has 307200 bytes; accepted: at most 262144"),
])
def test_yaml_recipes_hostile(tmp_path: Path, data: str | bytes, message: str) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(LowbitError, match=message) as exc:
        load_recipe(_yaml(tmp_path, data))
    assert time.perf_counter() - t0 < 2.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 * 1024  # KB: under 50 MB more
    assert "\n" not in str(exc.value)


def test_a_few_aliases_are_fine() -> None:
    assert load_yaml("a: &x [1, 2]\nb: *x\n", "doc", "YAML") == {"a": [1, 2], "b": [1, 2]}


def test_a_fifo_is_refused_before_opening(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    t0 = time.perf_counter()
    with pytest.raises(LowbitError, match="is not a regular file \\(a FIFO, socket or device\\)"):
        load_recipe(str(fifo))
    with pytest.raises(LowbitError, match="is not a regular file"):
        check_regular_file("/dev/zero", "image", "an image file")
    with pytest.raises(LowbitError, match="is a directory"):
        read_json(tmp_path, "manifest", "a JSON file")
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize(("text", "message"), [
    ("[" * 10000 + "]" * 10000, "nests deeper than 32 levels"),
    ("[" * 100 + "]" * 100, "nests deeper than 32 levels"),
    ('{"bits": NaN}', "NaN is not a JSON number"),
    ('{"bits": Infinity}', "Infinity is not a JSON number"),
    ('{"bits": -Infinity}', "-Infinity is not a JSON number"),
    ('{"bits": 4', r"not valid JSON \(line 1, column 11"),
])
def test_json_hostile(text: str, message: str) -> None:
    with pytest.raises(LowbitError, match=message):
        loads_json(text, "manifest", "a lowbit manifest")


@pytest.mark.parametrize(("line", "message"), [
    ('{"image": "a.png", "caption": ' + "[" * 10000 + "]" * 10000 + "}", r"index\.jsonl:1 nests deeper than 8"),
    ('{"image": "a.png", "caption": NaN}', r"index\.jsonl:1: NaN is not a JSON number"),
])
def test_jsonl_index_hostile(tmp_path: Path, line: str, message: str) -> None:
    from lowbit.data.folder import load_folder

    (tmp_path / "index.jsonl").write_text(line + "\n")
    with pytest.raises(LowbitError, match=message):
        load_folder(tmp_path)


def test_jsonl_index_that_is_a_fifo(tmp_path: Path) -> None:
    from lowbit.data.folder import load_folder

    os.mkfifo(tmp_path / "index.jsonl")
    with pytest.raises(LowbitError, match="is not a regular file"):
        load_folder(tmp_path, index="index.jsonl")


class _Zeros:
    """A file of ``n`` zero bytes, read in chunks (never held in memory)."""

    def __init__(self, n: int) -> None:
        self.left = n

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        self.left -= size
        return b"\0" * size


def test_a_gzip_shard_declaring_a_huge_member_is_skipped_in_small_memory(tmp_path: Path) -> None:
    import io as _io
    import tarfile

    from lowbit.data.shards import ShardStats, iter_raw

    shard = tmp_path / "bomb.tar.gz"
    with tarfile.open(shard, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("000000000.jpg")
        info.size = 80 * 2**20
        tar.addfile(info, _Zeros(info.size))  # type: ignore[arg-type]
        for ext, data in (("txt", b"a caption"),):
            small = tarfile.TarInfo(f"000000001.{ext}")
            small.size = len(data)
            tar.addfile(small, _io.BytesIO(data))
    assert shard.stat().st_size < 1_000_000  # a small file ...
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.warns(UserWarning, match=r"member 000000000.jpg has 83886080 bytes; skipped \(accepted: at most"):
        groups = list(iter_raw(shard, ShardStats()))
    assert groups == [("000000001", {"txt": b"a caption"})]
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 40 * 1024  # KB


def test_index_rows_outside_the_folder_are_not_read(tmp_path: Path) -> None:
    from PIL import Image

    from lowbit.data.folder import load_folder
    from lowbit.data.images import ImageSkippedWarning

    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8)).save(data / "ok.png")
    (data / "captions.csv").write_text(f"image,caption\nok.png,fine\n../secret.png,stolen\n{outside},stolen\n")
    with pytest.warns(ImageSkippedWarning, match="is outside"):
        loaded = load_folder(data)
    assert loaded.captions == ["fine"]
