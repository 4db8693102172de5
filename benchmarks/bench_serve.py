"""Benchmark ``lowbit serve`` under concurrent load -> benchmarks/results/serve.json.

    .venv/bin/python benchmarks/bench_serve.py                  # ~4 minutes: 20 s per concurrency level
    .venv/bin/python benchmarks/bench_serve.py --seconds 5      # a quick look

The server runs as users start it (``python -m lowbit.cli serve MODEL``, its own process, 127.0.0.1); the
clients are asyncio tasks with httpx in this process, each sending its next request as soon as the previous
answer is in, for a fixed time per level (1, 8 and 32 clients). Per level: requests/s, p50/p99 latency, errors,
the encoder's mean batch size (from /metrics) or, for chat, p50/p99 time to first token and aggregate tokens/s;
per server: peak RSS (VmHWM). Chat answers are 32 tokens each (``ignore_eos``): the built-in VLM answers in one
to three tokens, which would measure prefill only. Targets (issue 18): embeddings at 32 clients (batched) >= 3x
the throughput of 1 client on a server without a batching window (unbatched); chat with 8 concurrent streams
(one continuously batched decode) >= 1.5x the tokens/s of one stream.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from lowbit.eval.env import cpu_model, environment

RESULTS = Path(__file__).resolve().parent / "results"
LEVELS = (1, 8, 32)
CAPTIONS = ["a photo of a t-shirt", "a photo of a trouser", "a photo of a pullover", "a photo of a dress",
            "a photo of a coat", "a photo of a sandal", "a photo of a shirt", "a photo of a sneaker",
            "a photo of a bag", "a photo of an ankle boot"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``lowbit serve`` in a subprocess; ``peak_rss_mib`` from /proc while it runs."""

    def __init__(self, model: str, *args: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "lowbit.cli", "serve", model, "--port", str(self.port),
                                      "--log-level", "warning", *args])
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lowbit serve {model} exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not come up in 300 s")
            time.sleep(0.5)

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
        return float("nan")

    def metric_sum(self, prefix: str) -> float:
        """Sum of every /metrics sample whose line starts with ``prefix``."""
        text = httpx.get(self.url + "/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 4)


async def _run_level(clients: int, seconds: float, one: Any) -> dict[str, Any]:
    """``clients`` tasks calling ``one(client, i)`` back to back for ``seconds``; collects what each returns."""
    records: list[dict[str, Any]] = []
    stop_at = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        async def loop(k: int) -> None:
            i = 0
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                try:
                    rec = await one(http, k * 100_000 + i)
                except httpx.HTTPError as exc:
                    rec = {"ok": False, "error": type(exc).__name__}
                rec["latency"] = time.perf_counter() - start
                records.append(rec)
                i += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(loop(k) for k in range(clients)))
        elapsed = time.perf_counter() - t0
    ok = [r for r in records if r["ok"]]
    lat = [r["latency"] for r in ok]
    out = {"clients": clients, "seconds": round(elapsed, 2), "requests": len(records), "ok": len(ok),
           "errors": len(records) - len(ok), "requests_per_s": round(len(ok) / elapsed, 2),
           "latency_p50_s": _pct(lat, 0.5), "latency_p99_s": _pct(lat, 0.99)}
    if ok and "tokens" in ok[0]:
        tokens = sum(r["tokens"] for r in ok)
        ttft = [r["ttft"] for r in ok if r.get("ttft") is not None]
        out |= {"tokens": tokens, "tokens_per_s": round(tokens / elapsed, 2), "ttft_p50_s": _pct(ttft, 0.5),
                "ttft_p99_s": _pct(ttft, 0.99)}
    return out


def bench_embeddings(model: str, seconds: float, levels_: tuple[int, ...] = LEVELS, *args: str) -> dict[str, Any]:
    server = Server(model, *args)
    try:
        url = server.url + "/v1/embeddings"

        async def one(http: httpx.AsyncClient, i: int) -> dict[str, Any]:
            r = await http.post(url, json={"input": f"{CAPTIONS[i % len(CAPTIONS)]} number {i}"})
            return {"ok": r.status_code == 200, "status": r.status_code}

        asyncio.run(_run_level(2, 2.0, one))  # warm-up
        levels = []
        for clients in levels_:
            n0 = server.metric_sum('lowbit_batch_size_count')
            s0 = server.metric_sum('lowbit_batch_size_sum')
            row = asyncio.run(_run_level(clients, seconds, one))
            batches = server.metric_sum('lowbit_batch_size_count') - n0
            row["mean_batch_size"] = round((server.metric_sum('lowbit_batch_size_sum') - s0) / max(batches, 1), 2)
            row["load_average"] = [round(x, 2) for x in os.getloadavg()]
            print(f"embeddings x{clients}: {row}", flush=True)
            levels.append(row)
        return {"model": model, "levels": levels, "peak_rss_mib": server.peak_rss_mib()}
    finally:
        server.stop()


