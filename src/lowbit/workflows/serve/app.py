"""The ASGI app: OpenAI-style routes, the page at ``/``, limits and metrics (see ``lowbit.workflows.serve``).

Routes:

- ``POST /v1/chat/completions`` (generative models): OpenAI messages; the image is an ``image_url`` content part
  holding a ``data:image/...;base64,`` URL; ``stream``, ``stream_options.include_usage``, ``max_tokens`` (or
  ``max_completion_tokens``), ``temperature`` (absent or 0: greedy), ``top_p``, ``seed``, ``stop``; ``usage``
  in the response, and lowbit's timings (``lowbit``: time to first token, tokens/s) as an extra field.
  ``ignore_eos`` (vLLM's extension, for benchmarks): exactly ``max_tokens`` tokens, end-of-turn ignored.
  Concurrent completions decode as one batch (continuous batching, ``batch_decode``) where the model allows.
- ``POST /v1/embeddings`` (dual encoders): ``input`` a string or a list; lowbit's extension: a list item may
  be an image, ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``, embedded by the
  vision tower into the same space. ``encoding_format`` ``float`` or ``base64`` (little-endian float32).
- ``POST /v1/classify`` (dual encoders): ``{"image": data URL, "labels": [...], "templates": ["a photo of a
  {}."]}`` -> one probability per label (softmax of the model's logits).
- ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text format), ``GET /`` (the page).

Every error is ``{"error": {"message", "type", "code", "param"}}`` with a 4xx/5xx status; ``code`` names the
limit a request broke (``max_body_bytes``, ``max_image_pixels``, ``max_prompt_tokens``, ``max_tokens``, ...).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from lowbit.errors import LowbitError
from lowbit.models.base import DualEncoder
from lowbit.models.llava_model import LlavaModel
from lowbit.workflows.serve.backends import DEFAULT_TEMPLATES, ChatJob, ChatRequest, Encoder, Generator
from lowbit.workflows.serve.images import load_image
from lowbit.workflows.serve.limits import ApiError, Limits, bad_request, over_limit
from lowbit.workflows.serve.metrics import Metrics

STATIC = Path(__file__).parent / "static"
Backend = Generator | Encoder
Scope = MutableMapping[str, Any]


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class Guard:
    """ASGI middleware: refuses bodies above ``max_body_bytes`` from their Content-Length (413, before reading),
    and counts every request's route, status and latency."""

    def __init__(self, app: FastAPI, limits: Limits, metrics: Metrics) -> None:
        self.app, self.limits, self.metrics = app, limits, metrics  # app.state.backends: the served models

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in ROUTES else "other"
        start = time.perf_counter()
        status = {"code": 500}

        async def counted_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            length = int(dict(scope["headers"]).get(b"content-length", b"0") or 0)
        except ValueError:
            length = 0
        try:
            if length > self.limits.max_body_bytes:
                await _drain(receive, cap=4 * self.limits.max_body_bytes)
                err = over_limit("max_body_bytes", length, self.limits.max_body_bytes, 413, "body")
                await error_response(err)(scope, receive, counted_send)
            else:
                await self.app(scope, receive, counted_send)
        finally:
            code = str(status["code"])
            self.metrics.inc("lowbit_requests_total", route=route, method=scope["method"], status=code)
            if status["code"] >= 400:
                self.metrics.inc("lowbit_errors_total", route=route, status=code)
            self.metrics.observe("lowbit_request_seconds", time.perf_counter() - start, route=route)


async def _drain(receive: Callable[[], Awaitable[Any]], cap: int) -> None:
    """Read and drop a refused body (up to ``cap`` bytes), so the client, still sending, reads our 413."""
    seen = 0
    while seen <= cap:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/embeddings", "/v1/classify")


