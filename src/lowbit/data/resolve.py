"""Turn a user's dataset argument (a registered name, a folder or an index file) into an ImageTextSet."""

from __future__ import annotations

import os
from pathlib import Path

from lowbit.data.base import DATASETS, ImageTextSet
from lowbit.data.folder import load_folder
from lowbit.errors import LowbitError

_INDEX_SUFFIXES = (".csv", ".jsonl")


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
    if path.is_dir():
        return load_folder(path, limit=limit)
    if path.is_file() and path.suffix.lower() in _INDEX_SUFFIXES:
        return load_folder(path.parent, index=path.name, limit=limit)
    choices = ", ".join(DATASETS.names())
    raise LowbitError(
        f"unknown dataset {spec!r}; choose one of: {choices}, or a folder with captions.csv/labels.csv/.jsonl"
    )
