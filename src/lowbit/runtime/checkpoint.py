"""Reading a lowbit packed checkpoint without torch: the safetensors file memory-mapped into numpy views, the
manifest and the architecture's config (docs/PACKED_FORMAT.md is the contract).

``SafeTensors`` reads the header (``lowbit.io.map_safetensors``: 8-byte little-endian length + JSON, checked),
checks every tensor's bytes lie in the file, maps the file read-only (readahead off) and hands out
``np.frombuffer`` views; ``release`` drops a
view's resident pages (``MADV_DONTNEED``) once it has been copied into another form, so that a loader holds each
weight once.
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.errors import LowbitError
from lowbit.io import map_safetensors

DTYPES = {"U8": np.uint8, "I8": np.int8, "F16": np.float16, "F32": np.float32, "F64": np.float64, "I32": np.int32,
          "I64": np.int64, "BOOL": np.bool_}


class SafeTensors:
    """The tensors of one safetensors file as read-only numpy views of a memory map (nothing read until used)."""

    def __init__(self, path: Path) -> None:
        what = f"{str(path)!r} is not a complete safetensors file"
        header, self._start, size, self._map = map_safetensors(path, mmap.ACCESS_READ)
        if not isinstance(header, dict):
            raise LowbitError(f"{what} (the header is not a mapping)")
        self._info: dict[str, tuple[Any, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            try:
                dtype = DTYPES.get(info["dtype"])
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise LowbitError(f"{what} (tensor {key!r}: bad dtype, shape or offsets)") from None
            count = int(np.prod(shape, dtype=np.int64)) if shape else 1
            nbytes = count * (np.dtype(dtype).itemsize if dtype is not None else 0)
            if dtype is not None and (min(shape, default=0) < 0 or end - begin != nbytes or begin < 0
                                      or self._start + end > size):
                raise LowbitError(f"{what} (tensor {key!r}: bytes {begin}..{end} do not hold {info['dtype']} "
                                  f"{list(shape)} within the file)")
            self._info[key] = (dtype if dtype is not None else info["dtype"], shape, begin, nbytes)

    def __contains__(self, key: str) -> bool:
        return key in self._info

    def get(self, key: str) -> np.ndarray:
        """Tensor ``key`` as a read-only view of the map."""
        if key not in self._info:
            raise LowbitError(f"the checkpoint has no tensor {key!r}")
        dtype, shape, begin, nbytes = self._info[key]
        if isinstance(dtype, str):
            raise LowbitError(f"tensor {key!r} is {dtype}, which the lite runtime does not read; accepted: "
                              f"{', '.join(DTYPES)}")
        if nbytes == 0 or self._map is None:
            return np.zeros(shape, dtype=dtype)
        return np.frombuffer(self._map, dtype=dtype, count=nbytes // np.dtype(dtype).itemsize,
                             offset=self._start + begin).reshape(shape)

    def float32(self, key: str) -> np.ndarray:
        """Tensor ``key`` as an owned contiguous float32 copy (float tensors are stored fp32 or fp16)."""
        return np.array(self.get(key), dtype=np.float32, order="C")

    def release(self, key: str) -> int:
        """Drop this process's resident pages of tensor ``key`` (whole pages inside it; the page cache keeps them,
        a later read maps them again). Bytes released."""
        if self._map is None or key not in self._info:
            return 0
        _, _, begin, nbytes = self._info[key]
        page = mmap.PAGESIZE
        start = self._start + begin
        first, last = -(-start // page) * page, (start + nbytes) // page * page
        if last <= first:
            return 0
        self._map.madvise(mmap.MADV_DONTNEED, first, last - first)
        return last - first


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object file, or one line saying what is missing or wrong."""
    if not path.is_file():
        raise LowbitError(f"{what} is missing: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LowbitError(f"{what} is not valid JSON ({path}: {err})") from None
    if not isinstance(data, dict):
        raise LowbitError(f"{what} is not a JSON object: {path}")
    return data
