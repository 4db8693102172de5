"""Image-text data at scale: webdataset tar shards in the img2dataset layout, written and streamed.

Layout of a shard directory (what img2dataset produces, minus its parquet files)::

    00000.tar  00001.tar  ...  manifest.json
      000000000.jpg  000000000.txt  000000000.json   <- one sample: image, caption, metadata
      000000001.jpg  ...

A sample is the run of consecutive tar members sharing a key (the file name up to its first dot, the
webdataset convention); ``.txt`` holds the caption, ``.json`` ``{"caption", "label", "classname", "key"}``.
``manifest.json`` (optional when reading) records counts, class names and prompt templates.

Streaming (``ShardStream``): each epoch permutes the shards with ``(seed, epoch)`` and deals them to the
``world * num_workers`` (rank, worker) slots, so every sample is read exactly once per epoch across all
ranks and workers; with fewer shards than slots every slot reads all shards and keeps every n-th sample.
A slot decodes its samples and shuffles them in a buffer seeded by ``(seed, epoch, slot)``. A corrupt sample
(undecodable image, missing caption) or a truncated shard is skipped, counted in ``ShardStats`` and
reported with a warning, never the end of the run.

Why plain ``tarfile`` and not the ``webdataset`` package (1.0.2 installs cleanly here, and reads these
shards): training needs a stream that is a pure function of (seed, epoch, rank, worker) so a resumed run
replays exactly, exact once-per-epoch coverage even with fewer shards than slots, and skip counters the
run can report; webdataset's handlers drop bad samples without counting and its pipelines are not
resumable. The format itself is unchanged, so shards stay interchangeable with webdataset/img2dataset tools.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lowbit.data.base import ImageTextSet
from lowbit.data.images import ImageSkippedWarning, _to_rgb
from lowbit.errors import LowbitError
from lowbit.io import OutputKind, atomic_path, check_output, register_output_kind, write_json
from lowbit.limits import MAX_SHARD_MEMBER_BYTES, decode_image

IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
IMAGE_FORMATS: dict[str, str] = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
MANIFEST = "manifest.json"



def _is_shard_output(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == "webdataset"
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


register_output_kind(OutputKind("shards", is_dir=True, recognize=_is_shard_output))

class ShardWarning(UserWarning):
    """A shard was truncated or unreadable; the samples before the damage were kept."""


@dataclass
class Sample:
    """One decoded sample: RGB image, caption, optional label, and its key in the shards."""

    key: str
    image: Image.Image
    caption: str
    label: int | None = None


@dataclass
class ShardStats:
    """What a stream met: samples yielded, samples skipped (by reason), truncated shards."""

    samples: int = 0
    skipped: int = 0
    truncated_shards: int = 0
    reasons: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "skipped": self.skipped, "truncated_shards": self.truncated_shards,
                "reasons": dict(self.reasons)}


def _check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LowbitError(f"{name} must be a positive integer; received {value!r}; accepted: >= 1")
    return value


def write_shards(
    dataset: ImageTextSet, out_dir: str | os.PathLike[str], shard_size: int = 1000, image_format: str = "jpg",
    quality: int = 95, progress: bool = True, overwrite: bool = False, sources: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Write ``dataset`` as tar shards of ``shard_size`` samples in ``out_dir`` (atomically); return the manifest.

    Captions come from ``dataset.captions`` (or ``templates[0]`` with the class name when it has only
    labels). ``image_format`` is ``jpg`` (small, lossy, like img2dataset) or ``png``/``webp``.

    Example:
        >>> write_shards(resolve_dataset("shapes", "train"), "shards/shapes", shard_size=1000)  # doctest: +SKIP
        {'samples': 5000, 'shards': ['00000.tar', ...], ...}
    """
    _check_positive("shard_size", shard_size)
    check_output(out_dir, "shards", overwrite=overwrite, sources=sources)
    if image_format not in IMAGE_FORMATS:
        raise LowbitError(f"unknown image format {image_format!r}; choose one of: {', '.join(IMAGE_FORMATS)}")
    if dataset.captions is None and (dataset.labels is None or not dataset.classnames):
        raise LowbitError(f"dataset {dataset.name!r} has neither captions nor labels; accepted: image-text data")
    from tqdm.auto import tqdm

    names: list[str] = []
    with atomic_path(out_dir, is_dir=True) as tmp:
        bar = tqdm(total=len(dataset), desc="shards", unit="img", disable=not progress, delay=2)
        for start in range(0, len(dataset), shard_size):
            name = f"{start // shard_size:05d}.tar"
            with tarfile.open(tmp / name, "w") as tar:
                for i in range(start, min(start + shard_size, len(dataset))):
                    label = None if dataset.labels is None else int(dataset.labels[i])
                    classname = dataset.classnames[label] if label is not None and dataset.classnames else None
                    caption = (dataset.captions[i] if dataset.captions is not None
                               else dataset.templates[0].replace("{}", str(classname), 1))
                    key = f"{i:09d}"
                    buf = io.BytesIO()
                    img = dataset.images[i]
                    img = img if img.mode in ("RGB", "L") else img.convert("RGB")
                    img.save(buf, format=IMAGE_FORMATS[image_format], quality=quality)
                    meta = {"key": key, "caption": caption, "label": label, "classname": classname}
                    for ext, data in ((image_format, buf.getvalue()), ("txt", caption.encode()),
                                      ("json", json.dumps(meta).encode())):
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
                    bar.update(1)
            names.append(name)
        bar.close()
        manifest = {"format": "webdataset", "dataset": dataset.name, "samples": len(dataset), "shards": names,
                    "shard_size": shard_size, "image_format": image_format, "classnames": dataset.classnames,
                    "templates": dataset.templates}
        write_json(tmp / MANIFEST, manifest)
    return manifest


