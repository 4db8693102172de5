"""Hostile inputs by category, shared by the fuzz tests (``tests/fuzz/``) and ``benchmarks/bench_hostile.py``.

A ``Case`` is a name, a zero-argument ``run`` and whether the input is valid (True: must succeed; False: must be
a ``LowbitError``; None: either). ``classify`` runs one under a time bound and says what happened: ``ok``,
``clean`` (a ``LowbitError``), ``traceback`` (any other exception), ``hang`` (over the bound), ``silent``
(invalid input accepted) or ``refused-valid`` (valid input refused).
"""

from __future__ import annotations

import copy
import functools
import io
import json
import os
import random
import signal
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from lowbit.errors import LowbitError

NAN, INF = float("nan"), float("inf")
BAD_VALUES: list[Any] = ["abc", "", None, NAN, INF, -INF, -1, 0, 10**20, 4.5, [], {}, True, [1, [2]], {"a": None}]
MISSING = object()


@dataclass
class Case:
    name: str
    run: Callable[[], Any]
    valid: bool | None = None


class Hang(Exception):
    """The case ran past its time bound."""


def classify(case: Case, seconds: float = 10.0) -> tuple[str, str]:
    """(outcome, detail) of running ``case`` with an alarm after ``seconds``."""
    def alarm(*_: Any) -> None:
        raise Hang()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        case.run()
        outcome, detail = ("silent", "accepted") if case.valid is False else ("ok", "")
    except Hang:
        outcome, detail = "hang", f"over {seconds} s"
    except LowbitError as exc:
        outcome, detail = ("refused-valid", str(exc)) if case.valid is True else ("clean", str(exc))
        if "\n" in str(exc):
            outcome = "traceback"  # not one line
    except Exception as exc:  # noqa: BLE001  (what the fuzzers look for)
        outcome, detail = "traceback", f"{type(exc).__name__}: {str(exc)[:200]}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return outcome, detail


# --- recipes ------------------------------------------------------------------------------------------------------
SHORT_ALPHABET = "w0123456789ga:=,/@+*.-_ ²٤①\x00\nvisontexprjcrmqbkl"


def recipe_strings(rng: random.Random, n: int) -> Iterator[Case]:
    from lowbit.quant.recipe import load_recipe

    fixed = ["w²", "*=w²", "*=w" + "9" * 5000, "*=w4g" + "9" * 5000, "*=w4g100000000000000000000", "*=w4," * 30000,
             "*=w4\x00", "", " ", "=", "*=", "*=w", "*=w4g", "*=w4g0", "*=w4:", "*=w4:nope", "*@dense=w4", "/x=w4",
             "vision/=w4", "floats=fp8", "*=w1.58", "*=w4g64a:gptq", "vision=w4,text=w8", "*=w16", "*=w-4", "*=W4",
             "*=w4 g64", "*=w4g64aa", "*=skip,*=w4", "../../etc/passwd", "x" * 5000 + ".yaml", "*=w٤", "*=w４"]
    for i, text in enumerate(fixed):
        yield Case(f"recipe-fixed-{i}", lambda t=text: load_recipe(t))
    for i in range(n):
        length = rng.choice([1, 3, 8, 20, 60])
        text = "".join(rng.choice(SHORT_ALPHABET) for _ in range(length))
        yield Case(f"recipe-random-{i}", lambda t=text: load_recipe(t))


def billion_laughs(levels: int = 9, width: int = 9) -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"{chr(97 + i)}: &{chr(97 + i)} [" + ",".join([f"*{chr(96 + i)}"] * width) + "]")
    return "\n".join(lines) + "\n"