def _png(colour: tuple[int, int, int]) -> str:
    img = Image.new("RGB", (128, 128), (240, 240, 240))
    img.paste(colour, (30, 20, 100, 110))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def bench_chat(model: str, seconds: float, max_tokens: int, workers: int) -> dict[str, Any]:
    server = Server(model, "--generation-workers", str(workers), "--max-queue", "64")
    images = [_png(c) for c in ((200, 20, 20), (20, 160, 40), (30, 30, 200), (20, 20, 20))]
    questions = ["What is this item?", "Describe the item in the image.", "What colour is the item?"]
    try:
        url = server.url + "/v1/chat/completions"

        async def one(http: httpx.AsyncClient, i: int) -> dict[str, Any]:
            body = {"messages": [{"role": "user", "content": [
                {"type": "text", "text": questions[i % len(questions)]},
                {"type": "image_url", "image_url": {"url": images[i % len(images)]}}]}],
                "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True},
                "ignore_eos": True}  # fixed-length answers: decode throughput, as vLLM's benchmarks measure it
            start, ttft, tokens, ok = time.perf_counter(), None, 0, False
            async with http.stream("POST", url, json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    return {"ok": False, "status": r.status_code}
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        ok = ok or line == "data: [DONE]"
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    if ttft is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                        ttft = time.perf_counter() - start
            return {"ok": ok, "tokens": tokens, "ttft": ttft}

        asyncio.run(_run_level(1, 3.0, one))  # warm-up
        levels = []
        for clients in LEVELS:
            row = asyncio.run(_run_level(clients, seconds, one))
            row["load_average"] = [round(x, 2) for x in os.getloadavg()]
            print(f"chat x{clients}: {row}", flush=True)
            levels.append(row)
        return {"model": model, "max_tokens": max_tokens, "generation_workers": workers, "levels": levels,
                "peak_rss_mib": server.peak_rss_mib()}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="per concurrency level")
    parser.add_argument("--embed-model", default="lit-fashion")
    parser.add_argument("--chat-model", default="llava-fashion-hd")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--workers", type=int, default=8, help="the server's --generation-workers")
    parser.add_argument("--out", default=str(RESULTS / "serve.json"))
    args = parser.parse_args()

    result: dict[str, Any] = {"environment": environment(), "cpu": cpu_model(), "cores": os.cpu_count(),
                              "seconds_per_level": args.seconds, "load_average_start": list(os.getloadavg())}
    # The unbatched baseline: no batching window, one client (every forward holds one request).
    result["embeddings_unbatched"] = bench_embeddings(args.embed_model, args.seconds, (1,), "--batch-window-ms", "0")
    result["embeddings"] = bench_embeddings(args.embed_model, args.seconds)
    result["chat"] = bench_chat(args.chat_model, args.seconds, args.max_tokens, args.workers)
    result["load_average_end"] = list(os.getloadavg())

    emb = {r["clients"]: r for r in result["embeddings"]["levels"]}
    chat = {r["clients"]: r for r in result["chat"]["levels"]}
    unbatched = result["embeddings_unbatched"]["levels"][0]["requests_per_s"]
    emb_ratio = emb[32]["requests_per_s"] / max(unbatched, 1e-9)
    chat_ratio = chat[8].get("tokens_per_s", 0) / max(chat[1].get("tokens_per_s", 0), 1e-9)
    result["targets"] = {
        "embeddings_32_batched_vs_1_unbatched_throughput": {"value": round(emb_ratio, 2), "target": 3.0,
                                                            "met": emb_ratio >= 3.0},
        "chat_8_vs_1_tokens_per_s": {"value": round(chat_ratio, 2), "target": 1.5, "met": chat_ratio >= 1.5},
        "chat_ttft_p99_s_at_8": chat[8].get("ttft_p99_s"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["targets"], indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
