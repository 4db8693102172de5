"""Images in requests: ``data:image/...;base64,`` URLs or bare base64 (local paths only when allowed).

The pixel count is read from the image header and checked before decoding, so a decompression bomb (a few
kilobytes of PNG declaring 20000 x 20000 pixels) costs nothing (413); then the bounded decoder of
``lowbit.limits`` (the one every image in lowbit goes through): huge aspect ratios and truncated files are 400s.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from pathlib import Path

from PIL import Image

from lowbit.errors import LowbitError
from lowbit.limits import MAX_IMAGE_PIXELS, check_regular_file
from lowbit.limits import decode_image as bounded_decode
from lowbit.workflows.serve.limits import ApiError, Limits, bad_request, over_limit


def image_bytes(url: str, limits: Limits, param: str = "image_url") -> bytes:
    """The encoded image a request names: a data URL, bare base64, or (``allow_local_files``) a file path."""
    if not isinstance(url, str) or not url:
        raise bad_request(f"{param} must be a non-empty string (a data:image/...;base64, URL)", param)
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise bad_request(f"{param} must be a base64 data URL (data:image/png;base64,...)", param,
                              "invalid_image")
        return _b64(payload, param)
    if url.startswith(("http://", "https://")):
        raise bad_request(f"{param}: remote URLs are not fetched by this server; send a data URL", param,
                          "invalid_image")
    if url.startswith("file://") or url.startswith("/") or url.startswith("./"):
        if not limits.allow_local_files:
            raise ApiError(400, f"{param}: local file paths are off; start the server with --allow-local-files",
                           "local_files_disabled", param)
        path = Path(url.removeprefix("file://"))
        try:  # a FIFO would block the worker thread forever: regular files only
            check_regular_file(path, param, "a regular image file")
        except LowbitError as exc:
            raise bad_request(str(exc), param, "invalid_image") from None
        try:
            size = path.stat().st_size
            if size > limits.max_body_bytes:
                raise over_limit("max_body_bytes", size, limits.max_body_bytes, 413, param)
            return path.read_bytes()
        except OSError as exc:
            raise bad_request(f"{param}: cannot read {path} ({type(exc).__name__})", param, "invalid_image") from None
    return _b64(url, param)


def _b64(payload: str, param: str) -> bytes:
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param}: broken base64 image data", param, "invalid_image") from None


def decode_image(data: bytes, limits: Limits, param: str = "image_url") -> Image.Image:
    """RGB image from encoded bytes through lowbit's bounded decoder (``lowbit.limits.decode_image``: no bombs,
    aspect ratio at most ``MAX_ASPECT_RATIO``:1, kept at most ``MAX_KEPT_IMAGE_SIDE`` on the longest side).

    The server's own pixel limit is checked from the header first (413); anything the bounded decoder refuses
    (a 20000 x 1 strip an aspect-keeping processor would blow up to gigabytes, truncated or unknown data) is a
    400 carrying its one-line reason."""
    try:
        with warnings.catch_warnings(), Image.open(io.BytesIO(data)) as img:  # lazy: reads the header only
            # PIL warns (and raises above 2x) on huge images; our own limit is lower and checked next.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            width, height = img.size
    except Image.DecompressionBombError:  # PIL's own guard (> 2x its limit) fires inside open()
        width, height = MAX_IMAGE_PIXELS + 1, 1
    except (OSError, ValueError, SyntaxError, EOFError):
        width = height = 0  # not an image PIL knows: the bounded decoder says why
    limit = min(limits.max_image_pixels, MAX_IMAGE_PIXELS)
    if width * height > limit:
        raise over_limit("max_image_pixels", width * height, limit, 413, param)
    try:
        return bounded_decode(data, what=param).convert("RGB")
    except LowbitError as exc:
        raise bad_request(f"{exc}", param, "invalid_image") from None


def load_image(url: str, limits: Limits, param: str = "image_url") -> Image.Image:
    """``image_bytes`` then ``decode_image``."""
    return decode_image(image_bytes(url, limits, param), limits, param)
