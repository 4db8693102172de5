"""User data: a folder of images plus a CSV or JSONL index giving each image's caption and/or label."""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path
from typing import Any

from PIL import Image

from lowbit.data.base import ImageTextSet, check_limit
from lowbit.data.images import ImageSkippedWarning, load_images
from lowbit.errors import LowbitError
from lowbit.limits import MAX_JSONL_DEPTH, check_regular_file, loads_json

INDEX_NAMES: tuple[str, ...] = ("captions.csv", "labels.csv", "captions.jsonl", "labels.jsonl", "index.jsonl")
IMAGE_KEYS: tuple[str, ...] = ("image", "file", "path")  # first one present wins
TEXT_KEYS: tuple[str, ...] = ("caption", "label")
_ACCEPTED = (
    "an index (captions.csv, labels.csv or a .jsonl file) with an image column "
    "('image', 'file' or 'path', relative to the folder) and a 'caption' and/or 'label' column"
)


def find_index(folder: Path) -> Path:
    """The folder's index file: one of INDEX_NAMES, else its only ``.jsonl`` file.

    Several candidates are an error rather than a silent pick: loading the wrong one would mislabel data.
    """
    found = [folder / name for name in INDEX_NAMES if (folder / name).is_file()]
    found += [p for p in sorted(folder.glob("*.jsonl")) if p.is_file() and p not in found]
    if not found:
        raise LowbitError(f"no index file in {folder}; expected {_ACCEPTED}")
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise LowbitError(
            f"several index files in {folder} ({names}); "
            f"pass one of them (e.g. {found[0]}) instead of the folder"
        )
    return found[0]


def _read_rows(index: Path) -> list[dict[str, Any]]:
    """Index rows as dicts with stripped, lower-case keys."""
    check_regular_file(index, "index", _ACCEPTED)  # a FIFO would block forever
    try:
        if index.suffix.lower() == ".jsonl":
            rows = []
            with index.open(encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    row = loads_json(line, f"{index}:{lineno}", f"one JSON object per line ({_ACCEPTED})",
                                     max_depth=MAX_JSONL_DEPTH)
                    if not isinstance(row, dict):
                        kind = type(row).__name__
                        raise LowbitError(f"{index}:{lineno} is a JSON {kind}; expected an object")
                    rows.append(row)
        else:
            # utf-8-sig: spreadsheet exports often start with a byte-order mark that would corrupt column 1.
            with index.open(encoding="utf-8-sig", newline="") as f:
                rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LowbitError(f"cannot read index {index}: {exc}; expected UTF-8 text, {_ACCEPTED}") from exc
    return [{str(k).strip().lower(): v for k, v in row.items() if k is not None} for row in rows]


def _columns(index: Path, rows: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """The image column and the caption/label columns present, or a LowbitError naming what is accepted."""
    keys = {k for row in rows for k in row}
    image_key = next((k for k in IMAGE_KEYS if k in keys), None)
    text_keys = [k for k in TEXT_KEYS if k in keys]
    if image_key is None or not text_keys:
        got = ", ".join(sorted(keys)) or "none"
        raise LowbitError(f"index {index} has columns [{got}]; expected {_ACCEPTED}")
    return image_key, text_keys


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _classnames(names: list[str]) -> list[str]:
    """Sorted unique label names; numerically when all are integers, so "10" comes after "9"."""
    unique = set(names)
    if all(n.lstrip("-").isdigit() for n in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def load_folder(
    path: str | os.PathLike[str], index: str | os.PathLike[str] | None = None, limit: int | None = None
) -> ImageTextSet:
    """Load the images listed in a folder's index, with their captions and/or labels.

    ``index`` is the index file name (relative to ``path``) or path; by default ``find_index`` picks it.
    Labels (any strings) become ``classnames`` (sorted unique) and integer ``labels``.
    Rows whose image is missing, empty or corrupt, or whose caption/label cell is empty, are skipped with
    a warning and counted in ``skipped``. ``limit`` stops after that many images (in index order).
    """
    check_limit(limit)
    folder = Path(path)
    if not folder.is_dir():
        raise LowbitError(f"dataset folder {folder} is not a directory; expected a folder with {_ACCEPTED}")
    index_path = find_index(folder) if index is None else folder / index
    if not index_path.exists():
        raise LowbitError(f"index file {index_path} not found; expected {_ACCEPTED}")
    check_regular_file(index_path, "index file", _ACCEPTED)
    rows = _read_rows(index_path)
    if not rows:
        raise LowbitError(f"index {index_path} lists no images; expected {_ACCEPTED}")
    image_key, text_keys = _columns(index_path, rows)

    images: list[Image.Image] = []
    kept_texts: list[dict[str, str]] = []
    skipped = 0
    root = Path(os.path.abspath(folder))
    for n, row in enumerate(rows, 1):
        if limit is not None and len(images) >= limit:
            break  # stop early: a small limit should not decode (or warn about) the whole folder
        fields = {k: _text(row.get(k)) for k in (image_key, *text_keys)}
        empty = [k for k, v in fields.items() if not v]
        if empty:
            skipped += 1
            message = f"skipping row {n} of {index_path}: empty {', '.join(empty)}"
            warnings.warn(message, ImageSkippedWarning, stacklevel=2)
            continue
        image = folder / fields[image_key]
        # lexical, so symlinks placed inside the folder still work; "../../etc/passwd" and "/home/x.png" do not
        if not Path(os.path.normpath(os.path.abspath(image))).is_relative_to(root):
            skipped += 1
            warnings.warn(f"skipping row {n} of {index_path}: {fields[image_key]!r} is outside {folder}; accepted: "
                          "paths relative to the folder, inside it", ImageSkippedWarning, stacklevel=2)
            continue
        got, _, bad = load_images([image])  # warns about a bad file itself
        skipped += bad
        images += got
        kept_texts += [fields] * len(got)

    if not images:
        raise LowbitError(
            f"no readable images in {folder}: all {skipped} rows of {index_path.name} were skipped "
            "(missing, empty or corrupt files, or empty cells); see the warnings above"
        )
    labels: list[int] | None = None
    classnames: list[str] | None = None
    captions: list[str] | None = None
    if "label" in text_keys:
        names = [t["label"] for t in kept_texts]
        classnames = _classnames(names)
        position = {name: i for i, name in enumerate(classnames)}
        labels = [position[name] for name in names]
    if "caption" in text_keys:
        captions = [t["caption"] for t in kept_texts]
    return ImageTextSet(
        name=folder.resolve().name,
        images=images,
        labels=labels,
        classnames=classnames,
        captions=captions,
        skipped=skipped,
    )
