"""``lowbit serve`` as users start it: the CLI in its own process, on 127.0.0.1; SIGTERM lets an in-flight
request finish, then the process exits 0."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402

from tests.models.llava_tiny import write_tiny_llava  # noqa: E402
from tests.workflows.test_serve import chat_messages  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_and_sigterm_finishes_the_request_in_flight(tmp_path: Path) -> None:
    model = write_tiny_llava(tmp_path / "tiny-llava", max_positions=256)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lowbit.cli", "serve", str(model), "--port", str(port),
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        models = httpx.get(url + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["tiny-llava"] and models[0]["lowbit"]["kind"] == "generative"

        # A request in flight: headers and half of the body sent, then SIGTERM, then the rest.
        body = json.dumps({"messages": chat_messages(), "max_tokens": 4}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body[: len(body) // 2])
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert proc.poll() is None  # still finishing the request
            sock.sendall(body[len(body) // 2:])
            reply = b""
            while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
                part = sock.recv(65536)
                if not part:
                    break
                reply += part
        head, _, payload = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), reply[:300]
        assert json.loads(payload)["usage"]["completion_tokens"] >= 1
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
