"""Atomic writes: outputs go to a temporary name beside the target and are renamed into place."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success rename it onto ``target``.

    A crash inside the block leaves ``target`` untouched (and no half-written file under its name).

    Example:
        >>> with atomic_path("out.json") as tmp:  # doctest: +SKIP
        ...     tmp.write_text("{}")
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a finished output gets ordinary permissions
    try:
        yield tmp
        if is_dir and target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_MAX_HEADER = 100 * 2**20  # a header larger than this is not a checkpoint's


def mmap_safetensors(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The tensors of a safetensors file as views of one private memory map, with readahead off.

    Nothing is read until a tensor's pages are touched, and then only those pages: the kernel's readahead
    (which maps ~64 KB around every touch, so a loader touching hundreds of small tensors pulled in half the
    file) is disabled with ``MADV_RANDOM``. The map is copy-on-write: tensors may be modified in memory, never
    on disk. Every offset is checked against the file before any tensor is made (a truncated or garbled file is
    one ``LowbitError``).

    Example:
        >>> state = mmap_safetensors("out/w4/model.safetensors")  # doctest: +SKIP
    """
    import mmap
    import struct

    import torch

    from lowbit.errors import LowbitError

    path = Path(path)
    what = f"{str(path)!r} is not a complete safetensors file"
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 8:
            raise LowbitError(f"{what} ({size} bytes)")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(_MAX_HEADER, size - 8):
            raise LowbitError(f"{what} (header of {header_len} bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise LowbitError(f"{what} (header: {err})") from None
        data_start = 8 + header_len
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > data_start else None
    if mapped is not None and hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)
    out: dict[str, Any] = {}
    for key, info in header.items() if isinstance(header, dict) else ():
        if key == "__metadata__":
            continue
        try:
            dtype = getattr(torch, _SAFETENSORS_DTYPES[info["dtype"]])
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise LowbitError(f"{what} (tensor {key!r}: bad dtype, shape or offsets)") from None
        count = 1
        for d in shape:
            count *= d
        nbytes = count * dtype.itemsize
        if min(shape, default=0) < 0 or end - begin != nbytes or data_start + end > size or begin < 0:
            raise LowbitError(f"{what} (tensor {key!r}: bytes {begin}..{end} do not hold {info['dtype']} "
                              f"{shape} within the file)")
        if nbytes == 0 or mapped is None:
            out[key] = torch.empty(shape, dtype=dtype)
            continue
        flat = torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=data_start + begin)
        out[key] = flat.view(dtype).reshape(shape)
    if not isinstance(header, dict):
        raise LowbitError(f"{what} (the header is not a mapping)")
    return out
