"""Deterministic, resumable batch order over an indexable dataset, split across ranks.

The global sample stream is the concatenation of seeded permutations, one per epoch:
position ``p`` is sample ``perm(seed, p // n)[p % n]``. Global step ``s`` covers positions
``[s * B, (s + 1) * B)`` and rank ``r`` of ``W`` takes the contiguous slice ``[r * B/W, (r + 1) * B/W)``.
So the batch of any step is a pure function of (seed, step, rank, world): resuming at step ``s`` needs no
saved iterator, and the ranks' slices concatenated in rank order are exactly the one-process batch (what
makes a 2-process run equal a 1-process run, and what distributed losses assume when they offset labels by
``rank * B/W``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from lowbit.errors import LowbitError

BatchFactory = Callable[[int, int, int], Iterator[Any]]
"""``batches(start_step, rank, world) -> iterator`` of this rank's batches for steps start_step, +1, ..."""


def local_batch_size(global_batch: int, world: int) -> int:
    """``global_batch / world``, or a LowbitError if it does not divide."""
    if global_batch < 1 or global_batch % world:
        raise LowbitError(
            f"global batch size must be a positive multiple of the number of processes; received "
            f"{global_batch} for {world} processes; accepted: e.g. {world * max(global_batch // world, 1)}"
        )
    return global_batch // world


def step_indices(n: int, global_batch: int, step: int, seed: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """Dataset indices of ``rank``'s share of the global batch at ``step`` (see module docstring).

    Example:
        >>> step_indices(10, 4, 0, seed=0, rank=1, world=2).shape
        (2,)
    """
    b = local_batch_size(global_batch, world)
    start = step * global_batch + rank * b
    positions = np.arange(start, start + b)  # global stream positions, may cross an epoch boundary
    epochs = positions // n
    out = np.empty(b, dtype=np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(n)
        mask = epochs == epoch
        out[mask] = perm[positions[mask] % n]
    return out


def index_batches(n: int, global_batch: int, seed: int, collate: Callable[[np.ndarray, int], Any]) -> BatchFactory:
    """A resumable batch factory over ``n`` samples: ``collate(indices, step)`` builds each local batch.

    ``step`` is passed so that per-step randomness (caption templates, augmentation) can be seeded from
    ``(seed, step)`` and replayed after a resume.

    Example:
        >>> batches = index_batches(10, 4, seed=0, collate=lambda idx, step: idx.tolist())
        >>> next(batches(0, 0, 1))  # doctest: +SKIP
        [3, 7, 0, 9]
    """
    if n < 1:
        raise LowbitError("cannot train on an empty dataset; received 0 samples; accepted: >= 1 sample")

    def factory(start_step: int, rank: int, world: int) -> Iterator[Any]:
        step = start_step
        while True:
            yield collate(step_indices(n, global_batch, step, seed, rank, world), step)
            step += 1

    return factory
