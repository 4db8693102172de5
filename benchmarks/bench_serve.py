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

    .venv/bin/python benchmarks/bench_serve.py --soak 600      # ~11.5 minutes -> results/serve-soak.json

Soak (issue 18: "peak RSS bounded, held for 10 minutes of steady load"): both servers at once, embeddings with
32 clients and chat with 8 streams, each loaded without pause for a 30 s warm-up and then SECONDS; each server's
VmRSS is read every 5 s. At the end of the warm-up the bound is fixed, 1.25 x the RSS then (why: see
SOAK_BOUND_RULE), and VmHWM is reset (/proc/PID/clear_refs) so that it ends as the soak's own peak. Recorded per
server: the bound, RSS after warm-up, max and end RSS, drift per minute over the last half (a least-squares
line), requests and errors of the soak, whether the bound held; with the CPU and load average at start and end.
Exit status 1 when a bound broke or a request failed.
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

    def _status_mib(self, key: str) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return round(int(line.split()[1]) / 1024, 1)
        return float("nan")

    def peak_rss_mib(self) -> float:
        """VmHWM: the largest resident set since start (or since ``reset_peak``)."""
        return self._status_mib("VmHWM")

    def rss_mib(self) -> float:
        """VmRSS: the resident set now."""
        return self._status_mib("VmRSS")

    def reset_peak(self) -> bool:
        """Reset VmHWM to the current RSS (``5 > /proc/PID/clear_refs``, Linux >= 4.0); False where refused."""
        try:
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

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


async def _drive(clients: int, seconds: float, one: Any) -> tuple[list[dict[str, Any]], float]:
    """``clients`` tasks calling ``one(client, i)`` back to back for ``seconds``: what each call returned (plus
    its ``latency`` and ``end``, a perf_counter time) and the elapsed seconds."""
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
                rec["end"] = time.perf_counter()
                rec["latency"] = rec["end"] - start
                records.append(rec)
                i += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(loop(k) for k in range(clients)))
        elapsed = time.perf_counter() - t0
    return records, elapsed


def _summary(clients: int, records: list[dict[str, Any]], elapsed: float) -> dict[str, Any]:
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


async def _run_level(clients: int, seconds: float, one: Any) -> dict[str, Any]:
    """``clients`` tasks calling ``one(client, i)`` back to back for ``seconds``; a summary of what they got."""
    records, elapsed = await _drive(clients, seconds, one)
    return _summary(clients, records, elapsed)


def _embed_request(server: Server) -> Any:
    """``one(http, i)`` for ``_run_level``: one embeddings request, a caption numbered ``i``."""
    url = server.url + "/v1/embeddings"

    async def one(http: httpx.AsyncClient, i: int) -> dict[str, Any]:
        r = await http.post(url, json={"input": f"{CAPTIONS[i % len(CAPTIONS)]} number {i}"})
        return {"ok": r.status_code == 200, "status": r.status_code}

    return one


def bench_embeddings(model: str, seconds: float, levels_: tuple[int, ...] = LEVELS, *args: str) -> dict[str, Any]:
    server = Server(model, *args)
    try:
        one = _embed_request(server)
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


def _chat_server(model: str, workers: int) -> Server:
    return Server(model, "--generation-workers", str(workers), "--max-queue", "64")


def _chat_request(server: Server, max_tokens: int) -> Any:
    """``one(http, i)`` for ``_run_level``: one streamed chat completion (image + question), ``max_tokens`` long."""
    url = server.url + "/v1/chat/completions"
    images = [_png(c) for c in ((200, 20, 20), (20, 160, 40), (30, 30, 200), (20, 20, 20))]
    questions = ["What is this item?", "Describe the item in the image.", "What colour is the item?"]

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

    return one


def bench_chat(model: str, seconds: float, max_tokens: int, workers: int) -> dict[str, Any]:
    server = _chat_server(model, workers)
    try:
        one = _chat_request(server, max_tokens)
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