def recipe_yaml_texts(rng: random.Random, n: int) -> Iterator[tuple[str, bytes]]:
    fixed: list[tuple[str, bytes]] = [
        ("billion-laughs", billion_laughs().encode()),
        ("billion-laughs-3", billion_laughs(3, 3).encode()),
        ("deep-seq", ("[" * 10000 + "]" * 10000).encode()),
        ("deep-map", ("rules: " + "{a: " * 200 + "1" + "}" * 200).encode()),
        ("latin-1", "rules: [{bits: 4, tower: café}]".encode("latin-1")),
        ("binary", bytes(range(256))),
        ("unhashable-key", b"rules:\n - {bits: 4, [1]: 2}\n"),
        ("python-tag", b"rules: !!python/object/apply:os.system ['echo pwned']\n"),
        ("huge-int", b"rules: [{bits: " + b"9" * 5000 + b"}]"),
        ("huge-file", b"x" * (300 * 1024)),
        ("empty", b""),
        ("null", b"null"),
        ("list", b"[1, 2]"),
        ("anchors-ok", b"r: &r {bits: 4}\nrules: [*r]\n"),
        ("recursive-alias", b"rules: &a [*a]\n"),
        ("bom", "\ufeffrules: [{bits: 4}]".encode()),
    ]
    yield from fixed
    fields = ["tower", "pattern", "kinds", "method", "bits", "group_size", "symmetric", "skip", "options", "zzz"]
    for i in range(n):
        rule = {"bits": 4}
        for _ in range(rng.randint(1, 3)):
            rule[rng.choice(fields)] = rng.choice(BAD_VALUES + [1, 2, 3, 8, 64, "rtn", "gptq", "linear", False])
        doc = {"version": rng.choice([1, 1, 2, "1", None]), "rules": [rule]}
        yield f"yaml-random-{i}", json.dumps(doc, allow_nan=True).replace("NaN", ".nan").replace(
            "Infinity", ".inf").encode()


def recipe_yaml_cases(root: Path, rng: random.Random, n: int) -> Iterator[Case]:
    from lowbit.quant.recipe import load_recipe

    root.mkdir(parents=True, exist_ok=True)
    for name, data in recipe_yaml_texts(rng, n):
        path = root / f"{name}.yaml"
        path.write_bytes(data)
        yield Case(f"yaml-{name}", lambda p=path: load_recipe(str(p)))


# --- manifests ----------------------------------------------------------------------------------------------------
def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


def mutate(manifest: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(manifest)
    node = out
    for key in path[:-1]:
        node = node[key]
    if value is MISSING:
        node.pop(path[-1]) if isinstance(node, dict) else node.pop(path[-1])
    else:
        node[path[-1]] = value
    return out


LOAD_RELEVANT = ("format", "format_version", "source", "architecture", "storage", "modules")


def manifest_mutations(manifest: dict[str, Any], rng: random.Random, n: int) -> Iterator[tuple[str, Any]]:
    """Every field of the top level, source, storage and the first module set to every bad value or removed,
    an extra key in each mapping, then ``n`` random mutations anywhere in the load-relevant sections."""
    first = next(iter(manifest["modules"]))
    targets = [(k,) for k in manifest] + [("source", k) for k in manifest["source"]] + [
        ("storage", k) for k in manifest["storage"]] + [("modules", first, k) for k in manifest["modules"][first]]
    for path in targets:
        for value in [*BAD_VALUES, MISSING]:
            yield f"{'.'.join(map(str, path))}={value!r}"[:80], mutate(manifest, path, value)
    for mapping in [(), ("source",), ("storage",), ("modules", first)]:
        yield f"extra-key-in-{'.'.join(mapping) or 'top'}", mutate(manifest, (*mapping, "surprise"), 1)
    yield "trust_remote_code", mutate(manifest, ("source", "options"), {"trust_remote_code": True})
    yield "deep-10000", "[" * 10000 + "]" * 10000
    yield "not-json", "{not json"
    paths = [p for p in _paths(manifest) if p[0] in LOAD_RELEVANT]
    for i in range(n):
        path = rng.choice(paths)
        value = rng.choice([*BAD_VALUES, MISSING, 2**31, -(2**63), "lowbit-packed", 1, 2, 8, 3])
        yield f"random-{i}:{'.'.join(map(str, path))}={value!r}"[:100], mutate(manifest, path, value)


def write_manifest(directory: Path, manifest: Any) -> None:
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    (directory / "manifest.json").write_text(text)


# --- images -------------------------------------------------------------------------------------------------------
def small_images() -> dict[str, bytes]:
    """A small PNG and JPEG (and other modes) to truncate and flip."""
    out: dict[str, bytes] = {}
    rgb = Image.new("RGB", (16, 12), (200, 30, 40))
    for fmt, mode in (("PNG", "RGB"), ("JPEG", "RGB"), ("PNG", "P"), ("PNG", "LA"), ("PNG", "I;16"), ("PNG", "1"),
                      ("GIF", "P"), ("BMP", "RGB"), ("WEBP", "RGB"), ("TIFF", "CMYK"), ("JPEG", "CMYK")):
        buf = io.BytesIO()
        try:
            rgb.convert(mode).save(buf, format=fmt)
        except (OSError, ValueError, KeyError):
            continue
        out[f"{fmt.lower()}-{mode}"] = buf.getvalue()
    return out


def bomb_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1) * 8))
            + chunk(b"IEND", b""))


