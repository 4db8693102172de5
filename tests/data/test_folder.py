"""User folders: index formats, skipped files counted and named, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from lowbit.data import ImageSkippedWarning, load_folder
from lowbit.errors import LowbitError

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def _write_csv(path: Path, header: str, rows: list[str]) -> None:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    """3 good images (png, jpg, RGBA png), 1 random-bytes file, 1 empty file, 1 missing file."""
    Image.new("RGB", (16, 16), COLOURS["red"]).save(tmp_path / "red.png")
    Image.new("RGB", (16, 16), COLOURS["green"]).save(tmp_path / "green.jpg", quality=95)
    Image.new("RGBA", (16, 16), (*COLOURS["blue"], 255)).save(tmp_path / "blue.png")
    (tmp_path / "corrupt.jpg").write_bytes(os.urandom(1000))
    (tmp_path / "empty.png").write_bytes(b"")
    _write_csv(
        tmp_path / "captions.csv",
        "image,caption,label",
        [
            "red.png,a red square,red",
            "corrupt.jpg,a broken file,red",
            "green.jpg,a green square,green",
            "empty.png,nothing,blue",
            "missing.png,gone,blue",
            'blue.png,"a blue square, opaque",blue',
        ],
    )
    return tmp_path


def test_messy_folder_loads_good_images_and_counts_skips(messy: Path) -> None:
    with pytest.warns(ImageSkippedWarning) as record:
        ds = load_folder(messy)
    assert len(ds) == 3 and ds.skipped == 3
    messages = " | ".join(str(w.message) for w in record)
    assert len(record) == 3
    assert "corrupt.jpg" in messages and "empty.png" in messages and "missing.png" in messages
    assert ds.captions == ["a red square", "a green square", "a blue square, opaque"]
    assert ds.classnames == ["blue", "green", "red"] and ds.labels == [2, 1, 0]
    assert ds.name == messy.name
    for img, caption in zip(ds.images, ds.captions, strict=True):  # captions stay aligned with pixels
        assert img.mode == "RGB"
        expected = COLOURS[caption.split()[1]]
        assert all(abs(a - b) < 8 for a, b in zip(img.getpixel((8, 8)), expected, strict=True))


def test_limit_stops_reading(messy: Path) -> None:
    with pytest.warns(ImageSkippedWarning) as record:
        ds = load_folder(messy, limit=2)
    assert ds.captions == ["a red square", "a green square"] and ds.skipped == 1 and len(record) == 1


def test_jsonl_with_file_key_and_labels_only(tmp_path: Path) -> None:
    sub = tmp_path / "imgs"
    sub.mkdir()
    for i in range(3):
        Image.new("L", (8, 8), i * 40).save(sub / f"{i}.png")
    rows = [{"file": "imgs/0.png", "label": "cat"}, {"file": "imgs/1.png", "label": "dog"}]
    rows.append({"file": "imgs/2.png", "label": "cat", "extra": 1})
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = load_folder(tmp_path)
    assert ds.captions is None and ds.classnames == ["cat", "dog"] and ds.labels == [0, 1, 0]
    assert ds.skipped == 0 and ds.images[1].getpixel((0, 0)) == (40, 40, 40)


def test_labels_csv_with_path_column_bom_and_numeric_labels(tmp_path: Path) -> None:
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    (tmp_path / "labels.csv").write_text("\ufeffPath, Label\n0.png,10\n1.png,9\n2.png,2\n", encoding="utf-8")
    ds = load_folder(tmp_path)
    assert ds.classnames == ["2", "9", "10"] and ds.labels == [2, 1, 0]


def test_empty_cells_skip_the_row(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    _write_csv(tmp_path / "captions.csv", "image,caption", ["a.png,black", "a.png,", ",orphan caption"])
    with pytest.warns(ImageSkippedWarning) as record:
        ds = load_folder(tmp_path)
    assert ds.captions == ["black"] and ds.skipped == 2
    first, second = (str(w.message) for w in record)
    assert "row 2 of" in first and first.endswith("empty caption")
    assert "row 3 of" in second and second.endswith("empty image")


@pytest.mark.parametrize(
    ("header", "rows"),
    [("filename,text", ["a.png,hello"]), ("image,tag", ["a.png,x"]), ("caption,label", ["hi,x"])],
)
def test_bad_columns_name_the_accepted_form(tmp_path: Path, header: str, rows: list[str]) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    _write_csv(tmp_path / "captions.csv", header, rows)
    with pytest.raises(LowbitError) as err:
        load_folder(tmp_path)
    message = str(err.value)
    assert "\n" not in message and f"[{', '.join(sorted(header.split(',')))}]" in message
    for accepted in ("'image'", "'file'", "'path'", "'caption'", "'label'"):
        assert accepted in message


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match="no index file in .*captions.csv, labels.csv or a .jsonl"):
        load_folder(tmp_path)
    with pytest.raises(LowbitError, match="is not a directory"):
        load_folder(tmp_path / "nope")
    _write_csv(tmp_path / "captions.csv", "image,caption", [])
    with pytest.raises(LowbitError, match="lists no images"):
        load_folder(tmp_path)
    _write_csv(tmp_path / "captions.csv", "image,caption", ["gone.png,x"])
    with pytest.warns(ImageSkippedWarning), pytest.raises(LowbitError, match="no readable images"):
        load_folder(tmp_path)
    (tmp_path / "more.jsonl").write_text('{"image": "a.png", "caption": "x"}\n')
    with pytest.raises(LowbitError, match=r"several index files .*\(captions.csv, more.jsonl\)"):
        load_folder(tmp_path)
    (tmp_path / "more.jsonl").write_text('{"image": "a.png", "caption": "x"}\n[1, 2]\n')
    with pytest.raises(LowbitError, match="more.jsonl:2 is a JSON list; expected an object"):
        load_folder(tmp_path, index="more.jsonl")
    with pytest.raises(LowbitError, match="index file .*other.csv not found"):
        load_folder(tmp_path, index="other.csv")
