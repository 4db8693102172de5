"""What a model costs: parameters, weight bytes (memory and disk), peak RSS and encode latency.

- ``weight_bytes`` is the sum of ``nbytes`` of every parameter and buffer, each tensor counted once. Packed
  low-bit weights live in buffers (``qweight`` uint8, ``scales`` fp16, ...) and are counted as stored, so
  this is what the model really occupies, not what it would occupy unpacked.
- ``disk_bytes`` is the total size of the ``*.safetensors`` files of a checkpoint (None if none given).
- ``file_bytes`` is what a user ships: every file of the checkpoint directory (weights, manifest, configs,
  tokenizer); for a model with no checkpoint, its state dict as stored (``state_bytes``: each tensor once,
  the safetensors payload). ``fp16_bytes`` is the same state dict with every float tensor cast to fp16: the
  cheapest compression a user has, the row every low-bit result is compared with besides fp32.
- ``peak_rss_mib`` is the *whole process's* high-water mark (``getrusage``), including Python, torch, the
  dataset and any other model loaded so far. It never goes down, so compare it across fresh processes.
- Latencies are **encode only**: ``preprocess``/``tokenize`` run once outside the timer, then
  ``encode_image``/``encode_text`` are timed after one warm-up call. Reported as the median over repeats,
  divided by the batch size (ms per item).
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lowbit.errors import LowbitError
from lowbit.models.base import DualEncoder

BATCH_SIZES = (1, 32)


def weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Element and byte counts of ``model``'s parameters and buffers (shared tensors counted once).

    Example:
        >>> weight_bytes(torch.nn.Linear(4, 2))
        {'parameters': 10, 'parameter_bytes': 40, 'buffer_bytes': 0, 'weight_bytes': 40}
    """
    params = list(model.parameters())  # parameters()/buffers() already drop tied duplicates
    buffers = list(model.buffers())
    param_bytes = sum(p.nbytes for p in params)
    buffer_bytes = sum(b.nbytes for b in buffers)
    return {
        "parameters": sum(p.numel() for p in params),
        "parameter_bytes": param_bytes,
        "buffer_bytes": buffer_bytes,
        "weight_bytes": param_bytes + buffer_bytes,
    }


def disk_bytes(checkpoint: str | os.PathLike[str]) -> int:
    """Total size of the ``*.safetensors`` file(s) at ``checkpoint`` (a file or a directory, recursively).

    Example:
        >>> disk_bytes("checkpoints/clip-int4")  # doctest: +SKIP
        48211968
    """
    path = Path(checkpoint)
    if path.is_file():
        return path.stat().st_size
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else []
    if not files:
        raise LowbitError(
            f"no weights found for the disk footprint; received {str(path)!r}; "
            "accepted: a .safetensors file or a directory containing *.safetensors"
        )
    return sum(f.stat().st_size for f in files)


def file_bytes(checkpoint: str | os.PathLike[str]) -> int:
    """Total size of every file at ``checkpoint`` (a file, or a directory recursively): the whole artifact."""
    path = Path(checkpoint)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        raise LowbitError(f"no checkpoint at {str(path)!r}; accepted: a file or a checkpoint directory")
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def state_bytes(model: torch.nn.Module, float_dtype: torch.dtype | None = None) -> int:
    """Bytes of ``model``'s state dict with each storage counted once, every floating-point tensor taken as
    ``float_dtype`` (None: as stored). Integer (packed) buffers always count as stored.

    Example:
        >>> state_bytes(torch.nn.Linear(4, 2)), state_bytes(torch.nn.Linear(4, 2), torch.float16)
        (40, 20)
    """
    total, seen = 0, set()
    for t in model.state_dict(keep_vars=True).values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:
            continue  # tied weights: one tensor on disk
        seen.add(key)
        size = t.element_size() if float_dtype is None or not t.is_floating_point() else \
            torch.empty((), dtype=float_dtype).element_size()
        total += t.numel() * size
    return total


