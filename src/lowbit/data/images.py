"""Opening user images robustly: a bad file is skipped with a warning, never a crash mid-evaluation."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from lowbit.errors import LowbitError
from lowbit.limits import decode_image

# Everything PIL and the OS raise for a file that is not a usable image. UnidentifiedImageError is an
# OSError; truncated data raises OSError on ``load()``; some decoders raise SyntaxError/ValueError/EOFError
# on malformed headers; DecompressionBombError guards against absurd sizes and is a plain Exception.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    Image.DecompressionBombError,
)

_WHITE = (255, 255, 255)


class ImageSkippedWarning(UserWarning):
    """An image file was missing, empty, corrupt or truncated and was left out."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert to RGB; transparent pixels become white rather than whatever colour hides under alpha."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _open(path: str | os.PathLike[str]) -> tuple[Image.Image | None, str]:
    """Open and fully decode ``path`` within ``lowbit.limits``' bounds (regular files only, no bombs, no extreme
    aspect ratios, downscaled to ``MAX_KEPT_IMAGE_SIDE``); return (image, "") or (None, reason)."""
    if not os.path.exists(path):
        return None, "file not found"
    try:
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            return None, "empty file"
        return _to_rgb(decode_image(path)), ""
    except LowbitError as exc:
        return None, str(exc)


def open_image(path: str | os.PathLike[str]) -> Image.Image | None:
    """Fully decode the image at ``path`` as RGB; None if it is missing, empty, corrupt or truncated."""
    return _open(path)[0]


def load_images(
    paths: Sequence[str | os.PathLike[str]], limit: int | None = None
) -> tuple[list[Image.Image], list[int], int]:
    """Open ``paths`` in order, skipping unusable files with one ``ImageSkippedWarning`` each.

    Stops once ``limit`` images were kept (so a small ``limit`` does not decode a whole folder).
    Returns ``(images, kept_indices, skipped_count)`` where ``kept_indices[j]`` is the position in
    ``paths`` of ``images[j]``, so callers can keep captions/labels aligned.
    """
    images: list[Image.Image] = []
    kept: list[int] = []
    skipped = 0
    for i, path in enumerate(paths):
        if limit is not None and len(images) >= limit:
            break
        img, reason = _open(path)
        if img is None:
            skipped += 1
            warnings.warn(f"skipping image {str(Path(path))!r}: {reason}", ImageSkippedWarning, stacklevel=2)
            continue
        images.append(img)
        kept.append(i)
    return images, kept, skipped
