"""Micro-batching: encoder requests arriving within a short window share one forward.

Requests wait in a bounded ``asyncio.Queue`` (full: 429). The collector takes the first waiting request, waits
up to ``window`` seconds for more (until ``max_items`` texts + images), and runs the whole batch as one text
forward and one image forward in a single worker thread, so the event loop keeps serving meanwhile. Requests
queued while a forward runs form the next batch: under load, batches grow without any wait at all.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from PIL import Image

from lowbit.workflows.serve.limits import ApiError
from lowbit.workflows.serve.metrics import BATCH_BUCKETS, Metrics

# (texts, images) -> (text embeddings [T, D], tokens per text [T], image embeddings [I, D]); None where empty
Outputs = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]
Forward = Callable[[list[str], list[Image.Image]], Outputs]


@dataclass
class _Job:
    texts: Sequence[str]
    images: Sequence[Image.Image]
    future: asyncio.Future[Outputs]
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = len(self.texts) + len(self.images)


class MicroBatcher:
    """Batch ``submit`` calls of concurrent requests into forwards of ``forward`` (see the module docstring)."""

    def __init__(self, forward: Forward, metrics: Metrics, name: str, max_queue: int = 64,
                 window: float = 0.005, max_items: int = 64) -> None:
        self.forward, self.metrics, self.name = forward, metrics, name
        self.window, self.max_items = window, max_items
        self.queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=max_queue)
        self.running = 0  # requests in the forward now (queue depth counts them too)
        # One thread: forwards of one model never overlap (torch already spreads a forward over the cores).
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"lowbit-encode-{name}")
        self._task: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        """Requests waiting or being encoded."""
        return self.queue.qsize() + self.running

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._collect(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True)

    async def submit(self, texts: Sequence[str], images: Sequence[Image.Image]) -> Outputs:
        """``forward``'s outputs for ``texts`` and ``images`` alone, computed in one batch with others."""
        job = _Job(list(texts), list(images), asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            self.metrics.inc("lowbit_rejected_total", reason="queue_full", queue=self.name)
            raise ApiError(429, f"the {self.name} queue is full ({self.queue.maxsize} requests waiting); retry "
                           "shortly", "queue_full", headers={"Retry-After": "1"}) from None
        return await job.future

    async def _collect(self) -> None:
        while True:
            jobs = [await self.queue.get()]
            size = jobs[0].size
            if self.window > 0 and size < self.max_items and self.queue.empty():
                # Sleep, then take what came: never wait_for(queue.get()), whose timeout can drop an item.
                await asyncio.sleep(self.window)
            while size < self.max_items and not self.queue.empty():
                nxt = self.queue.get_nowait()
                jobs.append(nxt)
                size += nxt.size
            jobs = [j for j in jobs if not j.future.done()]  # a client that left needs no forward
            if jobs:
                await self._run(jobs, asyncio.get_running_loop())

    async def _run(self, jobs: list[_Job], loop: asyncio.AbstractEventLoop) -> None:
        texts = [t for j in jobs for t in j.texts]
        images = [i for j in jobs for i in j.images]
        self.running = len(jobs)
        start = time.perf_counter()
        try:
            text_emb, text_tokens, image_emb = await loop.run_in_executor(self.executor, self.forward, texts, images)
        except Exception as exc:  # noqa: BLE001 - every waiting request gets the error, the collector lives on
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(exc)
            return
        finally:
            self.running = 0
        self.metrics.observe("lowbit_batch_size", len(texts) + len(images), BATCH_BUCKETS, queue=self.name)
        self.metrics.observe("lowbit_forward_seconds", time.perf_counter() - start, queue=self.name)
        t = i = 0
        for j in jobs:
            mine = slice(t, t + len(j.texts)) if j.texts else None
            part = (text_emb[mine] if text_emb is not None and mine else None,
                    text_tokens[mine] if text_tokens is not None and mine else None,
                    image_emb[i:i + len(j.images)] if image_emb is not None and j.images else None)
            t, i = t + len(j.texts), i + len(j.images)
            if not j.future.done():
                j.future.set_result(part)

