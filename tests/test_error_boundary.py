"""The error boundary: input errors are one line and exit 2; internal errors one line plus a written report and
exit 1 (the traceback only with --debug / LOWBIT_DEBUG=1); hostile model files and images are LowbitErrors."""

from __future__ import annotations

import io
import os
import pickle
import resource
import shutil
import struct
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from lowbit import api
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.limits import MAX_KEPT_IMAGE_SIDE, decode_image
from lowbit.models.loading import load_model

ASSET = Path(api.__file__).parent / "assets" / "clip-vit-tiny-fashion"


def _boom() -> list[dict[str, str]]:
    return [{"name": str(1 / 0)}]


def test_an_internal_error_is_one_line_and_a_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LOWBIT_HOME", str(tmp_path))
    monkeypatch.delenv("LOWBIT_DEBUG", raising=False)
    monkeypatch.setattr(api, "list_models", _boom)
    assert main(["models"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lowbit: internal error (ZeroDivisionError: division by zero)")
    report = Path(err.split("full report: ")[1].split(" (please")[0])
    assert report.parent == tmp_path / "crash-reports"
    text = report.read_text()
    assert "Traceback (most recent call last)" in text and "command: lowbit models" in text


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    monkeypatch.setattr(api, "list_models", _boom)
    if how == "env":
        monkeypatch.setenv("LOWBIT_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["models", "--debug"] if how == "flag" else ["models"])


def test_an_oserror_on_a_path_is_an_input_error(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    def denied() -> None:
        raise PermissionError(13, "Permission denied", "/data/x")

    monkeypatch.setattr(api, "list_models", denied)
    assert main(["models"]) == 2
    assert capsys.readouterr().err == ("lowbit: error: cannot use '/data/x': Permission denied; accepted: an "
                                       "existing, readable path (and a writable place for outputs)\n")


def test_an_impossible_lowbit_home_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LOWBIT_HOME", "/dev/null/x")
    from lowbit.paths import lowbit_home

    with pytest.raises(LowbitError, match="LOWBIT_HOME '/dev/null/x' cannot be created"):
        lowbit_home()


@pytest.fixture()
def clip_dir(tmp_path: Path) -> Path:
    out = tmp_path / "clip"
    shutil.copytree(ASSET, out)
    return out


class Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned > /tmp/lowbit-pwned",))


@pytest.mark.parametrize("damage", ["truncated", "header-too-large", "pickle-as-safetensors", "pickle-bin", "empty"])
def test_damaged_weight_files_are_one_line(clip_dir: Path, damage: str) -> None:
    weights = clip_dir / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "header-too-large":
        weights.write_bytes(struct.pack("<Q", 2**60) + data[8:100])
    elif damage == "pickle-as-safetensors":
        weights.write_bytes(pickle.dumps(Payload()))
    elif damage == "pickle-bin":
        weights.unlink()
        import torch

        torch.save({"x": Payload()}, clip_dir / "pytorch_model.bin")
    else:
        weights.write_bytes(b"")
    with pytest.raises(LowbitError, match=r"cannot load .* as a \w+ model \(.*\); accepted: a complete model") as exc:
        load_model(str(clip_dir))
    assert "\n" not in str(exc.value) and not Path("/tmp/lowbit-pwned").exists()


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height), 128).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height: a few hundred bytes of compressed zeros."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width + 1) * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


@pytest.mark.parametrize(("data", "message"), [
    (_png(10000, 1), r"is 10000x1 pixels \(aspect ratio 10000:1\)"),
    (_png(1, 20000), r"is 1x20000 pixels \(aspect ratio 20000:1\)"),
    (_bomb_png(100_000, 100_000), r"declares more than 67108864 pixels \(a decompression bomb\)"),
    (_bomb_png(10_000, 10_000), r"is 10000x10000 pixels; accepted: .* at most 67108864 pixels"),
    (_png(64, 64)[:40], r"cannot decode image of 40 bytes"),
    (b"", r"cannot decode image of 0 bytes"),
])
def test_hostile_images_are_refused_fast_and_small(data: bytes, message: str) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(LowbitError, match=message):
        api.open_image(data)
    assert time.perf_counter() - t0 < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 20 * 1024  # KB


def test_a_fifo_image_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "img.png"
    os.mkfifo(fifo)
    t0 = time.perf_counter()
    with pytest.raises(LowbitError, match="is not a regular file"):
        api.open_image(fifo)
    assert time.perf_counter() - t0 < 1.0


def test_big_photos_are_kept_downscaled(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (4000, 3000), (10, 20, 30)).save(path, quality=80)
    img = decode_image(path)
    assert max(img.size) == MAX_KEPT_IMAGE_SIDE and img.size == (1024, 768)
    assert api.open_image(path).size == (1024, 768)


def test_a_100000_layer_config_is_refused_before_building(clip_dir: Path) -> None:
    import json

    config = json.loads((clip_dir / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 100_000
    (clip_dir / "config.json").write_text(json.dumps(config))
    t0 = time.perf_counter()
    with pytest.raises(LowbitError, match=r"describes ~[\d,]+ parameters but the weight files hold [\d,]+ bytes"):
        load_model(str(clip_dir))
    assert time.perf_counter() - t0 < 1.0
