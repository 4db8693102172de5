"""Training batches for language-image pre-training: from in-memory datasets or streamed tar shards.

In memory (registered datasets and folders): every image goes once through the model's own image processor
(the exact pixels evaluation will see), stored as uint8; every distinct caption is tokenized once. A sample
carries a range of caption choices: its caption, or, for a labelled set whose captions are just
``templates[0]`` with the class name (Fashion-MNIST), every prompt template with its class name. Each step
picks one choice from ``(seed, step)``, per sample or (``same_template=True``) once per class so that all
images of a class share their caption in that step; either way the caption of a sample at a step does not
depend on how the global batch is split over processes, and a resumed run replays it. Batches carry
``caption_ids`` (index of the caption text; a stable hash for streamed text) for the losses' identical-caption
positives.

Streamed (shard directories, ``lowbit.data.shards``): DataLoader workers each own a (rank, worker) slot of
the shard stream, decode, preprocess and tokenize whole local batches; the loader returns them round-robin,
so step ``s`` always comes from logical worker ``s % num_workers`` and a resumed run skips exactly the
samples already consumed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lowbit.data.base import ImageTextSet
from lowbit.errors import LowbitError
from lowbit.train.sampling import BatchFactory, index_batches, local_batch_size

CAPTION_MODES: tuple[str, ...] = ("auto", "captions", "templates")


@dataclass
class CaptionTable:
    """Distinct captions, and for each sample the contiguous range ``[first, first + count)`` of its choices."""

    texts: list[str]
    first: np.ndarray  # int64 [N]
    count: np.ndarray  # int64 [N]


def _templated(data: ImageTextSet) -> bool:
    """True when captions only restate the label (``templates[0]`` with the class name), or are missing."""
    if data.labels is None or not data.classnames:
        return False
    if data.captions is None:
        return True
    first = data.templates[0]
    return all(c == first.replace("{}", data.classnames[y], 1) for c, y in zip(data.captions, data.labels,
                                                                               strict=True))


def caption_table(sets: Sequence[ImageTextSet], mode: str = "auto") -> CaptionTable:
    """Caption choices of the concatenation of ``sets``.

    ``mode``: ``templates`` (every template with the class name; needs labels), ``captions`` (the set's own
    captions), ``auto`` (templates for sets whose captions merely restate the label, else captions).

    Example:
        >>> table = caption_table([resolve_dataset("fashion-mnist", "train")])  # doctest: +SKIP
        >>> len(table.texts), int(table.count[0])  # doctest: +SKIP
        (80, 8)
    """
    if mode not in CAPTION_MODES:
        raise LowbitError(f"unknown caption mode {mode!r}; choose one of: {', '.join(CAPTION_MODES)}")
    texts: list[str] = []
    index: dict[str, int] = {}
    firsts, counts = [], []

    def add(text: str) -> int:
        if text not in index:
            index[text] = len(texts)
            texts.append(text)
        return index[text]

    for data in sets:
        use_templates = mode == "templates" or (mode == "auto" and _templated(data))
        if use_templates:
            if data.labels is None or not data.classnames:
                raise LowbitError(f"caption mode 'templates' needs labels; received unlabelled {data.name!r}; "
                                  "accepted: a labelled dataset, or --captions captions")
            # Each class's prompts are appended as one block, so a sample's choices are a contiguous range.
            starts = []
            for name in data.classnames:
                ids = [len(texts) + k for k in range(len(data.templates))]
                texts.extend(t.replace("{}", name, 1) for t in data.templates)
                starts.append(ids[0])
            firsts.append(np.asarray([starts[y] for y in data.labels], dtype=np.int64))
            counts.append(np.full(len(data), len(data.templates), dtype=np.int64))
        else:
            if data.captions is None:
                raise LowbitError(f"dataset {data.name!r} has no captions; received labels only with "
                                  "--captions captions; accepted: --captions templates or auto")
            firsts.append(np.asarray([add(c) for c in data.captions], dtype=np.int64))
            counts.append(np.ones(len(data), dtype=np.int64))
    return CaptionTable(texts, np.concatenate(firsts), np.concatenate(counts))


def processor_pixels(processor: Any, images: Sequence[Any], chunk: int = 2048, progress: bool = False) -> torch.Tensor:
    """All ``images`` through ``processor``, stored as uint8 [N, 3, H, W] (4x smaller than float).

    The processor rescales uint8 by 1/255 and normalises, so inverting that and rounding is exact.
    """
    from tqdm.auto import tqdm

    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    out = []
    for s in tqdm(range(0, len(images), chunk), desc="preprocess", disable=not progress, delay=2):
        px = processor(images=[im.convert("RGB") for im in images[s : s + chunk]], return_tensors="pt")["pixel_values"]
        out.append(((px * std + mean) * 255).round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def to_float_pixels(u8: torch.Tensor, processor: Any) -> torch.Tensor:
    """Inverse of the storage step of ``processor_pixels``: uint8 [B, 3, H, W] -> normalised float."""
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    return (u8.float() / 255.0 - mean) / std


def text_id(text: str) -> int:
    """A stable 63-bit id of a caption (identical text <-> identical id, in every process)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def tokenize_table(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask [U, max_length] of every distinct caption (padded to ``max_length``)."""
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def memory_batches(
    sets: Sequence[ImageTextSet], processor: Any, tokenizer: Any, global_batch: int, seed: int, max_length: int,
    pad_to_max: bool, captions: str = "auto", same_template: bool = False, progress: bool = False,
) -> tuple[BatchFactory, int]:
    """A resumable batch factory over in-memory ``sets``, and the number of samples.

    Batches are dicts ``pixel_values`` [b, 3, H, W], ``input_ids`` [b, L], ``caption_ids`` [b] and (unless
    ``pad_to_max``, the SigLIP convention) ``attention_mask`` [b, L] with ``L`` the longest caption of the batch.
    """
    table = caption_table(sets, captions)
    pixels = processor_pixels(processor, [im for s in sets for im in s.images], progress=progress)
    ids, mask = tokenize_table(tokenizer, table.texts, max_length)
    n = len(pixels)
    # A sample's draw comes from its own slot, or its caption block's (one per class), so that it does not
    # depend on which rank holds the sample.
    slot = table.first if same_template else np.arange(n)
    n_slots = int(slot.max()) + 1

    def collate(idx: np.ndarray, step: int) -> dict[str, torch.Tensor]:
        u = np.random.default_rng([seed, step, 17]).random(n_slots)[slot[idx]]
        choice = torch.as_tensor(table.first[idx] + (u * table.count[idx]).astype(np.int64))
        batch = {"pixel_values": to_float_pixels(pixels[torch.as_tensor(idx)], processor), "caption_ids": choice}
        if pad_to_max:
            batch["input_ids"] = ids[choice]
        else:
            length = int(mask[choice].sum(dim=1).max())
            batch["input_ids"] = ids[choice, :length]  # [b, L]: trimmed to the longest caption of the batch
            batch["attention_mask"] = mask[choice, :length]
        return batch

    return index_batches(n, global_batch, seed, collate), n


class _ShardBatches(torch.utils.data.IterableDataset):
    """One DataLoader worker = one logical worker slot of the shard stream, yielding whole local batches."""

    def __init__(self, path: str, processor: Any, tokenizer: Any, local_batch: int, seed: int, max_length: int,
                 pad_to_max: bool, start_step: int, rank: int, world: int, num_workers: int,
                 shuffle_buffer: int) -> None:
        self.args = (path, seed, shuffle_buffer)
        self.processor, self.tokenizer = processor, tokenizer
        self.local_batch, self.max_length, self.pad_to_max = local_batch, max_length, pad_to_max
        self.start_step, self.rank, self.world, self.num_workers = start_step, rank, world, num_workers

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        from lowbit.data.shards import ShardStream

        info = torch.utils.data.get_worker_info()
        loader_worker = info.id if info is not None else 0
        if info is not None:
            torch.set_num_threads(1)  # the training process owns the cores; workers only decode
        # Loader workers are visited round-robin from worker 0, so loader worker i serves steps start + i,
        # start + i + nw, ...: it must act as logical worker (start + i) % nw, whose stream is fixed.
        nw = self.num_workers
        logical = (self.start_step + loader_worker) % nw
        first_step = self.start_step + loader_worker
        path, seed, buffer = self.args
        stream = ShardStream(path, seed=seed, shuffle_buffer=buffer)
        samples = stream.stream(self.rank, self.world, logical, nw, skip=(first_step // nw) * self.local_batch)
        while True:
            chunk = [next(samples) for _ in range(self.local_batch)]
            px = self.processor(images=[s.image for s in chunk], return_tensors="pt")["pixel_values"]
            enc = self.tokenizer([s.caption for s in chunk], padding="max_length" if self.pad_to_max else True,
                                 truncation=True, max_length=self.max_length, return_tensors="pt")
            batch = {"pixel_values": px, "input_ids": enc["input_ids"],
                     "caption_ids": torch.tensor([text_id(s.caption) for s in chunk])}
            if not self.pad_to_max:
                batch["attention_mask"] = enc["attention_mask"]
            batch["_skipped"] = torch.tensor(stream.stats.skipped)
            batch["_truncated"] = torch.tensor(stream.stats.truncated_shards)
            yield batch


def shard_batches(
    path: str | os.PathLike[str], processor: Any, tokenizer: Any, global_batch: int, seed: int, max_length: int,
    pad_to_max: bool, num_workers: int = 2, shuffle_buffer: int = 1000,
    on_stats: Callable[[dict[str, int]], None] | None = None,
) -> BatchFactory:
    """A resumable batch factory streaming tar shards (see the module docstring).

    ``on_stats`` receives ``{"skipped": n, "truncated_shards": m}`` (summed over this rank's workers) after
    every batch, for reporting.
    """
    if num_workers < 0:
        raise LowbitError(f"num_workers must be >= 0; received {num_workers}; accepted: 0 (in process) or more")

    def factory(start_step: int, rank: int, world: int) -> Iterator[dict[str, torch.Tensor]]:
        nw = max(num_workers, 1)
        data = _ShardBatches(os.fspath(path), processor, tokenizer, local_batch_size(global_batch, world), seed,
                             max_length, pad_to_max, start_step, rank, world, nw, shuffle_buffer)
        loader: Any = (torch.utils.data.DataLoader(data, batch_size=None, num_workers=num_workers)
                       if num_workers > 0 else data)
        per_worker: dict[int, tuple[int, int]] = {}
        for step, batch in enumerate(loader, start=start_step):
            per_worker[step % nw] = (int(batch.pop("_skipped")), int(batch.pop("_truncated")))
            if on_stats is not None:
                on_stats({"skipped": sum(s for s, _ in per_worker.values()),
                          "truncated_shards": sum(t for _, t in per_worker.values())})
            yield batch

    return factory


def shard_captions(path: str | os.PathLike[str], limit: int | None = None) -> list[str]:
    """Captions of the shards (no image decoding), for building a tokenizer; ``limit`` caps the scan."""
    from lowbit.data.shards import ShardStats, iter_raw, list_shards, read_manifest

    stats = ShardStats()
    texts: list[str] = []
    for shard in list_shards(path):
        for _, group in iter_raw(shard, stats):
            if "txt" in group:
                texts.append(group["txt"].decode("utf-8", errors="replace").strip())
            if limit is not None and len(texts) >= limit:
                return texts
    manifest = read_manifest(path) if os.path.isdir(path) else {}
    for name in manifest.get("classnames") or []:
        texts.extend(t.replace("{}", name, 1) for t in manifest.get("templates") or [])
    return texts
