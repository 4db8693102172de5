"""``lowbit serve`` against live servers on 127.0.0.1 (uvicorn in a thread), driven by real clients: the official
``openai`` package (chat, streamed chat, embeddings, errors) and httpx (bad input, queue bound, batching,
disconnects). Tiny random models keep the whole file to seconds."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("openai")
import httpx  # noqa: E402
import openai  # noqa: E402

from lowbit.workflows.serve.app import create_app  # noqa: E402
from lowbit.workflows.serve.limits import Limits  # noqa: E402
from tests.fuzz.cases import strip_png  # noqa: E402
from tests.models.conftest import write_tiny  # noqa: E402
from tests.models.llava_tiny import write_tiny_llava  # noqa: E402

QUESTION = "what is this item ?"


class LiveServer:
    """uvicorn serving ``app`` in a daemon thread on a port the OS picked (127.0.0.1 only)."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.app = app
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    @property
    def backends(self) -> dict[str, Any]:
        return self.app.app.state.backends

    def metric(self, line_start: str) -> float:
        """The value of the first /metrics line starting with ``line_start`` (0 when absent)."""
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def png_url(colour: tuple[int, int, int] = (200, 20, 20), size: int = 40) -> str:
    img = Image.new("RGB", (size, size), (240, 240, 240))
    img.paste(colour, (5, 5, size - 15, size - 10))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def bomb_png(side: int = 20000) -> bytes:
    """A valid PNG header declaring side x side pixels (a decompression bomb's first bytes): ~100 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 1024))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def chat_messages(question: str = QUESTION, url: str | None = None) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": question},
                                         {"type": "image_url", "image_url": {"url": url or png_url()}}]}]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import lowbit

    llava = lowbit.load(str(write_tiny_llava(tmp_path_factory.mktemp("serve-llava"), max_positions=512)))
    clip = lowbit.load(str(write_tiny(tmp_path_factory.mktemp("serve-clip"), "clip")))
    return {"tiny-llava": llava, "tiny-clip": clip}


@pytest.fixture(scope="module")
def live(tiny_models: dict[str, Any]) -> Iterator[LiveServer]:
    server = LiveServer(create_app(tiny_models, Limits(max_tokens=64, max_prompt_tokens=256, max_labels=100,
                                                       max_body_bytes=2 * 1024 * 1024)))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=30)


# --- the openai client ------------------------------------------------------------------------------------------
def test_chat_completion_with_usage(client: openai.OpenAI, tiny_models: dict[str, Any]) -> None:
    from lowbit.models.llava_generate import generate

    out = client.chat.completions.create(model="tiny-llava", messages=chat_messages(), max_tokens=12)
    expected = generate(tiny_models["tiny-llava"], _image(png_url()), QUESTION, max_new_tokens=12)
    assert out.choices[0].message.content == expected and expected
    llava = tiny_models["tiny-llava"]
    pre, post = llava.prompt_ids(QUESTION)
    assert out.usage.prompt_tokens == len(pre) + len(post) + 16  # 16 visual tokens of the tiny tower
    assert 1 <= out.usage.completion_tokens <= 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.choices[0].finish_reason in ("stop", "length")


def test_streamed_chat_equals_the_whole_answer(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="tiny-llava", messages=chat_messages(), max_tokens=12)
    chunks = list(client.chat.completions.create(model="tiny-llava", messages=chat_messages(), max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # it really streamed
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_stop_string_and_sampling_seed(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="tiny-llava", messages=chat_messages(), max_tokens=12)
    words = whole.choices[0].message.content.split(" ")
    assert len(words) >= 3
    stop = " " + words[2]
    cut = client.chat.completions.create(model="tiny-llava", messages=chat_messages(), max_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == whole.choices[0].message.content.split(stop)[0]
    assert cut.choices[0].finish_reason == "stop"
    a, b = (client.chat.completions.create(model="tiny-llava", messages=chat_messages(), max_tokens=8,
                                           temperature=1.0, top_p=0.9, seed=3).choices[0].message.content
            for _ in range(2))
    assert a == b  # a seed makes sampling repeatable
    forced = client.chat.completions.create(model="tiny-llava", messages=chat_messages(), max_tokens=20,
                                            extra_body={"ignore_eos": True})
    assert forced.usage.completion_tokens == 20 and forced.choices[0].finish_reason == "length"


def test_embeddings_texts_and_images(client: openai.OpenAI, live: LiveServer, tiny_models: dict[str, Any]) -> None:
    clip = tiny_models["tiny-clip"]
    out = client.embeddings.create(model="tiny-clip", input=["a red circle", "a blue square"])  # base64 by default
    got = torch.tensor([d.embedding for d in out.data])
    with torch.no_grad():
        ref = clip.encode_text(clip.tokenize(["a red circle", "a blue square"]))
    assert torch.allclose(got, ref, atol=1e-5) and out.usage.prompt_tokens > 0
    # lowbit's extension: an image as an input item, embedded into the same space
    r = httpx.post(live.url + "/v1/embeddings", json={"model": "tiny-clip", "input": [
        "a red circle", {"type": "image_url", "image_url": {"url": png_url()}}]})
    assert r.status_code == 200
    img = torch.tensor(r.json()["data"][1]["embedding"])
    with torch.no_grad():
        ref_img = clip.encode_image(clip.preprocess([_image(png_url())]))[0]
    assert torch.allclose(img, ref_img, atol=1e-5)


def test_classify_probabilities(live: LiveServer, tiny_models: dict[str, Any]) -> None:
    labels = ["red", "green", "blue"]
    r = httpx.post(live.url + "/v1/classify", json={"image": png_url(), "labels": labels})
    assert r.status_code == 200
    probs = torch.tensor([x["probability"] for x in r.json()["labels"]])
    clip = tiny_models["tiny-clip"]
    with torch.no_grad():
        img = clip.encode_image(clip.preprocess([_image(png_url())]))
        txt = clip.encode_text(clip.tokenize([f"a photo of a {s}." for s in labels]))
        ref = torch.softmax(clip.similarity(img, txt)[0], -1)
    assert torch.allclose(probs, ref, atol=1e-5) and abs(float(probs.sum()) - 1) < 1e-5
    assert r.json()["label"] == labels[int(ref.argmax())]


def test_errors_through_the_openai_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=chat_messages())
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-llava", messages=chat_messages(), max_tokens=10_000)
    assert err.value.body["code"] == "max_tokens" and "max_tokens=64" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="tiny-llava", input="hi")
    assert err.value.body["code"] == "wrong_model_kind"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-llava", messages=[{"role": "user", "content": "no image"}])
    assert err.value.body["code"] == "image_required"


def test_models_health_metrics_and_page(live: LiveServer, client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == ["tiny-llava", "tiny-clip"]
    assert httpx.get(live.url + "/health").json()["status"] == "ok"
    metrics = httpx.get(live.url + "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in ("lowbit_requests_total", "lowbit_errors_total", "lowbit_queue_depth", "lowbit_request_seconds_bucket",
                 "lowbit_tokens_per_second", "lowbit_time_to_first_token_seconds_bucket"):
        assert f"\n{name}" in "\n" + metrics.text, name
    page = httpx.get(live.url + "/")
    assert page.status_code == 200 and "<title>lowbit serve</title>" in page.text
    assert httpx.get(live.url + "/static/app.js").status_code == 200


# --- bad input: every one a 4xx JSON error naming what was wrong, and the server lives on -------------------------
def _truncated_png() -> str:
    raw = base64.b64decode(png_url(size=64).split(",", 1)[1])
    return "data:image/png;base64," + base64.b64encode(raw[: len(raw) // 2]).decode()


BAD_INPUTS = {
    "malformed-json": ("/v1/chat/completions", b'{"messages": [', 400, "invalid_json"),
    "not-an-object": ("/v1/embeddings", [1, 2], 400, "invalid_json"),
    "wrong-type-messages": ("/v1/chat/completions", {"messages": "hi"}, 400, "invalid_type"),
    "wrong-type-max-tokens": ("/v1/chat/completions", {"messages": chat_messages(), "max_tokens": "9"}, 400,
                              "invalid_type"),
    "wrong-type-temperature": ("/v1/chat/completions", {"messages": chat_messages(), "temperature": "hot"}, 400,
                               "invalid_type"),
    "wrong-type-input": ("/v1/embeddings", {"input": 5}, 400, "invalid_type"),
    "token-id-input": ("/v1/embeddings", {"input": [[1, 2, 3]]}, 400, "invalid_type"),
    "huge-body": ("/v1/embeddings", b"x" * (50 * 1024 * 1024), 413, "max_body_bytes"),
    "broken-base64": ("/v1/classify", {"image": "data:image/png;base64,@@not*base64@@", "labels": ["a"]}, 400,
                      "invalid_image"),
    "truncated-image": ("/v1/classify", {"image": _truncated_png(), "labels": ["a"]}, 400, "invalid_image"),
    "decompression-bomb": ("/v1/classify", {"image": "data:image/png;base64," + base64.b64encode(bomb_png()).decode(),
                                            "labels": ["a"]}, 413, "max_image_pixels"),
    "local-path": ("/v1/classify", {"image": "/etc/hostname", "labels": ["a"]}, 400, "local_files_disabled"),
    "10k-token-prompt": ("/v1/chat/completions", {"messages": chat_messages(" ".join(["item"] * 10_000))}, 400,
                         "max_prompt_tokens"),
    "1000-labels": ("/v1/classify", {"image": png_url(), "labels": [f"l{i}" for i in range(1000)]}, 400,
                    "max_labels"),
    "empty-labels": ("/v1/classify", {"image": png_url(), "labels": []}, 400, "invalid_value"),
    "unknown-route": ("/v1/nothing", {}, 404, "not_found"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_json_4xx_and_the_server_lives(live: LiveServer, case: str) -> None:
    route, body, status, code = BAD_INPUTS[case]
    kwargs: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(live.url + route, timeout=60, headers={"Content-Type": "application/json"}, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"]
    assert httpx.get(live.url + "/health").status_code == 200


def _png_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize(("route", "field"), [("/v1/classify", "image"), ("/v1/embeddings", "input"),
                                              ("/v1/chat/completions", "messages")])
@pytest.mark.parametrize(("data", "status", "code", "says"), [
    (bomb_png(100_000), 413, "max_image_pixels", "max_image_pixels"),
    (strip_png(20_000, 1), 400, "invalid_image", "aspect ratio 20000:1"),  # 16k pixels: only the aspect refuses
    (strip_png(1, 20_000), 400, "invalid_image", "aspect ratio 20000:1"),
], ids=["bomb-100000x100000", "strip-20000x1", "strip-1x20000"])
def test_hostile_images_on_every_image_route_are_refused_quickly(live: LiveServer, route: str, field: str,
                                                                 data: bytes, status: int, code: str,
                                                                 says: str) -> None:
    url = _png_url(data)
    body: dict[str, Any] = {"image": {"model": "tiny-clip", "image": url, "labels": ["a", "b"]},
                            "input": {"model": "tiny-clip", "input": [{"type": "image_url", "image_url": url}]},
                            "messages": {"model": "tiny-llava", "messages": chat_messages(url=url)}}[field]
    t0 = time.perf_counter()
    r = httpx.post(live.url + route, json=body, timeout=60)
    elapsed = time.perf_counter() - t0
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and says in r.json()["error"]["message"]
    assert elapsed < 10  # a hang bound, not a timing: refused from the header, before any pixel is decoded


def test_a_local_image_path_that_is_a_fifo_is_refused_not_waited_on(tmp_path: Any) -> None:
    import os

    from lowbit.workflows.serve.images import load_image
    from lowbit.workflows.serve.limits import ApiError

    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    with pytest.raises(ApiError, match="not a regular file") as err:
        load_image(str(fifo), Limits(allow_local_files=True))
    assert err.value.status == 400


def test_body_without_content_length_is_capped(live: LiveServer) -> None:
    def chunks() -> Iterator[bytes]:  # chunked transfer: the size is only known while reading
        for _ in range(6):
            yield b"x" * (512 * 1024)

    r = httpx.post(live.url + "/v1/embeddings", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "max_body_bytes"


# --- load: queue bound, batching, disconnects -------------------------------------------------------------------
REJECTED = 'lowbit_rejected_total{queue="tiny-clip",reason="queue_full"}'


def test_encoder_batches_concurrent_requests_and_bounds_its_queue(tiny_models: dict[str, Any]) -> None:
    server = LiveServer(create_app({"tiny-clip": tiny_models["tiny-clip"]}, Limits(max_queue=8, batch_window_ms=2)))
    try:
        gate = threading.Event()
        batcher = server.backends["tiny-clip"].batcher
        batcher.executor.submit(gate.wait, 30)  # the encoder thread is busy: requests pile up
        sizes: list[int] = []
        forward = batcher.forward
        batcher.forward = lambda texts, images: (sizes.append(len(texts) + len(images)), forward(texts, images))[1]

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
                async def one(i: int) -> httpx.Response:
                    return await c.post("/v1/embeddings", json={"input": [f"a red circle {i}"]})
                # the first request alone: the collector takes it and waits for the busy encoder thread, so
                # the next 13 meet a queue of 8 whatever the machine's load (one batch in flight + the queue)
                tasks = [asyncio.create_task(one(0))]
                deadline = time.monotonic() + 20
                while batcher.running < 1:
                    assert time.monotonic() < deadline, "the first request was not taken"
                    await asyncio.sleep(0.01)
                tasks += [asyncio.create_task(one(i)) for i in range(1, 14)]
                while batcher.depth + await asyncio.to_thread(server.metric, REJECTED) < 14:  # all arrived
                    assert time.monotonic() < deadline, "requests did not arrive"
                    await asyncio.sleep(0.05)
                admitted.append(batcher.depth)
                gate.set()
                return await asyncio.gather(*tasks)

        admitted: list[int] = []
        responses = asyncio.run(burst())
        codes = sorted(r.status_code for r in responses)
        # 8 wait in the queue, plus the one the collector took before the queue filled
        assert admitted[0] == 9 and codes.count(200) == 9 and codes.count(429) == 5, codes
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.json()["error"]["code"] == "queue_full" and refused.headers["retry-after"] == "1"
        # the 8 queued requests went through one forward, and the batch-size histogram counted every text
        assert max(sizes) >= 8 and sum(sizes) == admitted[0]
        assert server.metric('lowbit_batch_size_sum{queue="tiny-clip"}') == admitted[0]
        assert server.metric(REJECTED) == codes.count(429)
    finally:
        server.stop()


@pytest.mark.parametrize("batched", [True, False], ids=["batched-decode", "threads"])
def test_generation_queue_bound_and_disconnect_frees_the_slot(tiny_models: dict[str, Any], batched: bool,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from lowbit.workflows.serve import backends, batch_decode

    # ~20 tokens/s: a decode long enough to leave in the middle of
    if batched:
        step = batch_decode.BatchDecoder._step
        monkeypatch.setattr(batch_decode.BatchDecoder, "_step", lambda self: (time.sleep(0.05), step(self))[1])
    else:
        real = backends.generate_batch

        def slow(model: Any, pixels: Any, questions: Any, decoding: Any, stream: Any = None, **kw: Any) -> Any:
            return real(model, pixels, questions, decoding, stream=lambda p: (time.sleep(0.05), stream(p))[1], **kw)

        monkeypatch.setattr(backends, "generate_batch", slow)
    server = LiveServer(create_app({"tiny-llava": tiny_models["tiny-llava"]},
                                   Limits(generation_workers=1, max_queue=1, max_tokens=200, batch_decode=batched)))
    gen = server.backends["tiny-llava"]
    assert (gen.batcher is not None) == batched
    body = {"messages": chat_messages(), "max_tokens": 200, "stream": True}
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            with c.stream("POST", "/v1/chat/completions", json=body) as first:
                lines = first.iter_lines()
                assert next(lines).startswith("data:")
                with c.stream("POST", "/v1/chat/completions", json=body) as second:  # waits: 1 worker
                    third = httpx.post(server.url + "/v1/chat/completions", json=body)  # the queue is full
                    assert third.status_code == 429 and third.json()["error"]["code"] == "queue_full"
                    assert gen.pending == 2 and (gen.batcher.active if batched else gen.active) == 1
                    second.close()  # the waiting client leaves: its turn costs nothing
                # the streaming client leaves mid-answer
            deadline = time.monotonic() + 5
            while gen.pending and time.monotonic() < deadline:
                time.sleep(0.02)
            assert gen.pending == 0 and gen.active == 0 and (not batched or gen.batcher.active == 0)
            assert server.metric('lowbit_cancelled_total{model="tiny-llava"}') >= 1
            ok = c.post("/v1/chat/completions", json={"messages": chat_messages(), "max_tokens": 3})
            assert ok.status_code == 200  # the slot is free again
    finally:
        server.stop()


def test_batched_decode_equals_one_at_a_time(tiny_models: dict[str, Any]) -> None:
    """Rows of different prompt lengths, joining and leaving at different steps, decode as they would alone."""
    from lowbit.models.llava_generate import generate
    from lowbit.workflows.serve.batch_decode import BatchDecoder, Row

    llava = tiny_models["tiny-llava"]
    questions = ["what is this item ?", "how many shapes ?", "is this a red circle ? answer with few words .",
                 "what ?", "what is this ?"]
    lengths = [12, 5, 9, 12, 3]
    colours = [(200, 20, 20), (20, 200, 20), (20, 20, 200), (240, 240, 20), (10, 10, 10)]
    images = [Image.new("RGB", (40, 40), c) for c in colours]
    engine = BatchDecoder(llava, slots=4)  # 5 requests, 4 slots: the last joins when one leaves
    done = threading.Event()
    results: dict[int, list[int]] = {}

    def row(i: int) -> Row:
        with torch.inference_mode():
            embeds, _ = llava.prompt_embeddings(llava.visual_embeddings(llava.preprocess([images[i]])), [questions[i]])

        def on_end(ids: list[int], exc: BaseException | None) -> None:
            assert exc is None
            results[i] = list(ids)
            if len(results) == len(questions):
                done.set()
        return Row(embeds, lengths[i], lambda _: True, on_end)

    rows = [row(i) for i in range(len(questions))]
    try:
        for r in rows:
            engine.submit(r)
        assert done.wait(30)
    finally:
        engine.close()
    assert engine.rows_stepped > engine.steps  # some steps really ran several rows
    for i, q in enumerate(questions):
        alone = generate(llava, images[i], q, max_new_tokens=lengths[i])
        assert llava.tokenizer.decode(results[i], skip_special_tokens=True).strip() == alone, i


def _image(url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def test_serve_options_are_checked() -> None:
    from lowbit.errors import LowbitError
    from lowbit.workflows.serve.server import build_app

    with pytest.raises(LowbitError, match="max_tokenz"):
        build_app("lit-fashion", max_tokenz=3)


def test_cli_has_the_serve_verb() -> None:
    from lowbit.cli import build_parser

    args = build_parser().parse_args(["serve", "lit-fashion", "--compare", "out/w4", "--port", "8123"])
    assert (args.model, args.compare, args.host, args.port) == ("lit-fashion", "out/w4", "127.0.0.1", 8123)



@pytest.mark.slow
def test_real_models_answer_a_fashion_mnist_sneaker() -> None:
    """lit-fashion's classify and llava-fashion-hd's chat, served together, on a Fashion-MNIST test sneaker."""
    import lowbit
    from lowbit.data.resolve import resolve_dataset

    data = resolve_dataset("fashion-mnist", limit=50)
    idx = next(i for i, label in enumerate(data.labels) if data.classnames[label] == "sneaker")
    buf = io.BytesIO()
    data.images[idx].convert("RGB").save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    server = LiveServer(create_app({"llava-fashion-hd": lowbit.load("llava-fashion-hd"),
                                    "lit-fashion": lowbit.load("lit-fashion")}))
    try:
        r = httpx.post(server.url + "/v1/classify", timeout=60,
                       json={"model": "lit-fashion", "image": url, "labels": list(data.classnames)})
        assert r.status_code == 200 and r.json()["label"] == "sneaker"
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        out = client.chat.completions.create(model="llava-fashion-hd",
                                             messages=chat_messages("What is this item?", url))
        assert "sneaker" in out.choices[0].message.content.lower()
    finally:
        server.stop()
