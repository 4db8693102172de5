"""open_image / load_images: every kind of bad file becomes None or a counted, named warning."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image

from lowbit.data.images import ImageSkippedWarning, load_images, open_image


def _png(path: Path, mode: str = "RGB", colour: object = (200, 10, 10), size: int = 8) -> Path:
    Image.new(mode, (size, size), colour).save(path)
    return path


def test_good_images_are_decoded_as_rgb(tmp_path: Path) -> None:
    rgb = open_image(_png(tmp_path / "a.png"))
    grey = open_image(_png(tmp_path / "b.png", mode="L", colour=77))
    assert rgb is not None and grey is not None
    assert rgb.mode == grey.mode == "RGB"
    assert rgb.getpixel((3, 3)) == (200, 10, 10)
    assert grey.getpixel((0, 0)) == (77, 77, 77)


def test_transparency_becomes_white(tmp_path: Path) -> None:
    img = open_image(_png(tmp_path / "t.png", mode="RGBA", colour=(0, 0, 0, 0)))
    assert img is not None and img.mode == "RGB"
    assert img.getpixel((1, 1)) == (255, 255, 255)


def test_image_outlives_its_file(tmp_path: Path) -> None:
    # Pixels must be in memory (load() done), not read lazily from a file that may be gone later.
    path = _png(tmp_path / "a.png")
    img = open_image(path)
    os.remove(path)
    assert img is not None and img.getpixel((0, 0)) == (200, 10, 10)


def test_bad_files_give_none(tmp_path: Path) -> None:
    (tmp_path / "random.jpg").write_bytes(os.urandom(2048))
    (tmp_path / "empty.png").write_bytes(b"")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG", compress_level=0)
    (tmp_path / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    jpg = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(jpg, format="JPEG")
    (tmp_path / "truncated.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) // 2])
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "adir.png").mkdir()
    for name in [
        "random.jpg",
        "empty.png",
        "truncated.png",
        "truncated.jpg",
        "text.png",
        "adir.png",
        "nope.png",
    ]:
        assert open_image(tmp_path / name) is None, name


def test_load_images_keeps_order_and_warns_per_bad_file(tmp_path: Path) -> None:
    good = [_png(tmp_path / f"g{i}.png", colour=(i * 50, 0, 0)) for i in range(3)]
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8garbage")
    paths = [good[0], tmp_path / "bad.jpg", good[1], tmp_path / "missing.png", good[2]]
    with pytest.warns(ImageSkippedWarning) as record:
        images, kept, skipped = load_images(paths)
    assert kept == [0, 2, 4]
    assert skipped == 2
    assert [im.getpixel((0, 0))[0] for im in images] == [0, 50, 100]
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert "bad.jpg" in messages[0] and "missing.png" in messages[1] and "not found" in messages[1]


def test_load_images_limit_stops_before_later_files(tmp_path: Path) -> None:
    good = [_png(tmp_path / f"g{i}.png") for i in range(2)]
    with pytest.warns(ImageSkippedWarning) as record:
        images, kept, skipped = load_images(
            [good[0], tmp_path / "x.png", good[1], tmp_path / "y.png"], limit=2
        )
    assert (len(images), kept, skipped) == (2, [0, 2], 1)
    assert len(record) == 1  # y.png was never looked at
