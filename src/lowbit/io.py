"""Outputs: atomic writes (a temporary name beside the target, renamed into place) and the guard that keeps a
user-named output from destroying what is already there.

The guard (``check_output``) is the one rule every writer of a user-named output applies before any work:

- the name must name something: ``''``, ``.``, ``..`` and paths ending in them are refused;
- the nearest existing parent must be a writable directory;
- an existing target is replaced only when it is a lowbit output of the same kind (``OUTPUT_KINDS``: a packed
  checkpoint's ``manifest.json`` with lowbit's format key, a run directory's ``.lowbit-output`` marker, a JSON
  result's ``"lowbit_output"`` key, ...) or empty, unless the caller passes ``overwrite=True`` (``--overwrite``);
- a file is never written onto a directory, nor a directory onto anything but a directory;
- the output never equals, contains or lies inside a source (the model it was made from), ``overwrite`` or not.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError

OUTPUT_MARKER = ".lowbit-output"  # {"kind": ...}: written into lowbit-made directories that have no manifest
RESULT_KEY = "lowbit_output"  # the kind of a JSON result file, a top-level key of the object
_STALE_SECONDS = 3600  # a temporary without a live owner's pid is left alone this long (another host may own it)


@dataclass(frozen=True)
class OutputKind:
    """A kind of user-named output and how to recognise one already on disk.

    Attributes:
        name: e.g. ``packed-checkpoint``, ``sweep``, ``eval-result``.
        is_dir: a directory (else one file).
        recognize: ``(existing path) -> bool``: it is this kind's output (so replacing or resuming it loses
            nothing the user did not ask lowbit to make). Directories default to the ``.lowbit-output`` marker.
    """

    name: str
    is_dir: bool
    recognize: Callable[[Path], bool] | None = None

    def matches(self, path: Path) -> bool:
        if self.recognize is not None and self.recognize(path):
            return True
        return self.is_dir and path.is_dir() and read_marker(path) == self.name


OUTPUT_KINDS: dict[str, OutputKind] = {}


def register_output_kind(kind: OutputKind) -> OutputKind:
    """Declare a kind of output (the module that writes it registers it at import)."""
    OUTPUT_KINDS[kind.name] = kind
    return kind


def read_marker(directory: Path) -> str | None:
    """The kind recorded in ``directory/.lowbit-output``, or None."""
    file = directory / OUTPUT_MARKER
    try:
        if file.is_file() and file.stat().st_size < 4096:
            data = json.loads(file.read_text())
            return data.get("kind") if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None
    return None


def write_marker(directory: str | os.PathLike[str], kind: str) -> None:
    """Mark ``directory`` as lowbit's output of ``kind`` (so a later run may resume or replace it)."""
    (Path(directory) / OUTPUT_MARKER).write_text(json.dumps({"kind": kind}) + "\n")


def _json_result_kind(path: Path) -> str | None:
    """The ``lowbit_output`` key of a JSON result file (at most 64 MB), or None."""
    try:
        if path.stat().st_size > 64 * 2**20:
            return None
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if isinstance(data, dict):
        if isinstance(data.get(RESULT_KEY), str):
            return data[RESULT_KEY]
        return "json-result" if {"task", "metrics"} <= set(data) else None  # an evaluation before the marker
    if isinstance(data, list) and data and all(isinstance(row, dict) for row in data):
        return "rows"  # a JSON array of result rows (benchmarks, sweeps): any lowbit result kind
    return None


def json_result_kind(name: str) -> OutputKind:
    """A JSON result file kind, recognised by its ``lowbit_output`` key (or as an array of result rows)."""
    return OutputKind(name, is_dir=False, recognize=lambda p: _json_result_kind(p) in (name, "rows"))


register_output_kind(json_result_kind("json-result"))


def _final_name_problem(text: str) -> str | None:
    if text.strip() == "":
        return "is empty"
    if "\x00" in text:
        return "holds a NUL character"
    last = os.path.basename(os.path.normpath(text))
    if last in ("", ".", "..") or Path(text).resolve() == Path(Path(text).resolve().anchor):
        return "names the current, parent or root directory, not a new output"
    return None


