"""Bounds on what lowbit reads, in one place (docs/LIMITS.md states them): how deep a JSON or YAML document may
nest, how many YAML aliases it may use, how large a manifest, recipe or image may be. Readers here turn every
malformed or hostile input into one ``LowbitError`` naming the file, the position and what is accepted, before
anything large is allocated; and they refuse what is not a regular file (a FIFO would block forever) before
opening it.
"""

from __future__ import annotations

import json
import os
import stat
import warnings
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError

MAX_JSON_DEPTH = 32  # a manifest nests 5 levels, a result 4: deeper is not lowbit's
MAX_JSONL_DEPTH = 8  # one row of an image-caption index: an object of strings
MAX_MANIFEST_BYTES = 64 * 2**20  # a 100k-module LLM manifest is ~40 MB
MAX_RECIPE_CHARS = 10_000  # a short recipe string
MAX_RECIPE_FILE_BYTES = 256 * 2**10  # a YAML recipe file
MAX_YAML_DEPTH = 16
MAX_YAML_ALIASES = 64  # anchors/aliases in one YAML document (the billion laughs uses them to multiply)
MAX_YAML_NODES = 100_000  # nodes after expanding aliases
MAX_GROUP_SIZE = 2**20  # quantization group size (per-channel groups are the whole input width)
MAX_DIM = 2**31  # one dimension of a tensor shape
MAX_ELEMENTS = 2**40  # elements of one tensor (8 TB at one byte each: nothing real is larger)
MAX_CONFIG_OVERSIZE = 4  # a model config may describe at most 4x the parameters its weight files could hold
MAX_SHARD_MEMBER_BYTES = 64 * 2**20  # one file inside a webdataset tar shard (an image, caption or JSON)
MAX_IMAGE_PIXELS = 64 * 2**20  # decoded pixels of one image (a 8192 x 8192 photo); PIL's bomb guard
MAX_ASPECT_RATIO = 32  # longest side / shortest side of an image given to a model
MAX_KEPT_IMAGE_SIDE = 1024  # decoded images kept in memory are downscaled to this longest side


