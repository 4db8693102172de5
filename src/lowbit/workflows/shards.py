"""``lowbit data shard``: any supported dataset written as webdataset tar shards (img2dataset layout)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowbit.data import resolve_dataset
from lowbit.data.shards import write_shards
from lowbit.io import check_output


def shard_dataset(src: str, out: str | Path, shard_size: int = 1000, split: str = "train",
                  limit: int | None = None, image_format: str = "jpg", overwrite: bool = False) -> dict[str, Any]:
    """Write ``src`` (a dataset name, folder or index file) as shards; returns the shard manifest plus
    ``skipped`` (unreadable images left out)."""
    check_output(out, "shards", overwrite=overwrite, sources=[src])  # before reading a dataset
    data = resolve_dataset(src, split=split, limit=limit)
    manifest = write_shards(data, out, shard_size=shard_size, image_format=image_format, overwrite=overwrite,
                            sources=(src,))
    return {**manifest, "skipped": data.skipped}