async def read_json(request: Request, limits: Limits) -> dict[str, Any]:
    """The request body as a JSON object; 413 past ``max_body_bytes`` (also without Content-Length), 400 else."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise over_limit("max_body_bytes", size, limits.max_body_bytes, 413, "body")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON ({exc})", "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object; received {type(body).__name__}", "invalid_json")
    return body


# --- small typed readers: a wrong type is a 400 naming the field ---------------------------------------------
def _int(body: dict[str, Any], key: str, default: int | None, low: int | None = None) -> int | None:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{key} must be an integer; received {type(value).__name__}", key, "invalid_type")
    if low is not None and value < low:
        raise bad_request(f"{key} must be >= {low}; received {value}", key, "invalid_value")
    return value


def _number(body: dict[str, Any], key: str, default: float | None, low: float, high: float) -> float | None:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_request(f"{key} must be a number; received {type(value).__name__}", key, "invalid_type")
    if not low <= value <= high:
        raise bad_request(f"{key} must be in [{low}, {high}]; received {value}", key, "invalid_value")
    return float(value)


def _strings(value: Any, key: str, limit: int, limit_name: str, max_chars: int) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad_request(f"{key} must be a string or a list of strings", key, "invalid_type")
    if len(value) > limit:
        raise over_limit(limit_name, len(value), limit, 400, key)
    long = max((len(v) for v in value), default=0)
    if long > max_chars:
        raise over_limit("max_text_chars", long, max_chars, 400, key)
    return value


def _image_url(part: Any, param: str) -> str:
    """The URL of an ``image_url`` content part (``{"image_url": {"url": ...}}`` or ``{"image_url": "..."}``)."""
    inner = part.get("image_url") if isinstance(part, dict) else None
    url = inner.get("url") if isinstance(inner, dict) else inner
    if not isinstance(url, str):
        raise bad_request(f"{param} must be {{'type': 'image_url', 'image_url': {{'url': 'data:...'}}}}", param,
                          "invalid_type")
    return url


def parse_messages(messages: Any) -> tuple[str, str | None, str | None]:
    """(question, image URL, system) from OpenAI messages: the last user message's text, the last image any user
    message carries (a follow-up question keeps the image), the last system message."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of {role, content} objects", "messages", "invalid_type")
    question, image, system = None, None, None
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a role", f"messages[{i}]", "invalid_type")
        content = msg.get("content")
        texts: list[str] = []
        if isinstance(content, str):
            texts = [content]
        elif isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif kind == "image_url":
                    image = _image_url(part, f"messages[{i}].content[{j}]")
                else:
                    raise bad_request(f"messages[{i}].content[{j}] must be a text or image_url part",
                                      f"messages[{i}].content[{j}]", "invalid_type")
        elif content is not None:
            raise bad_request(f"messages[{i}].content must be a string or a list of parts", f"messages[{i}].content",
                              "invalid_type")
        if msg["role"] == "system":
            system = "\n".join(texts)
        elif msg["role"] == "user":
            question = "\n".join(texts)
    if not question or not question.strip():
        raise bad_request("the last user message has no text question", "messages", "missing_question")
    return question, image, system