def current_rss_mib() -> float:
    """Resident set size of this process now, in MiB (Linux ``/proc/self/statm``; else the peak so far)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return peak_rss_mib()
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """Peak resident set size of this whole process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS reports bytes.
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def _median_ms(fn: Callable[[], Any], repeats: int, tick: Callable[[], None]) -> float:
    fn()  # warm-up: first calls pay for allocator growth, lazy kernel selection and cache misses
    tick()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        tick()
    return statistics.median(times) * 1000


def _fill(items: Sequence[Any], n: int) -> list[Any]:
    """``n`` items, cycling through ``items`` when there are fewer (a batch of 32 from 5 samples)."""
    return [items[i % len(items)] for i in range(n)]


def measure_footprint(
    model: DualEncoder,
    sample_images: Sequence[Image.Image],
    sample_texts: Sequence[str],
    repeats: int = 5,
    batch_repeats: int = 3,
    checkpoint: str | os.PathLike[str] | None = None,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    progress: bool = False,
) -> dict[str, Any]:
    """Size and speed of ``model``: parameters, weight/disk bytes, peak RSS, ms per image/text, threads.

    ``repeats`` timed calls at batch 1 and ``batch_repeats`` at larger batches, each after one warm-up.
    Latency keys are ``image_ms_b{B}`` / ``text_ms_b{B}`` (ms per item, encode only); they are None when
    no samples are given. Samples are cycled to fill a batch.

    Example:
        >>> fp = measure_footprint(model, images[:4], ["a cat", "a dog"])  # doctest: +SKIP
        >>> fp["weight_bytes"], fp["image_ms_b1"], fp["image_ms_b32"]  # doctest: +SKIP
        (605143040, 41.2, 17.9)
    """
    if repeats < 1 or batch_repeats < 1:
        raise LowbitError(
            f"footprint repeats must be positive; received repeats={repeats}, batch_repeats={batch_repeats}; "
            "accepted: integers >= 1"
        )
    from tqdm.auto import tqdm

    result: dict[str, Any] = dict(weight_bytes(model))
    result["disk_bytes"] = None if checkpoint is None else disk_bytes(checkpoint)
    result["file_bytes"] = state_bytes(model) if checkpoint is None else file_bytes(checkpoint)
    result["file_bytes_scope"] = ("state dict as stored (no checkpoint file)" if checkpoint is None
                                  else "every file of the checkpoint directory")
    result["fp16_bytes"] = state_bytes(model, torch.float16)

    def reps(b: int) -> int:
        return repeats if b == 1 else batch_repeats

    total = sum(reps(b) + 1 for b in batch_sizes) * (bool(sample_images) + bool(sample_texts))
    # delay=2: quick measurements stay silent, only slow models show a bar.
    bar = tqdm(total=total, desc="footprint", unit="call", disable=not progress, leave=False, delay=2)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for b in batch_sizes:
                if sample_images:
                    pixels = model.preprocess(_fill(sample_images, b))
                    ms = _median_ms(partial(model.encode_image, pixels), reps(b), bar.update)
                    result[f"image_ms_b{b}"] = ms / b
                else:
                    result[f"image_ms_b{b}"] = None
                if sample_texts:
                    tokens = model.tokenize(_fill(sample_texts, b))
                    ms = _median_ms(partial(model.encode_text, tokens), reps(b), bar.update)
                    result[f"text_ms_b{b}"] = ms / b
                else:
                    result[f"text_ms_b{b}"] = None
    finally:
        bar.close()
        model.train(was_training)
    result["peak_rss_mib"] = peak_rss_mib()
    load = getattr(model, "lowbit_load", None)  # set by lowbit.load: time and memory of loading this model
    if isinstance(load, dict):
        result["load"] = dict(load)
    result["threads"] = torch.get_num_threads()
    result["latency_scope"] = "encode only (preprocess/tokenize excluded); median ms per item after warm-up"
    result["peak_rss_scope"] = "whole process, high-water mark since start"
    return result
