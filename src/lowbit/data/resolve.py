"""Turn a user's dataset argument (a registered name, a folder or an index file) into an ImageTextSet."""

from __future__ import annotations

import os
from pathlib import Path

from lowbit.data.base import DATASETS, ImageTextSet
from lowbit.data.folder import INDEX_NAMES, load_folder
from lowbit.data.images import load_images
from lowbit.data.shards import is_shard_dir
from lowbit.errors import LowbitError

_INDEX_SUFFIXES = (".csv", ".jsonl")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def resolve_dataset(
    spec: str | os.PathLike[str], split: str = "test", limit: int | None = None
) -> ImageTextSet:
    """Load ``spec``: a registered dataset name, a folder with an index, or an index file in a folder.

    Registered names win over same-named folders; write ``./shapes`` to mean the folder. A folder has
    no splits, so ``split`` only applies to registered datasets.
    """
    spec = os.fspath(spec)
    if spec in DATASETS:
        return DATASETS.get(spec)(split=split, limit=limit)
    path = Path(spec).expanduser()
    if is_shard_dir(path):
        return _from_shards(path, limit)
    if path.is_dir() and not _has_index(path):
        return _images_only(path, limit)
    if path.is_dir():
        return load_folder(path, limit=limit)
    if path.is_file() and path.suffix.lower() in _INDEX_SUFFIXES:
        return load_folder(path.parent, index=path.name, limit=limit)
    choices = ", ".join(DATASETS.names())
    raise LowbitError(
        f"unknown dataset {spec!r}; choose one of: {choices}, a folder of images (with or without "
        "captions.csv/labels.csv/.jsonl), or a folder of webdataset shards"
    )


def _has_index(folder: Path) -> bool:
    return any((folder / name).is_file() for name in INDEX_NAMES) or any(folder.glob("*.jsonl"))


def _images_only(folder: Path, limit: int | None) -> ImageTextSet:
    """A folder of images without captions (calibration needs no labels); sorted by name, recursively."""
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise LowbitError(f"{str(folder)!r} holds no index and no images ({', '.join(IMAGE_SUFFIXES)}); accepted: "
                          "a folder of images, with or without captions.csv/labels.csv/.jsonl")
    images, _, skipped = load_images(paths, limit=limit)
    return ImageTextSet(name=folder.name, images=images, skipped=skipped)


def _from_shards(folder: Path, limit: int | None) -> ImageTextSet:
    """The first ``limit`` samples of webdataset shards, in shard order (no shuffling: deterministic)."""
    from lowbit.data.shards import ShardStream

    samples = []
    for sample in ShardStream(folder, shuffle_buffer=1).epoch(0):
        samples.append(sample)
        if limit is not None and len(samples) >= limit:
            break
    return ImageTextSet(name=folder.name, images=[s.image for s in samples], captions=[s.caption for s in samples])