# -- soak: peak RSS held over minutes of steady load ---------------------------------------------------------
SOAK_EMBED_CLIENTS = 32
SOAK_CHAT_STREAMS = 8
SOAK_BOUND_FACTOR = 1.25
# Why 1.25 x the RSS after warm-up: once warm, everything a server keeps is allocated and of fixed size -- the
# weights, the torch/oneDNN runtime, the encoder's batch buffers (a forward holds <= max_batch_items = 64 items;
# 32 clients make batches <= 32), the chat engine's shared KV cache (generation_workers = 8 slots x positions
# rounded up to 128; these prompts, 144 visual + a few dozen text tokens + 32 answer tokens, fit one 256-position
# chunk: 30 layers x K,V x 3 heads x 64 x 4 B x 8 x 256 = 94 MB), one malloc arena per thread. Queues are bounded
# (max_queue) and answers have a fixed length, so nothing may grow with the number of requests served. The 25%
# (~130 MB on lit-fashion's ~520 MB, ~320 MB on llava-fashion-hd's ~1.3 GB) covers allocator fragmentation and
# transient activations; over 10 minutes it catches a leak of ~2 KB per embeddings request (~60k of them) or
# ~0.7 MB per chat completion (~460), and the drift fit over the last half shows slower ones.
SOAK_BOUND_RULE = (f"bound = {SOAK_BOUND_FACTOR} x VmRSS at the end of the warm-up (taken under the soak load, "
                   "fixed before the soak): after warm-up the weights, runtime, batch buffers and the shared KV cache "
                   "are allocated at a fixed size, queues are bounded and answers fixed-length; the 25% is for "
                   "allocator fragmentation and transient activations; growth with requests served (a leak) breaks it")


def _drift_per_min(samples: list[list[float]]) -> float | None:
    """Slope of a least-squares line through ``[t_s, rss_mib]`` samples, in MiB per minute."""
    if len(samples) < 2:
        return None
    mt = sum(t for t, _ in samples) / len(samples)
    mr = sum(r for _, r in samples) / len(samples)
    var = sum((t - mt) ** 2 for t, _ in samples)
    return round(60 * sum((t - mt) * (r - mr) for t, r in samples) / var, 3) if var else None


async def _soak_load(targets: dict[str, tuple[Server, int, Any]], warmup: float, seconds: float,
                     interval: float) -> dict[str, dict[str, Any]]:
    """Every target's ``clients`` calling its ``one`` back to back for ``warmup + seconds`` (one steady load, no
    pause between warm-up and soak) while each server's VmRSS is read every ``interval`` s. At the end of the
    warm-up the bound is fixed from the RSS then, and VmHWM is reset so that it holds the soak's own peak."""
    t0 = time.perf_counter()
    mark, end = t0 + warmup, t0 + warmup + seconds
    samples: dict[str, list[list[float]]] = {name: [] for name in targets}
    warm: dict[str, dict[str, Any]] = {}

    async def sample() -> None:
        wake = t0
        while True:
            await asyncio.sleep(max(0.0, wake - time.perf_counter()))
            now = time.perf_counter()
            for name, (server, _, _) in targets.items():
                rss = server.rss_mib()
                if name not in warm and now >= mark:
                    warm[name] = {"rss_after_warmup_mib": rss, "bound_mib": round(SOAK_BOUND_FACTOR * rss, 1),
                                  "peak_reset": server.reset_peak()}
                samples[name].append([round(now - mark, 1), rss])
            if now >= end:
                return
            wake = t0 + interval * (int((now - t0) / interval) + 1)
            wake = min(wake, end) if warm else min(wake, mark)

    sampler = asyncio.create_task(sample())
    runs = await asyncio.gather(*(_drive(clients, warmup + seconds, one) for _, clients, one in targets.values()))
    await sampler
    out = {}
    for (name, (server, clients, _)), (records, elapsed) in zip(targets.items(), runs, strict=True):
        soak = [r for r in records if r["end"] >= mark]
        steady = [s for s in samples[name] if s[0] >= 0]
        w = warm[name]
        peak = server.peak_rss_mib() if w["peak_reset"] else None
        max_rss = max(r for _, r in steady)
        out[name] = {
            "clients": clients,
            "warmup": _summary(clients, [r for r in records if r["end"] < mark], warmup),
            "soak": _summary(clients, soak, elapsed - warmup),
            **w,
            "max_rss_mib": max_rss,  # of the 5 s samples
            "peak_rss_since_warmup_mib": peak,  # VmHWM since the reset: also what fell between samples
            "rss_end_mib": steady[-1][1],
            "drift_mib_per_min_last_half": _drift_per_min([s for s in steady if s[0] >= seconds / 2]),
            "bound_held": max(max_rss, peak or 0.0) <= w["bound_mib"],
            "rss_samples": samples[name],  # [seconds since the end of warm-up, VmRSS MiB]; < 0: warm-up
        }
    return out