def strip_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height), 7).save(buf, format="PNG")
    return buf.getvalue()


def image_cases(root: Path, rng: random.Random, n_flips: int) -> Iterator[Case]:
    from lowbit.limits import decode_image

    root.mkdir(parents=True, exist_ok=True)
    images = small_images()
    for name, data in images.items():
        yield Case(f"image-{name}-whole", lambda d=data: decode_image(d), valid=True)
        for cut in range(len(data)):  # every byte length
            yield Case(f"image-{name}-cut{cut}", lambda d=data[:cut]: decode_image(d))
    for i in range(n_flips):
        name, data = rng.choice(sorted(images.items()))
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(min(len(buf), 64))] = rng.randrange(256)  # the header, where sizes live
        yield Case(f"image-flip-{i}-{name}", lambda d=bytes(buf): decode_image(d))
    for w, h in ((100_000, 100_000), (30_000, 30_000), (10_000, 10_000), (65_535, 1)):
        yield Case(f"image-bomb-{w}x{h}", functools.partial(decode_image, bomb_png(w, h)), valid=False)
    for w, h in ((10_000, 1), (20_000, 1), (1, 10_000), (33, 1)):
        yield Case(f"image-strip-{w}x{h}", functools.partial(decode_image, strip_png(w, h)), valid=False)
    fifo = root / "fifo.png"
    if not fifo.exists():
        os.mkfifo(fifo)
    yield Case("image-fifo", lambda: decode_image(fifo), valid=False)
    yield Case("image-directory", lambda: decode_image(root), valid=False)
    yield Case("image-dev-zero", lambda: decode_image("/dev/zero"), valid=False)
    yield Case("image-missing", lambda: decode_image(root / "nope.png"), valid=False)


# --- command lines ------------------------------------------------------------------------------------------------
def cli_argv(rng: random.Random, root: Path, n: int) -> Iterator[list[str]]:
    """Random command lines that cannot start real work: no valid model, dataset or task name appears, and the
    verbs that run without one (demo, serve, bench kernels) are left out."""
    verbs = [["quantize"], ["eval"], ["sweep"], ["qat"], ["export"], ["chat"], ["build"], ["train", "clip"],
             ["data", "shard"], ["bench", "model"], ["models"]]
    flags = ["--out", "--recipe", "--json", "--task", "--data", "--limit", "--image", "--format", "--steps",
             "--calib-samples", "--overwrite", "--act-block", "--kv-bits", "--reference", "--debug", "--help",
             "--shard-size", "--max-new-tokens", "--prune-ratio", "--batch-size", "--model"]
    values = ["", ".", "..", "/", "-1", "0", "1e20", "nan", "w²", "*=w4g0", str(root / "missing"), str(root),
              str(root / "fifo"), "/dev/null", "/proc/x/y", "x" * 300, "no-such-model", "gguf", "row", "33", "\x00",
              str(root / "docs"), str(root / "docs" / "thesis.tex")]
    for _ in range(n):
        argv = list(rng.choice(verbs))
        for _ in range(rng.randint(0, 5)):
            argv += [rng.choice(flags)] if rng.random() < 0.5 else [rng.choice(flags), rng.choice(values)]
        if rng.random() < 0.7:
            argv.insert(len(rng.choice(verbs)), rng.choice(values))
        yield argv
