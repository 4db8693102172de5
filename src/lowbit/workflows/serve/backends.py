"""What each kind of model serves: ``Generator`` (llava: chat completions) and ``Encoder`` (dual encoders:
embeddings and zero-shot classification).

Generation runs in a pool of ``Limits.generation_workers`` threads (torch releases the GIL inside its ops, so
concurrent decodes overlap and the event loop stays free); each request streams its text pieces back to the
loop through an ``asyncio.Queue``. A cancelled request (client gone, stop string met) makes the decode
callback raise, which ends that decode at the next token and frees its worker.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch.nn import functional as F

from lowbit.eval.footprint import weight_bytes
from lowbit.models.base import DualEncoder
from lowbit.models.llava_generate import Decoding, generate_batch
from lowbit.models.llava_model import LlavaModel
from lowbit.workflows.serve.batch_decode import BatchDecoder, Row, batchable_reason
from lowbit.workflows.serve.batching import MicroBatcher, Outputs
from lowbit.workflows.serve.limits import ApiError, Limits, bad_request, over_limit
from lowbit.workflows.serve.metrics import Metrics

DEFAULT_TEMPLATES = ("a photo of a {}.",)


class _Abort(Exception):
    """Raised inside the decode callback: the client left or a stop string was met."""


def model_info(name: str, model: DualEncoder) -> dict[str, Any]:
    """What ``/v1/models`` says about a model beyond OpenAI's fields (kind, family, bytes of weights)."""
    kind = "generative" if isinstance(model, LlavaModel) else "dual-encoder"
    return {"kind": kind, "family": getattr(model, "family", "?"), "bytes": weight_bytes(model)["weight_bytes"],
            "source": {k: str(v) for k, v in getattr(model, "source", {}).items()}}


@dataclass
class ChatRequest:
    """One validated chat completion: the question, its image and the decoding options."""

    question: str
    image: Image.Image
    max_tokens: int
    temperature: float | None = None  # None or 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    system: str | None = None
    ignore_eos: bool = False  # vLLM's extension: exactly max_tokens tokens (batched decode only)


