"""The server's limits and its one error type: every refusal is ``{"error": {...}}`` naming what was wrong."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how much work the server takes on before refusing more.

    A request over a size limit gets 413, one over a count limit 400; a full queue 429 (``Retry-After``).
    """

    max_body_bytes: int = 20 * 1024 * 1024  # a 4k PNG as a base64 data URL is ~ 10-15 MB
    max_image_pixels: int = 4096 * 4096  # checked from the header, before any pixel is decoded
    max_prompt_tokens: int = 1024  # text tokens of a chat prompt (visual tokens come on top)
    max_tokens: int = 256  # new tokens per chat completion
    max_inputs: int = 256  # texts/images in one embeddings request
    max_labels: int = 100  # candidate labels of one classify request
    max_text_chars: int = 8192  # one embedding input or label, before tokenizing
    max_queue: int = 64  # waiting requests per model kind (generation, encoding) before 429
    generation_workers: int = 8  # chat completions decoded at once (rows of the batched decode, or threads)
    batch_decode: bool = True  # decode concurrent chat completions in one batch where the model allows
    batch_window_ms: float = 5.0  # how long the encoder waits for more requests to join a forward
    max_batch_items: int = 64  # texts + images in one encoder forward
    allow_local_files: bool = False  # image_url may name a file on the server's disk (file:// or a path)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ApiError(Exception):
    """An HTTP error with an OpenAI-style JSON body: ``{"error": {"message", "type", "code", "param"}}``."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    @property
    def kind(self) -> str:
        """OpenAI's ``type`` field: what sort of error the client made (or the server hit)."""
        if self.status == 429:
            return "rate_limit_error"
        if self.status >= 500:
            return "server_error"
        return "invalid_request_error"

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "code": self.code, "param": self.param}}


def over_limit(name: str, value: int, limit: int, status: int = 400, param: str | None = None) -> ApiError:
    """The error for ``value`` above ``Limits.<name>`` (the code is the limit's name, so clients can match it)."""
    return ApiError(status, f"{param or name} is {value}, above the server's limit {name}={limit}", name, param)


def bad_request(message: str, param: str | None = None, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, code, param)