def list_shards(path: str | os.PathLike[str]) -> list[Path]:
    """The ``.tar`` shards of a directory (sorted), or ``[path]`` for a single tar file."""
    p = Path(path)
    shards = sorted(p.glob("*.tar")) if p.is_dir() else ([p] if p.suffix == ".tar" and p.is_file() else [])
    if not shards:
        raise LowbitError(f"no tar shards at {path}; accepted: a directory of *.tar shards or one .tar file")
    return shards


def is_shard_dir(path: str | os.PathLike[str]) -> bool:
    """True for a directory holding ``*.tar`` shards."""
    p = Path(path)
    return p.is_dir() and any(p.glob("*.tar"))


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``manifest.json`` of a shard directory, or ``{}`` when it has none (plain img2dataset output)."""
    f = Path(path) / MANIFEST
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, json.JSONDecodeError) as exc:
        raise LowbitError(f"cannot read {f}: {exc}; accepted: the JSON written by write_shards") from exc


def _split_key(name: str) -> tuple[str, str]:
    """``dir/000001.seg.jpg`` -> (``dir/000001``, ``seg.jpg``): the key ends at the basename's first dot."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def iter_raw(shard: Path, stats: ShardStats) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` groups of one shard, in order; stops (counted, warned) at truncation."""
    key, group = None, {}
    try:
        with tarfile.open(shard, "r|*") as tar:  # streaming mode: one pass, no index, works on pipes too
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = _split_key(member.name)
                if member.size > MAX_SHARD_MEMBER_BYTES:  # a gzip of zeros declaring gigabytes: never read
                    warnings.warn(f"shard {shard}: member {member.name} has {member.size} bytes; skipped (accepted: "
                                  f"at most {MAX_SHARD_MEMBER_BYTES})", ShardWarning, stacklevel=2)
                    stats.skipped += 1
                    stats.reasons["member too large"] += 1
                    continue
                f = tar.extractfile(member)
                data = f.read() if f is not None else b""
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} cut short")
                if k != key and key is not None:
                    yield key, group
                    group = {}
                key = k
                group[ext] = data
        if key is not None:
            yield key, group
    except (tarfile.TarError, OSError, EOFError) as exc:
        # The partial group at the cut is dropped: its image or caption may be missing or cut.
        stats.truncated_shards += 1
        warnings.warn(f"shard {shard} is truncated or corrupt ({exc}); kept the samples before the damage",
                      ShardWarning, stacklevel=2)


def decode(key: str, group: dict[str, bytes]) -> tuple[Sample | None, str]:
    """A Sample from a raw group, or ``(None, reason)`` when it is unusable."""
    ext = next((e for e in IMAGE_EXTS if e in group), None)
    if ext is None:
        return None, "no image"
    meta: dict[str, Any] = {}
    if "json" in group:
        try:
            meta = json.loads(group["json"])
        except (ValueError, RecursionError):  # bad JSON, bad UTF-8, nested too deep: no metadata
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
    caption = group["txt"].decode("utf-8", errors="replace").strip() if "txt" in group else meta.get("caption")
    if not caption or not isinstance(caption, str):
        return None, "no caption"
    try:
        # decode now (a cut or corrupt file fails here, not later inside a batch), bounded and downscaled
        rgb = _to_rgb(decode_image(group[ext], what=f"image of sample {key}"))
    except LowbitError as exc:
        return None, f"bad image ({str(exc)[:80]})"
    label = meta.get("label")
    return Sample(key, rgb, caption, int(label) if isinstance(label, int) else None), ""