@dataclass
class ChatJob:
    """A chat completion in flight: events go from the worker thread to the request's coroutine."""

    request: ChatRequest
    events: asyncio.Queue[tuple[str, Any]]
    loop: asyncio.AbstractEventLoop
    prompt_tokens: int
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` could still be the start of a stop string (not sent yet)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


class _Sink:
    """Where one answer's text goes: stripped at the start, cut at a stop string (text that may begin one is
    held back until it cannot), timed, and reported as ``text`` / ``done`` / ``cancelled`` / ``error`` events.

    ``feed`` raises ``_Abort`` when the answer must end (stop string met, client gone).
    """

    def __init__(self, job: ChatJob, generator: Generator) -> None:
        self.job, self.gen = job, generator
        self.stops = [s for s in job.request.stop if s]
        self.raw: list[str] = []
        self.sent = 0
        self.first: float | None = None
        self.stopped = False

    def feed(self, piece: str) -> None:
        if self.job.cancelled.is_set():
            raise _Abort
        self.raw.append(piece)
        text = "".join(self.raw).lstrip()  # the final answer is stripped: so is the stream
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        end = cut if cut >= 0 else len(text) - _held_back(text, self.stops)
        if end > self.sent:
            self._emit(text[self.sent:end])
            self.sent = end
        if cut >= 0:
            self.stopped = True
            raise _Abort

    def _emit(self, text: str) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        self.job.emit("text", text)

    def fail(self, exc: BaseException) -> None:
        self.job.emit("error", exc)

    def finish(self, ids: list[int] | None) -> None:
        """The answer ended: ``ids`` its tokens (None when cut by a stop string or the client leaving)."""
        job, gen = self.job, self.gen
        if job.cancelled.is_set() and not self.stopped:
            gen.metrics.inc("lowbit_cancelled_total", model=gen.name)
            job.emit("cancelled", None)
            return
        text = "".join(self.raw).strip()
        if self.stopped or ids is None:
            text = text[:self.sent]
            finish = "stop"
            n = len(gen.model.tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            if len(text) > self.sent:  # held back for a stop string that never came: send it now
                self._emit(text[self.sent:])
            n = len(ids)
            finish = "length" if n >= job.request.max_tokens else "stop"
        end = time.perf_counter()
        first = self.first or end
        gen.metrics.tokens(n)
        gen.metrics.observe("lowbit_time_to_first_token_seconds", first - job.arrived, model=gen.name)
        job.emit("done", {"finish_reason": finish, "completion_tokens": n, "text": text,
                          "ttft_s": first - job.arrived,
                          "tokens_per_s": (n - 1) / max(end - first, 1e-9) if n > 1 else 0.0})


class Generator:
    """Chat completions of a llava model: continuously batched decode (``batch_decode.BatchDecoder``) where
    the model allows it, else one worker thread per request; at most ``Limits.generation_workers`` at once."""

    kind = "generative"

    def __init__(self, name: str, model: LlavaModel, limits: Limits, metrics: Metrics) -> None:
        self.name, self.model, self.limits, self.metrics = name, model, limits, metrics
        self.pending = 0  # admitted and not finished (waiting for a worker or decoding)
        self.active = 0
        self._lock = threading.Lock()
        self.executor = ThreadPoolExecutor(max_workers=limits.generation_workers,
                                           thread_name_prefix=f"lowbit-generate-{name}")
        with torch.inference_mode():  # visual tokens per image: fixed by the tower (and pruning ratio)
            blank = Image.new("RGB", (32, 32))
            self.visual_tokens = int(model.visual_embeddings(model.preprocess([blank])).shape[1])
        self.batch_reason = batchable_reason(model) if limits.batch_decode else "batch_decode=False"
        self.batcher = BatchDecoder(model, limits.generation_workers) if self.batch_reason is None else None

    def info(self) -> dict[str, Any]:
        return model_info(self.name, self.model) | {"context_window": self.model.context_window,
                                                    "visual_tokens": self.visual_tokens,
                                                    "batched_decode": self.batcher is not None}

    def prompt_tokens(self, question: str, system: str | None) -> int:
        """Prompt length in tokens (text + visual); 400 naming the limit when the text is too long."""
        model = self.model if system is None else self.model.with_config(system=system)
        pre, post = model.prompt_ids(question)
        text = len(pre) + len(post)
        if text > self.limits.max_prompt_tokens:
            raise over_limit("max_prompt_tokens", text, self.limits.max_prompt_tokens, 400, "messages")
        total = text + self.visual_tokens
        if total >= self.model.context_window:
            raise ApiError(400, f"the prompt is {total} tokens ({self.visual_tokens} visual) and fills the model's "
                           f"context window of {self.model.context_window}", "context_length_exceeded", "messages")
        return total

    def start(self, request: ChatRequest) -> ChatJob:
        """Admit ``request`` (429 when the queue is full) and start decoding it when a worker is free."""
        prompt = self.prompt_tokens(request.question, request.system)
        if request.ignore_eos and self.batcher is None:
            raise ApiError(400, f"ignore_eos runs on the batched decode, which this model cannot use: "
                           f"{self.batch_reason}", "unsupported", "ignore_eos")
        with self._lock:
            if self.pending >= self.limits.generation_workers + self.limits.max_queue:
                self.metrics.inc("lowbit_rejected_total", reason="queue_full", queue=self.name)
                raise ApiError(429, f"the generation queue of {self.name} is full ({self.limits.max_queue} waiting); "
                               "retry shortly", "queue_full", headers={"Retry-After": "1"})
            self.pending += 1
        loop = asyncio.get_running_loop()
        job = ChatJob(request, asyncio.Queue(), loop, prompt)
        self.executor.submit(self._run, job)
        return job

    def _release(self) -> None:
        with self._lock:
            self.pending -= 1

    def _run(self, job: ChatJob) -> None:  # a worker thread
        if job.cancelled.is_set():  # the client left while waiting: nothing to decode
            self._release()
            return
        if self.batcher is not None:
            self._submit_row(job)  # the engine thread releases the slot when the row ends
            return
        try:
            with self._lock:
                self.active += 1
            try:
                self._decode(job)
            finally:
                with self._lock:
                    self.active -= 1
        finally:
            self._release()

    def _model_for(self, req: ChatRequest) -> LlavaModel:
        return self.model if req.system is None else self.model.with_config(system=req.system)

    def _decode(self, job: ChatJob) -> None:
        """The threaded path: ``generate_batch`` for this one request, its text through a ``_Sink``."""
        req = job.request
        sink = _Sink(job, self)
        model = self._model_for(req)
        sample = bool(req.temperature)
        decoding = Decoding(req.max_tokens, do_sample=sample, temperature=req.temperature if sample else 1.0,
                            top_p=req.top_p if sample else 1.0, seed=req.seed)
        try:
            with torch.inference_mode():
                gen = generate_batch(model, model.preprocess([req.image]), [req.question], decoding, stream=sink.feed)
        except _Abort:
            sink.finish(None)
            return
        except Exception as exc:  # noqa: BLE001 - reported to the client as a JSON error, server lives on
            sink.fail(exc)
            return
        sink.finish(gen.token_ids[0])

    def _submit_row(self, job: ChatJob) -> None:
        """The batched path: the prompt's embeddings here (vision tower + projector), the decode in the engine."""
        req = job.request
        sink = _Sink(job, self)
        tok = self.model.tokenizer
        state = {"sent": 0, "ended": False}

        def on_token(_: int) -> bool:
            text = tok.decode(row.ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # a character split over tokens: wait for the rest
                return not job.cancelled.is_set()
            piece, state["sent"] = text[state["sent"]:], len(text)
            try:
                if piece:
                    sink.feed(piece)
                elif job.cancelled.is_set():
                    raise _Abort
            except _Abort:
                return False
            return True

        def on_end(ids: list[int], exc: BaseException | None) -> None:
            if state["ended"]:
                return
            state["ended"] = True
            try:
                if exc is not None:
                    sink.fail(exc)
                    return
                text = tok.decode(ids, skip_special_tokens=True)
                try:
                    if len(text) > state["sent"] and not sink.stopped and not job.cancelled.is_set():
                        sink.feed(text[state["sent"]:])
                except _Abort:
                    pass
                sink.finish(None if sink.stopped else ids)
            finally:
                self._release()

        sample = bool(req.temperature)
        try:
            model = self._model_for(req)
            with torch.inference_mode():
                visual = model.visual_embeddings(model.preprocess([req.image]))
                embeds, _ = model.prompt_embeddings(visual, [req.question])
            row = Row(embeds, min(req.max_tokens, self.model.context_window - embeds.shape[1]), on_token, on_end,
                      do_sample=sample, temperature=req.temperature if sample else 1.0,
                      top_p=req.top_p if sample else 1.0, seed=req.seed, ignore_eos=req.ignore_eos,
                      cancelled=job.cancelled.is_set)
            self.batcher.prefill(row)  # here, beside the engine's decode steps
        except Exception as exc:  # noqa: BLE001 - reported to the client as a JSON error, server lives on
            on_end([], exc)
            return
        self.batcher.submit(row)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.executor.shutdown, True)
        if self.batcher is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.batcher.close)


class Encoder:
    """Embeddings and zero-shot classification of a dual encoder, through one ``MicroBatcher``."""

    kind = "dual-encoder"

    def __init__(self, name: str, model: DualEncoder, limits: Limits, metrics: Metrics) -> None:
        self.name, self.model, self.limits = name, model, limits
        self.batcher = MicroBatcher(self._forward, metrics, name, max_queue=limits.max_queue,
                                    window=limits.batch_window_ms / 1000.0, max_items=limits.max_batch_items)

    def info(self) -> dict[str, Any]:
        return model_info(self.name, self.model)

    @torch.inference_mode()
    def _forward(self, texts: list[str], images: list[Image.Image]) -> Outputs:
        m = self.model
        text_emb = text_tokens = image_emb = None
        if texts:
            tokens = m.tokenize(texts)
            text_emb = m.encode_text(tokens).float()
            mask = tokens.get("attention_mask")
            text_tokens = mask.sum(1) if mask is not None else torch.full((len(texts),), tokens["input_ids"].shape[1])
        if images:
            image_emb = m.encode_image(m.preprocess(images)).float()
        return text_emb, text_tokens, image_emb

    async def embed(self, items: list[str | Image.Image]) -> tuple[list[torch.Tensor], int]:
        """Normalised embeddings of texts and images, in request order, and the texts' token count."""
        texts = [x for x in items if isinstance(x, str)]
        images = [x for x in items if isinstance(x, Image.Image)]
        text_emb, text_tokens, image_emb = await self.batcher.submit(texts, images)
        out, t, i = [], 0, 0
        for x in items:
            if isinstance(x, str):
                out.append(text_emb[t])  # type: ignore[index]
                t += 1
            else:
                out.append(image_emb[i])  # type: ignore[index]
                i += 1
        return out, int(text_tokens.sum()) if text_tokens is not None else 0

    async def classify(self, image: Image.Image, labels: list[str], templates: list[str]) -> list[float]:
        """Zero-shot probabilities of ``labels`` for ``image`` (softmax of the model's own logits).

        Each label's embedding is the mean over ``templates`` (prompt ensembling, as ``eval.zeroshot``).
        """
        if any("{}" not in t for t in templates):
            raise bad_request("every template needs one '{}' for the label, e.g. 'a photo of a {}.'", "templates")
        prompts = [t.replace("{}", label, 1) for label in labels for t in templates]
        text_emb, _, image_emb = await self.batcher.submit(prompts, [image])
        cls = F.normalize(text_emb.reshape(len(labels), len(templates), -1).mean(1), dim=-1)  # type: ignore[union-attr]
        logits = self.model.similarity(image_emb, cls)[0].float()  # type: ignore[arg-type]
        return torch.softmax(logits, dim=-1).tolist()

    async def close(self) -> None:
        await self.batcher.stop()