def check_regular_file(path: str | os.PathLike[str], what: str, accepted: str) -> Path:
    """``path`` as a Path if it is a regular file (symlinks followed); else one ``LowbitError``. A FIFO, socket
    or device is refused before it is opened (opening a FIFO blocks until a writer comes)."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise LowbitError(f"{what} {str(p)!r} does not exist; accepted: {accepted}") from None
    except ValueError:  # a NUL in the name
        raise LowbitError(f"{what} {str(p)!r} is not a usable path; accepted: {accepted}") from None
    except OSError as err:
        raise LowbitError(f"{what} {str(p)!r} cannot be read ({err.strerror or err}); accepted: {accepted}") from None
    if stat.S_ISDIR(mode):
        raise LowbitError(f"{what} {str(p)!r} is a directory; accepted: {accepted}")
    if not stat.S_ISREG(mode):
        raise LowbitError(f"{what} {str(p)!r} is not a regular file (a FIFO, socket or device); accepted: {accepted}")
    return p


def read_text(path: str | os.PathLike[str], what: str, accepted: str, max_bytes: int) -> str:
    """A regular file of at most ``max_bytes`` as UTF-8 text (one line naming the byte for anything else)."""
    p = check_regular_file(path, what, accepted)
    size = p.stat().st_size
    if size > max_bytes:
        raise LowbitError(f"{what} {str(p)!r} has {size} bytes; accepted: at most {max_bytes} bytes ({accepted})")
    try:
        data = p.read_bytes()
    except OSError as err:
        raise LowbitError(f"{what} {str(p)!r} cannot be read ({err.strerror or err}); accepted: {accepted}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LowbitError(f"{what} {str(p)!r} is not UTF-8 text (byte {err.start}: {data[err.start:err.start + 1]!r});"
                          f" accepted: {accepted} in UTF-8") from None


def depth(obj: Any) -> int:
    """Nesting depth of a parsed JSON/YAML value (iterative: no recursion limit)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads_json(text: str | bytes, what: str, accepted: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON strictly: NaN/Infinity refused, nesting bounded, errors as one line with the position."""
    try:
        obj = json.loads(text, parse_constant=_no_constants)
    except json.JSONDecodeError as err:
        raise LowbitError(f"{what} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
                          f"accepted: {accepted}") from None
    except ValueError as err:
        raise LowbitError(f"{what}: {err}; accepted: {accepted} (finite numbers only)") from None
    except RecursionError:
        raise LowbitError(f"{what} nests deeper than {max_depth} levels; accepted: {accepted}") from None
    if depth(obj) > max_depth:
        raise LowbitError(f"{what} nests deeper than {max_depth} levels; accepted: {accepted}")
    return obj


def read_json(path: str | os.PathLike[str], what: str, accepted: str, max_bytes: int = MAX_MANIFEST_BYTES,
              max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A regular JSON file, bounded in bytes and depth, as one ``LowbitError`` for anything else."""
    text = read_text(path, what, accepted, max_bytes)
    return loads_json(text, f"{what} {str(path)!r}", accepted, max_depth)


def load_yaml(text: str, what: str, accepted: str) -> Any:
    """YAML with the safe loader, refusing more than ``MAX_YAML_ALIASES`` aliases, nesting deeper than
    ``MAX_YAML_DEPTH`` and more than ``MAX_YAML_NODES`` nodes once aliases are expanded (a billion-laughs
    document fails here in milliseconds, before a single list is built)."""
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        aliases = 0
        level = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            mark = self.peek_event().start_mark
            if self.check_event(yaml.AliasEvent):
                self.aliases += 1
                if self.aliases > MAX_YAML_ALIASES:
                    raise LowbitError(f"{what} uses more than {MAX_YAML_ALIASES} YAML aliases (line {mark.line + 1});"
                                      f" accepted: {accepted}")
            self.level += 1
            if self.level > MAX_YAML_DEPTH:
                raise LowbitError(f"{what} nests deeper than {MAX_YAML_DEPTH} levels (line {mark.line + 1}); "
                                  f"accepted: {accepted}")
            try:
                return super().compose_node(parent, index)
            finally:
                self.level -= 1

    def expanded_nodes(node: Any, memo: dict[int, int]) -> int:
        if id(node) not in memo:
            memo[id(node)] = 1  # a cycle counts once (a recursive alias)
            children = node.value if isinstance(node.value, list) else []
            memo[id(node)] = 1 + sum(expanded_nodes(c, memo) for item in children
                                     for c in (item if isinstance(item, tuple) else (item,)))
        return memo[id(node)]

    loader = None
    try:
        loader = BoundedLoader(text)  # the reader refuses control characters already here
        node = loader.get_single_node()
        if node is None:
            return None
        if expanded_nodes(node, {}) > MAX_YAML_NODES:
            raise LowbitError(f"{what} expands to more than {MAX_YAML_NODES} YAML nodes; accepted: {accepted}")
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise LowbitError(f"{what} is not valid YAML ({' '.join(str(err).split())}); accepted: {accepted}") from None
    except RecursionError:
        raise LowbitError(f"{what} nests too deeply; accepted: {accepted}") from None
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        raise LowbitError(f"{what} holds a value lowbit cannot read ({str(err)[:80]}); accepted: {accepted}") from None
    finally:
        if loader is not None:
            loader.dispose()


def decode_image(source: str | os.PathLike[str] | bytes, what: str | None = None) -> Any:
    """Decode an image file (or its bytes) within bounds, as a PIL image in its own mode.

    Refused in one ``LowbitError`` before the pixels are decoded: anything but a regular file (a FIFO would
    block), more than ``MAX_IMAGE_PIXELS`` pixels (a decompression bomb: a few KB of PNG declaring 100k x 100k),
    an aspect ratio beyond ``MAX_ASPECT_RATIO`` (a 10000 x 1 strip, which an aspect-keeping processor would
    blow up to gigabytes), and anything PIL cannot decode. JPEGs decode at a reduced scale when larger than
    ``MAX_KEPT_IMAGE_SIDE``, and the result is downscaled to that longest side: what is kept in memory is small.
    """
    import io

    from PIL import Image

    accepted = (f"a readable PNG, JPEG, BMP, GIF or WebP file of at most {MAX_IMAGE_PIXELS} pixels and aspect "
                f"ratio {MAX_ASPECT_RATIO}:1")
    if isinstance(source, (bytes, bytearray)):
        what = what or f"image of {len(source)} bytes"
        stream: Any = io.BytesIO(source)
    else:
        what = what or f"image {str(source)!r}"
        stream = check_regular_file(source, "image", accepted)
    try:
        with warnings.catch_warnings(), Image.open(stream) as img:
            warnings.simplefilter("ignore")  # PIL's notes on damaged EXIF/TIFF tags: the outcome says enough
            width, height = img.size
            if width < 1 or height < 1 or width * height > MAX_IMAGE_PIXELS:
                raise LowbitError(f"{what} is {width}x{height} pixels; accepted: {accepted}")
            if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
                raise LowbitError(f"{what} is {width}x{height} pixels (aspect ratio "
                                  f"{max(width, height) / min(width, height):.0f}:1); accepted: {accepted}")
            if img.format == "JPEG" and max(width, height) > MAX_KEPT_IMAGE_SIDE:
                img.draft(img.mode, (MAX_KEPT_IMAGE_SIDE, MAX_KEPT_IMAGE_SIDE))  # decode at 1/2, 1/4 or 1/8 scale
            img.load()  # Image.open is lazy: only load() decodes the pixels and finds truncated data
            if max(img.size) > MAX_KEPT_IMAGE_SIDE:
                img.thumbnail((MAX_KEPT_IMAGE_SIDE, MAX_KEPT_IMAGE_SIDE))
            return img.copy()  # detached from the file, which the with-block closes
    except LowbitError:
        raise
    except Image.DecompressionBombError:
        raise LowbitError(f"{what} declares more than {MAX_IMAGE_PIXELS} pixels (a decompression bomb); accepted: "
                          f"{accepted}") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        first = " ".join(str(exc).split())[:120]
        raise LowbitError(f"cannot decode {what} ({type(exc).__name__}: {first}); accepted: {accepted}") from None