def soak(args: argparse.Namespace) -> bool:
    """Both servers at once, each under its own steady load for the whole soak (``args.soak`` seconds after
    ``args.soak_warmup``): embeddings with 32 clients, chat with 8 concurrent streams. Writes the JSON; True if
    both bounds held without an error."""
    result: dict[str, Any] = {
        "environment": environment(), "cpu": cpu_model(), "cores": os.cpu_count(),
        "mode": "concurrent: both servers up at once, each under its load for the whole soak",
        "soak_seconds": args.soak, "warmup_seconds": args.soak_warmup, "sample_interval_s": args.soak_interval,
        "bound_rule": SOAK_BOUND_RULE, "load_average_before_servers": list(os.getloadavg())}
    servers: list[Server] = []
    try:
        servers.append(Server(args.embed_model))
        servers.append(_chat_server(args.chat_model, args.workers))
        embed, chat = servers
        targets = {"embeddings": (embed, SOAK_EMBED_CLIENTS, _embed_request(embed)),
                   "chat": (chat, SOAK_CHAT_STREAMS, _chat_request(chat, args.max_tokens))}
        result["load_average_start"] = list(os.getloadavg())
        print(f"soak: {args.soak_warmup:g} s warm-up + {args.soak:g} s; load average {result['load_average_start']}",
              flush=True)
        runs = asyncio.run(_soak_load(targets, args.soak_warmup, args.soak, args.soak_interval))
        result["load_average_end"] = list(os.getloadavg())
        result["embeddings"] = {"model": args.embed_model, **runs["embeddings"]}
        result["chat"] = {"model": args.chat_model, "max_tokens": args.max_tokens, "generation_workers": args.workers,
                          **runs["chat"]}
    finally:
        for server in servers:
            server.stop()
    result["passed"] = all(result[k]["bound_held"] and result[k]["soak"]["errors"] == 0 for k in ("embeddings", "chat"))
    out = Path(args.out or RESULTS / "serve-soak.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for kind in ("embeddings", "chat"):
        print(kind, {k: v for k, v in result[kind].items() if k not in ("rss_samples", "warmup")}, flush=True)
    print(f"passed: {result['passed']}; wrote {out}")
    return bool(result["passed"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="per concurrency level")
    parser.add_argument("--embed-model", default="lit-fashion")
    parser.add_argument("--chat-model", default="llava-fashion-hd")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--workers", type=int, default=8, help="the server's --generation-workers")
    parser.add_argument("--soak", type=float, metavar="SECONDS",
                        help="instead of the levels: both servers under steady load this long, sampling RSS")
    parser.add_argument("--soak-warmup", type=float, default=30.0, help="seconds of load before the soak")
    parser.add_argument("--soak-interval", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--out", help="default: results/serve.json, or results/serve-soak.json with --soak")
    args = parser.parse_args()
    if args.soak:
        sys.exit(0 if soak(args) else 1)
    args.out = args.out or str(RESULTS / "serve.json")

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