def _nearest_existing(path: Path) -> Path:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output(target: str | os.PathLike[str], kind: str, *, overwrite: bool = False,
                 sources: Iterable[str | os.PathLike[str] | None] = (), flag: str = "--out") -> Path:
    """Refuse an output path that would destroy something (see the module docstring); returns it as a Path.

    ``sources`` are paths the output is made from (model directories, data folders): non-existing ones and
    names that are not paths (``lit-fashion``) are ignored; ``family:DIR`` names count as ``DIR``.

    Example:
        >>> check_output("mydocs", "packed-checkpoint")  # doctest: +SKIP
        LowbitError: --out 'mydocs' is a directory holding 3 entries that is not a lowbit packed-checkpoint; ...
    """
    text = os.fspath(target) if target is not None else ""
    problem = _final_name_problem(text)
    if problem:
        raise LowbitError(f"{flag} {text!r} {problem}; accepted: a new name, or an existing lowbit output")
    spec = OUTPUT_KINDS[kind]
    path = Path(text)
    resolved = path.resolve()
    candidates = {c for s in sources if s for c in (os.fspath(s), os.fspath(s).split(":", 1)[-1])}
    for source in sorted(candidates):
        if not Path(source).exists():
            continue
        src = Path(source).resolve()
        if _is_within(resolved, src) or _is_within(src, resolved):
            relation = "is" if resolved == src else "is inside" if _is_within(resolved, src) else "contains"
            raise LowbitError(f"{flag} {text!r} {relation} the source {str(source)!r}; writing there would destroy "
                              "what it is made from; accepted: a path outside the source")
    parent = _nearest_existing(resolved.parent)
    if not parent.is_dir():
        raise LowbitError(f"{flag} {text!r}: {str(parent)!r} is not a directory; accepted: a path under a "
                          "writable directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LowbitError(f"{flag} {text!r}: cannot write in {str(parent)!r} (permission denied or read-only); "
                          "accepted: a path under a writable directory")
    if not path.exists() and not path.is_symlink():
        return path
    mode = path.lstat().st_mode
    if stat.S_ISLNK(mode) or not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise LowbitError(f"{flag} {text!r} exists and is not a regular file or directory; accepted: a new name")
    if stat.S_ISDIR(mode) and not spec.is_dir:
        raise LowbitError(f"{flag} {text!r} is a directory; accepted: a file name")
    if stat.S_ISDIR(mode) and not any(path.iterdir()):
        return path
    if spec.matches(path) or overwrite:
        if not spec.is_dir and stat.S_ISDIR(mode):
            raise LowbitError(f"{flag} {text!r} is a directory; accepted: a file name")
        return path
    entries = sum(1 for _ in path.iterdir()) if stat.S_ISDIR(mode) else 0
    what = (f"a directory holding {entries} entr{'y' if entries == 1 else 'ies'}" if stat.S_ISDIR(mode)
            else "an existing file")
    raise LowbitError(f"{flag} {text!r} is {what} that is not a lowbit {kind} output; refusing to replace it; "
                      f"accepted: a new or empty path, or --overwrite (overwrite=True) to replace it")


def run_dir_kind(name: str, *legacy_files: str) -> OutputKind:
    """A run directory kind (resumed in place, never replaced): the marker, or a file only its runs write
    (directories made before the marker existed)."""
    return OutputKind(name, is_dir=True, recognize=lambda p: any((p / f).exists() for f in legacy_files))


def prepare_run_dir(out: str | os.PathLike[str], kind: str, *, overwrite: bool = False,
                    sources: Iterable[str | os.PathLike[str] | None] = (), flag: str = "--out") -> Path:
    """``check_output`` for a run directory, then create it and mark it as ``kind`` (so a re-run resumes)."""
    path = check_output(out, kind, overwrite=overwrite, sources=sources, flag=flag)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if read_marker(path) != kind:
            write_marker(path, kind)
    except OSError as err:
        raise LowbitError(f"{flag} {str(out)!r}: cannot create it ({err.strerror or err}); accepted: a path under "
                          "a writable directory") from None
    return path


def write_result_json(path: str | os.PathLike[str], obj: Any, kind: str = "json-result",
                      overwrite: bool = False, flag: str = "--json") -> None:
    """Write a result where the user asked (``--json``): guarded like every user-named output, and marked with
    ``"lowbit_output": kind`` when it is an object (so the next run may replace it)."""
    check_output(path, kind, overwrite=overwrite, flag=flag)
    write_json(path, {RESULT_KEY: kind, **obj} if isinstance(obj, dict) else obj)


# --- atomic writes -------------------------------------------------------------------------------------------------
def _temp_name(target: Path) -> str:
    return f".{target.name}.{os.getpid()}."


