"""Fashion-MNIST from the installed IDX files, checked against an independent read of the raw bytes."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lowbit import paths
from lowbit.data import CLASSNAMES, DATASETS, TEMPLATES, load_fashion_mnist, load_fashion_mnist_arrays
from lowbit.data.fashion_mnist import parse_idx
from lowbit.errors import LowbitError


def _raw(name: str, header: int) -> np.ndarray:
    with gzip.open(paths.FASHION_MNIST_DIR / name, "rb") as f:
        return np.frombuffer(f.read()[header:], dtype=np.uint8)


def test_test_split_matches_raw_files() -> None:
    ds = load_fashion_mnist("test")
    raw_labels = _raw("t10k-labels-idx1-ubyte.gz", 8)
    raw_images = _raw("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    assert len(ds) == 10000 and ds.labels is not None
    assert np.bincount(ds.labels).tolist() == [1000] * 10
    assert ds.labels[0] == raw_labels[0]
    assert ds.labels == raw_labels.tolist()
    for i in (0, 1, 4321, 9999):
        assert ds.images[i].mode == "L" and ds.images[i].size == (28, 28)
        np.testing.assert_array_equal(np.asarray(ds.images[i]), raw_images[i])
    assert ds.classnames == CLASSNAMES and len(CLASSNAMES) == 10
    assert ds.templates == TEMPLATES and all("{}" in t for t in TEMPLATES)
    assert ds.captions is not None and ds.captions[0] == f"a photo of a {CLASSNAMES[ds.labels[0]]}."
    assert all(CLASSNAMES[y] in c for y, c in zip(ds.labels, ds.captions, strict=True))


def test_arrays_are_typed_cached_and_read_only() -> None:
    images, labels = load_fashion_mnist_arrays("train")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [6000] * 10
    assert load_fashion_mnist_arrays("train")[0] is images
    with pytest.raises(ValueError):
        images[0, 0, 0] = 1


def test_limit_is_deterministic_balanced_and_nested() -> None:
    a = load_fashion_mnist("test", limit=500)
    b = load_fashion_mnist("test", limit=500)
    small = load_fashion_mnist("test", limit=100)
    assert len(a) == 500 and a.labels == b.labels
    assert [im.tobytes() for im in a.images] == [im.tobytes() for im in b.images]
    assert a.labels is not None and a.labels != sorted(a.labels)  # a shuffled subset, not the first 500
    counts = np.bincount(a.labels, minlength=10)
    assert counts.min() >= 30 and counts.max() <= 70  # ~50 each
    assert small.labels == a.labels[:100]


def test_registered_and_split_checked() -> None:
    assert DATASETS.get("fashion-mnist") is load_fashion_mnist
    with pytest.raises(LowbitError, match="unknown fashion-mnist split 'val'; choose one of: test, train"):
        load_fashion_mnist("val")
    with pytest.raises(LowbitError, match="limit must be a positive integer"):
        load_fashion_mnist("test", limit=0)


def test_missing_directory_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(paths, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(LowbitError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist_arrays("test")
    monkeypatch.setattr(paths, "FASHION_MNIST_DIR", tmp_path)  # exists, but without files
    with pytest.raises(LowbitError, match="t10k-images-idx3-ubyte.gz not found"):
        load_fashion_mnist_arrays("test")


def test_bad_idx_files_are_rejected(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    header = bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    labels = bytes([0, 0, 8, 1]) + (2).to_bytes(4, "big") + bytes([3, 4])
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(labels)  # a labels file where images are expected
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(labels)
    monkeypatch.setattr(paths, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(LowbitError, match="magic 00000801, expected 00000803"):
        load_fashion_mnist_arrays("test")
    with pytest.raises(LowbitError, match="promises 1568"):
        parse_idx(header + bytes(100), 0x803)
    np.testing.assert_array_equal(
        parse_idx(header + bytes(range(256)) * 6 + bytes(32), 0x803)[0, 0, :3], [0, 1, 2]
    )
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(LowbitError, match="cannot read Fashion-MNIST file"):
        load_fashion_mnist_arrays("test")


def test_import_parses_nothing() -> None:
    code = (
        "import lowbit.data, lowbit.data.fashion_mnist as f; "
        "assert f._load_arrays.cache_info().currsize == 0; print(sorted(lowbit.data.DATASETS))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "fashion-mnist" in out and "shapes" in out