def create_app(models: dict[str, DualEncoder], limits: Limits | None = None, compare: tuple[str, str] | None = None,
               metrics: Metrics | None = None) -> Guard:
    """The ASGI app serving ``models`` (name -> loaded model; the first is the default of its kind).

    Example:
        >>> app = create_app({"lit-fashion": lowbit.load("lit-fashion")})  # doctest: +SKIP
    """
    limits, metrics = limits or Limits(), metrics or Metrics()
    backends: dict[str, Backend] = {
        name: Generator(name, m, limits, metrics) if isinstance(m, LlavaModel) else Encoder(name, m, limits, metrics)
        for name, m in models.items()
    }
    infos = {name: b.info() for name, b in backends.items()}
    _describe(metrics, backends)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        for b in backends.values():
            if isinstance(b, Encoder):
                b.batcher.start()
        yield
        # uvicorn has let in-flight requests finish by now (graceful shutdown): stop the workers.
        for b in backends.values():
            await b.close()

    app = FastAPI(title="lowbit serve", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.backends, app.state.metrics, app.state.limits = backends, metrics, limits

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(LowbitError)
    async def _lowbit_error(_: Request, exc: LowbitError) -> JSONResponse:
        return error_response(ApiError(400, str(exc), "invalid_request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(ApiError(exc.status_code, str(exc.detail), "not_found" if exc.status_code == 404
                                       else "http_error"))

    @app.exception_handler(Exception)
    async def _server_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error"))

    def pick(body: dict[str, Any], kind: type) -> Any:
        name = body.get("model")
        if name is None or name == "":
            found = next((b for b in backends.values() if isinstance(b, kind)), None)
            if found is None:
                raise ApiError(400, f"no {kind.kind} model is served here; served: {sorted(backends)}",
                               "wrong_model_kind", "model")
            return found
        if not isinstance(name, str):
            raise bad_request("model must be a string", "model", "invalid_type")
        if name not in backends:
            raise ApiError(404, f"model {name!r} is not served here; served: {sorted(backends)}", "model_not_found",
                           "model")
        backend = backends[name]
        if not isinstance(backend, kind):
            raise ApiError(400, f"model {name!r} is a {backend.kind} model; this route needs a {kind.kind} one",
                           "wrong_model_kind", "model")
        return backend

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": list(backends), "compare": list(compare) if compare else None}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "lowbit",
                                             "lowbit": infos[name]} for name in backends]}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
        body = await read_json(request, limits)
        backend: Generator = pick(body, Generator)
        question, image_url, system = parse_messages(body.get("messages"))
        if image_url is None:
            raise bad_request("this model answers questions about an image: add an image_url content part "
                              "(data:image/...;base64,...) to a user message", "messages", "image_required")
        default_max = min(backend.model.config.max_new_tokens, limits.max_tokens)  # asking nothing is never refused
        max_tokens = _int(body, "max_completion_tokens", None, 1) or _int(body, "max_tokens", default_max, 1)
        if max_tokens > limits.max_tokens:  # type: ignore[operator]
            raise over_limit("max_tokens", max_tokens, limits.max_tokens, 400)  # type: ignore[arg-type]
        if _int(body, "n", 1, 1) != 1:
            raise bad_request("n must be 1 (one answer per request)", "n", "invalid_value")
        stop = body.get("stop") or []
        stop = _strings(stop, "stop", 4, "max_stop", 64)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise bad_request("stream must be a boolean", "stream", "invalid_type")
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise bad_request("ignore_eos must be a boolean", "ignore_eos", "invalid_type")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise bad_request("stream_options must be an object", "stream_options", "invalid_type")
        req = ChatRequest(question, await asyncio.to_thread(load_image, image_url, limits, "image_url"),
                          max_tokens,  # type: ignore[arg-type]
                          temperature=_number(body, "temperature", None, 0.0, 2.0),
                          top_p=_number(body, "top_p", 1.0, 1e-6, 1.0),  # type: ignore[arg-type]
                          seed=_int(body, "seed", None), stop=stop, system=system, ignore_eos=ignore_eos)
        job = backend.start(req)
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if stream:
            return StreamingResponse(_sse(job, backend.name, ident, created, bool(options.get("include_usage"))),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return JSONResponse(await _complete(job, request, backend.name, ident, created))

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        body = await read_json(request, limits)
        backend: Encoder = pick(body, Encoder)
        raw = body.get("input")
        items_in = [raw] if isinstance(raw, str | dict) else raw
        if not isinstance(items_in, list) or not items_in:
            raise bad_request("input must be a string or a non-empty list of strings / image parts", "input",
                              "invalid_type")
        if len(items_in) > limits.max_inputs:
            raise over_limit("max_inputs", len(items_in), limits.max_inputs, 400, "input")
        fmt = body.get("encoding_format", "float") or "float"
        if fmt not in ("float", "base64"):
            raise bad_request("encoding_format must be 'float' or 'base64'", "encoding_format", "invalid_value")
        items: list[Any] = []
        for i, x in enumerate(items_in):
            if isinstance(x, str):
                if len(x) > limits.max_text_chars:
                    raise over_limit("max_text_chars", len(x), limits.max_text_chars, 400, f"input[{i}]")
                items.append(x)
            elif isinstance(x, dict) and x.get("type") == "image_url":
                items.append(await asyncio.to_thread(load_image, _image_url(x, f"input[{i}]"), limits, f"input[{i}]"))
            else:
                raise bad_request(f"input[{i}] must be a string or {{'type': 'image_url', 'image_url': {{'url': ...}}}}"
                                  " (token-id inputs are not accepted)", f"input[{i}]", "invalid_type")
        vectors, tokens = await backend.embed(items)
        data = []
        for i, v in enumerate(vectors):
            emb: Any = (base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() if fmt == "base64"
                        else v.tolist())
            data.append({"object": "embedding", "index": i, "embedding": emb})
        # JSONResponse as is: FastAPI's encoder would walk every float of every embedding first
        return JSONResponse({"object": "list", "data": data, "model": backend.name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @app.post("/v1/classify")
    async def classify(request: Request) -> JSONResponse:
        start = time.perf_counter()
        body = await read_json(request, limits)
        backend: Encoder = pick(body, Encoder)
        image = body.get("image")
        url = _image_url(image, "image") if isinstance(image, dict) else image
        labels = _strings(body.get("labels"), "labels", limits.max_labels, "max_labels", 200)
        if not labels or any(not s.strip() for s in labels):
            raise bad_request("labels must be a non-empty list of non-empty strings", "labels", "invalid_value")
        templates = _strings(body.get("templates") or list(DEFAULT_TEMPLATES), "templates", 16, "max_templates", 200)
        img = await asyncio.to_thread(load_image, url, limits, "image")
        probs = await backend.classify(img, labels, templates)
        best = max(range(len(labels)), key=probs.__getitem__)
        return JSONResponse({"object": "classification", "model": backend.name, "label": labels[best],
                             "labels": [{"label": s, "probability": p} for s, p in zip(labels, probs, strict=True)],
                             "lowbit": {"latency_s": time.perf_counter() - start}})

    return Guard(app, limits, metrics)


_METRIC_HELP = {  # Prometheus HELP text of every metric the app exports
    "lowbit_requests_total": "HTTP requests by route, method and status",
    "lowbit_errors_total": "HTTP responses with status >= 400 by route and status",
    "lowbit_request_seconds": "request latency (to the end of the response) by route",
    "lowbit_time_to_first_token_seconds": "chat completions: arrival to first text",
    "lowbit_generated_tokens_total": "tokens generated",
    "lowbit_rejected_total": "requests refused because a queue was full",
    "lowbit_cancelled_total": "generations stopped because the client left",
    "lowbit_batch_size": "texts + images per encoder forward",
    "lowbit_forward_seconds": "encoder forward time per batch",
    "lowbit_queue_depth": "requests waiting or running, per model",
    "lowbit_generation_active": "chat completions decoding now, per model",
    "lowbit_tokens_per_second": "tokens generated per second over the last 10 s",
}

def _describe(metrics: Metrics, backends: dict[str, Backend]) -> None:
    for name, text in _METRIC_HELP.items():
        metrics.describe(name, text)
    metrics.gauge("lowbit_queue_depth", lambda: {
        (("model", n),): float(b.pending if isinstance(b, Generator) else b.batcher.depth)
        for n, b in backends.items()})
    metrics.gauge("lowbit_generation_active", lambda: {
        (("model", n),): float(b.active + (b.batcher.active if b.batcher else 0))
        for n, b in backends.items() if isinstance(b, Generator)})
    metrics.gauge("lowbit_tokens_per_second", lambda: {(): metrics.tokens_per_second()})


def _chunk(ident: str, created: int, model: str, delta: dict[str, Any], finish: str | None = None,
           **extra: Any) -> str:
    payload = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
    return f"data: {json.dumps(payload)}\n\n"


def _usage(job: ChatJob, done: dict[str, Any]) -> dict[str, int]:
    n = done["completion_tokens"]
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": n, "total_tokens": job.prompt_tokens + n}


def _timings(done: dict[str, Any], job: ChatJob) -> dict[str, float]:
    return {"ttft_s": done["ttft_s"], "tokens_per_s": done["tokens_per_s"],
            "latency_s": time.perf_counter() - job.arrived}


def _failure(value: Any) -> ApiError:
    if isinstance(value, ApiError):
        return value
    if isinstance(value, LowbitError):
        return ApiError(400, str(value), "invalid_request")
    return ApiError(500, f"generation failed: {type(value).__name__}: {value}", "internal_error")


async def _sse(job: ChatJob, model: str, ident: str, created: int, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events of one chat completion; leaving early (client gone) cancels the decode."""
    try:
        yield _chunk(ident, created, model, {"role": "assistant", "content": ""})
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                yield _chunk(ident, created, model, {"content": value})
            elif kind == "done":
                yield _chunk(ident, created, model, {}, value["finish_reason"], lowbit=_timings(value, job))
                if include_usage:
                    payload = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                               "choices": [], "usage": _usage(job, value)}
                    yield f"data: {json.dumps(payload)}\n\n"
                break
            elif kind == "error":
                yield f"data: {json.dumps(_failure(value).body())}\n\n"
                break
            else:
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a no-op after "done"; mid-stream it ends the decode and frees the worker


async def _complete(job: ChatJob, request: Request, model: str, ident: str, created: int) -> dict[str, Any]:
    """Wait for the whole answer; a client that disconnects meanwhile cancels the decode."""

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)
        job.cancelled.set()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        while True:
            kind, value = await job.events.get()
            if kind == "done":
                break
            if kind == "error":
                raise _failure(value)
            if kind == "cancelled":
                raise ApiError(499, "the client closed the request", "cancelled")
    finally:
        watcher.cancel()
        job.cancelled.set()
    return {"id": ident, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": value["text"]},
                         "finish_reason": value["finish_reason"], "logprobs": None}],
            "usage": _usage(job, value), "lowbit": _timings(value, job)}