def _owner_alive(name: str, target: Path) -> bool | None:
    """Whether the process that made temporary ``name`` (``.NAME.PID.xxxx.tmp``) still runs (None: unknown)."""
    match = re.fullmatch(re.escape(f".{target.name}.") + r"(\d+)\..*\.tmp", name)
    if not match:
        return None
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def clean_stale_temporaries(target: str | os.PathLike[str]) -> list[Path]:
    """Remove ``.NAME.*.tmp`` left beside ``target`` by a killed run, and restore a ``.NAME.old`` left by a kill
    between the two renames of a replacement; returns what was removed."""
    target = Path(target)
    parent = target.parent
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    old = target.with_name(f".{target.name}.old")
    if old.exists() and not target.exists():
        os.replace(old, target)  # killed after moving the old output aside and before the new one arrived
    for entry in parent.glob(f".{glob_escape(target.name)}.*.tmp"):
        alive = _owner_alive(entry.name, target)
        age = time.time() - entry.lstat().st_mtime
        if alive is False or (alive is None and age > _STALE_SECONDS):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success rename it onto ``target``.

    A crash inside the block leaves ``target`` untouched (and no half-written file under its name); what a
    killed run leaves (``.NAME.PID.*.tmp``) is removed by the next write to the same place. The output gets the
    user's ordinary permissions (0777 / 0666 masked by the umask). This does not judge whether ``target`` may
    be replaced: writers of user-named outputs call ``check_output`` first.

    Example:
        >>> with atomic_path("out.json") as tmp:  # doctest: +SKIP
        ...     tmp.write_text("{}")
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(target)
        if is_dir:
            tmp = Path(tempfile.mkdtemp(prefix=_temp_name(target), suffix=".tmp", dir=target.parent))
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        else:
            fd, name = tempfile.mkstemp(prefix=_temp_name(target), suffix=".tmp", dir=target.parent)
            os.close(fd)
            tmp = Path(name)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
    except OSError as err:
        raise LowbitError(f"cannot write {str(target)!r}: {err.strerror or err}; accepted: a path under a writable "
                          "directory") from None
    try:
        yield tmp
        _ordinary_permissions(tmp)
        if is_dir and target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)  # the old output comes back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException as exc:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, LowbitError):
            raise LowbitError(f"cannot write {str(target)!r}: {exc.strerror or exc}; "
                              f"{'the existing output is unchanged' if target.exists() else 'nothing was written'}"
                              ) from exc
        raise


def _ordinary_permissions(root: Path) -> None:
    """0666 / 0777 (executables, directories) masked by the umask for everything under ``root``: writers such as
    safetensors create their files 0600, which would hide a shared checkpoint from its group."""
    mask = _umask()
    for path in [root, *(root.rglob("*") if root.is_dir() else ())]:
        if path.is_symlink():
            continue
        full = 0o777 if path.is_dir() or path.stat().st_mode & 0o100 else 0o666
        os.chmod(path, full & ~mask)


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
# mmap_safetensors' maps: (first address, length, weak reference to the map), for release_pages.
_MAPS: list[tuple[int, int, Any]] = []


def release_pages(t: Any) -> int:
    """Drop this process's resident pages of ``t`` where it is a view of an ``mmap_safetensors`` map and was
    never written (``_version`` 0: the pages are still the file's); returns the bytes released.

    For data read once and kept in another form (the kernels repack packed weights into their own tiles at
    load time): the pages stay in the page cache, and a later read maps them again (a minor fault), so
    nothing changes but the resident set. Pages shared with a neighbouring tensor are kept.
    """
    import mmap

    if t.is_inference() or t._version != 0 or t.numel() == 0:  # an inference tensor has no version to tell
        return 0
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    for base, length, ref in _MAPS:
        mapped = ref()
        if mapped is None or not base <= start < end <= base + length:
            continue
        page = mmap.PAGESIZE
        first, last = -(-(start - base) // page) * page, (end - base) // page * page
        if last <= first:
            return 0
        mapped.madvise(mmap.MADV_DONTNEED, first, last - first)
        return last - first
    return 0


def safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``__metadata__`` of a safetensors file, or None when ``path`` is not one (read: the header only)."""
    import struct

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > min(_MAX_HEADER, size - 8):
                return None
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, struct.error, RecursionError):
        return None
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else None


register_output_kind(OutputKind("lowbit-safetensors", is_dir=False,
                                recognize=lambda p: "lowbit" in (safetensors_metadata(p) or {})))


def map_safetensors(path: Path, access: int) -> tuple[Any, int, int, Any]:
    """The checked header (parsed JSON), data start, file size and a memory map (``mmap`` ``access``; None for a
    file without data) of a safetensors file, readahead off (``MADV_RANDOM``: only the pages touched are read).
    Shared by ``mmap_safetensors`` and the torch-free runtime (``lowbit.runtime.checkpoint``)."""
    import mmap
    import struct

    from lowbit.errors import LowbitError

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
        mapped = mmap.mmap(f.fileno(), 0, access=access) if size > data_start else None
    if mapped is not None and hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)
    return header, data_start, size, mapped


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

    import torch

    path = Path(path)
    what = f"{str(path)!r} is not a complete safetensors file"
    header, data_start, size, mapped = map_safetensors(path, mmap.ACCESS_COPY)
    out: dict[str, Any] = {}
    if mapped is not None:
        import weakref

        _MAPS[:] = [m for m in _MAPS if m[2]() is not None]
        _MAPS.append((torch.frombuffer(mapped, dtype=torch.uint8, count=1).data_ptr(), size, weakref.ref(mapped)))
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