class ShardStream:
    """Decoded, shuffled samples from tar shards, split by rank and worker (see the module docstring).

    Example:
        >>> stream = ShardStream("shards/shapes", seed=0)  # doctest: +SKIP
        >>> next(stream.epoch(0, rank=0, world=2, worker=1, num_workers=2)).caption  # doctest: +SKIP
        'a small red star above a large blue circle'
    """

    def __init__(self, path: str | os.PathLike[str], seed: int = 0, shuffle_buffer: int = 1000,
                 max_warnings: int = 20) -> None:
        self.shards = list_shards(path)
        self.manifest = read_manifest(path) if Path(path).is_dir() else {}
        self.seed = seed
        self.shuffle_buffer = max(int(shuffle_buffer), 1)
        self.stats = ShardStats()
        self._warnings_left = max_warnings

    def _slot_raw(self, epoch: int, slot: int, n_slots: int) -> Iterator[tuple[str, dict[str, bytes]]]:
        order = [self.shards[i] for i in np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))]
        if len(order) >= n_slots:
            for shard in order[slot::n_slots]:
                yield from iter_raw(shard, self.stats)
        else:  # fewer shards than slots: everyone reads everything and keeps its share of the samples
            i = 0
            for shard in order:
                for item in iter_raw(shard, self.stats):
                    if i % n_slots == slot:
                        yield item
                    i += 1

    def epoch(self, epoch: int, rank: int = 0, world: int = 1, worker: int = 0,
              num_workers: int = 1) -> Iterator[Sample]:
        """This (rank, worker) slot's samples of ``epoch``, decoded and buffer-shuffled."""
        n_slots = world * num_workers
        slot = rank * num_workers + worker
        rng = np.random.default_rng([self.seed, epoch, slot, 1])
        buffer: list[Sample] = []
        for key, group in self._slot_raw(epoch, slot, n_slots):
            sample, reason = decode(key, group)
            if sample is None:
                self._skip(key, reason)
                continue
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            j = int(rng.integers(len(buffer)))
            buffer[j], sample = sample, buffer[j]
            self.stats.samples += 1
            yield sample
        for j in rng.permutation(len(buffer)):
            self.stats.samples += 1
            yield buffer[j]

    def stream(self, rank: int = 0, world: int = 1, worker: int = 0, num_workers: int = 1,
               skip: int = 0) -> Iterator[Sample]:
        """Endless epochs of this slot's samples, after dropping the first ``skip`` (resume)."""
        epoch, seen = 0, 0
        while True:
            produced = False
            for sample in self.epoch(epoch, rank, world, worker, num_workers):
                produced = True
                if seen >= skip:
                    yield sample
                seen += 1
            if not produced:
                raise LowbitError(
                    f"no usable samples for rank {rank}/{world}, worker {worker}/{num_workers} in "
                    f"{len(self.shards)} shards ({self.stats.skipped} skipped); accepted: shards with readable samples"
                )
            epoch += 1

    def _skip(self, key: str, reason: str) -> None:
        self.stats.skipped += 1
        self.stats.reasons[reason] += 1
        if self._warnings_left > 0:
            self._warnings_left -= 1
            warnings.warn(f"skipping sample {key!r}: {reason}", ImageSkippedWarning, stacklevel=3)


def load_shards(path: str | os.PathLike[str], limit: int | None = None) -> ImageTextSet:
    """Read shards into memory in their stored order (for evaluation or small data); skips are counted."""
    stats = ShardStats()
    images, captions, labels = [], [], []
    for shard in list_shards(path):
        if limit is not None and len(images) >= limit:
            break
        for key, group in iter_raw(shard, stats):
            if limit is not None and len(images) >= limit:
                break
            sample, reason = decode(key, group)
            if sample is None:
                stats.skipped += 1
                warnings.warn(f"skipping sample {key!r}: {reason}", ImageSkippedWarning, stacklevel=2)
                continue
            images.append(sample.image)
            captions.append(sample.caption)
            labels.append(sample.label)
    manifest = read_manifest(path) if Path(path).is_dir() else {}
    has_labels = bool(labels) and all(x is not None for x in labels) and manifest.get("classnames")
    return ImageTextSet(
        name=manifest.get("dataset", Path(path).name), images=images, captions=captions,
        labels=labels if has_labels else None, classnames=manifest.get("classnames") if has_labels else None,
        templates=manifest.get("templates") or ["a photo of a {}."], skipped=stats.skipped,
    )
