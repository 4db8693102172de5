"""resolve_dataset: registered names, folders and index files; a clear error for anything else."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

import lowbit.data
from lowbit.data import DATASETS, resolve_dataset
from lowbit.errors import LowbitError


def test_registered_names() -> None:
    shapes = resolve_dataset("shapes", split="train", limit=5)
    assert shapes.name == "shapes" and len(shapes) == 5
    fm = resolve_dataset("fashion-mnist", limit=7)
    assert fm.name == "fashion-mnist" and len(fm) == 7


def test_folder_and_index_file(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "captions.csv").write_text("image,caption\na.png,one\n")
    (tmp_path / "labels.csv").write_text("image,label\na.png,cat\n")
    assert resolve_dataset(str(tmp_path / "labels.csv")).classnames == ["cat"]
    (tmp_path / "labels.csv").unlink()
    assert resolve_dataset(tmp_path).captions == ["one"]


def test_unknown_lists_choices() -> None:
    with pytest.raises(LowbitError) as err:
        resolve_dataset("imagenet")
    # other test modules may register datasets of their own; the built-ins lead the list either way
    names = ", ".join(DATASETS.names())
    assert names.startswith("fashion-mnist, scenes, shapes")
    assert str(err.value) == (
        f"unknown dataset 'imagenet'; choose one of: {names}, a folder of images (with or without "
        "captions.csv/labels.csv/.jsonl), or a folder of webdataset shards"
    )


def test_public_names_exist() -> None:
    assert all(hasattr(lowbit.data, name) for name in lowbit.data.__all__)
