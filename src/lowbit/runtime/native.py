"""The torch-free native library: the kernels' core (``kernels/cpu/engine.h``) behind a C ABI (``capi.cpp``).

Built once per machine and per version of the sources with the system C++ compiler (``$CXX`` or ``g++``), the
same flags as the torch extension (``COMPILE_FLAGS``; without OpenMP and AVX-512, ``FALLBACK_FLAGS``, if that
fails), into ``$LOWBIT_HOME/native/<key>/liblowbit_lite.so`` (``build_dir``): the key is the digest of the
source directory's path and of every ``.cpp``/``.h`` in it (``source_digest``, which the torch extension's build
directory uses too). Concurrent builders wait on an flock; the library appears by an atomic rename, so a killed
build never leaves a half-written one. No compiler: one ``LowbitError`` line saying so.

The source list and flags live here (torch-free) and ``lowbit.kernels.fast`` imports them: one list, one digest.

Example:
    >>> lib = library()  # doctest: +SKIP
    >>> lib.lowbit_get_isa()  # doctest: +SKIP
    b'avx512vnni'
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.paths import lowbit_home

SOURCE_DIR = Path(__file__).resolve().parents[1] / "kernels" / "cpu"
# The torch-free core and the kernels: the torch extension adds binding.cpp, the native library capi.cpp.
CORE_SOURCES = ("engine.cpp", "work_pool.cpp", "repack.cpp", "kernels_scalar.cpp", "kernels_avx2.cpp",
                "kernels_avx512vnni.cpp")
LIB_SOURCES = (*CORE_SOURCES, "capi.cpp")
# -fopenmp: the parallel loops run on an OpenMP team (cpu/work_pool.h); the fallback uses the own pool.
COMPILE_FLAGS = ("-O3", "-DNDEBUG", "-fopenmp")
FALLBACK_FLAGS = ("-O3", "-DNDEBUG", "-DLOWBIT_NO_AVX512", "-DLOWBIT_OMP_POOL=0")
LIB_NAME = "liblowbit_lite.so"
COMPILER_ENV = "CXX"
ISA_ENV = "LOWBIT_KERNEL_ISA"  # forces an instruction set (scalar / avx2 / avx512vnni), here and in kernels.fast

TILE_ROWS = 8  # output rows per tile (lowbit_kernels.h: kTileRows)
BLOCK = 32  # inputs per K-block (kBlock)
MAX_ACT_BLOCKS = 4  # activation quantization blocks span at most this many K-blocks (128 inputs)

_lock = threading.Lock()
_lib: list[ctypes.CDLL] = []


def container_bits(bits: int) -> int:
    """Bits per code in the kernel tiles: 3, 5 and 6-bit codes straddle bytes, so they run in 4, 8 and 8 bits."""
    return {3: 4, 5: 8, 6: 8}.get(bits, bits)


def default_act_blocks(group_blocks: int, per_channel: bool) -> int:
    """K-blocks per activation quantization block by default: MAX_ACT_BLOCKS for per-channel weights, else the
    largest d <= it dividing ``group_blocks`` (an activation block never straddles a weight group); see
    ``lowbit.kernels.fast.act_blocks_for`` for the other settings."""
    if per_channel:
        return MAX_ACT_BLOCKS
    return max(d for d in range(1, MAX_ACT_BLOCKS + 1) if group_blocks % d == 0)


def source_digest(source_dir: Path = SOURCE_DIR) -> str:
    """Digest of the source directory's path and of every ``.cpp``/``.h`` in it (name and bytes): a build made
    from other sources (or another checkout, whose rebuilds would otherwise alternate) gets another key."""
    digest = hashlib.sha1(str(source_dir.resolve()).encode() + b"\0")
    for name in sorted(p.name for p in source_dir.iterdir() if p.suffix in (".cpp", ".h")):
        digest.update(name.encode() + b"\0" + (source_dir / name).read_bytes())
    return digest.hexdigest()[:12]


def build_dir(source_dir: Path = SOURCE_DIR) -> Path:
    """Where the library of these sources is cached: ``$LOWBIT_HOME/native/lowbit_lite_<digest>``."""
    return lowbit_home() / "native" / f"lowbit_lite_{source_digest(source_dir)}"


def _compiler() -> str:
    name = os.environ.get(COMPILER_ENV) or "g++"
    found = shutil.which(name)
    if found is None:
        raise LowbitError(f"the lowbit native library needs a C++ compiler: {name!r} was not found (install g++ or "
                          f"set {COMPILER_ENV})")
    return found


def _build(flags: tuple[str, ...], out_dir: Path, source_dir: Path, tmp: Path) -> str | None:
    """Compile every source to an object (in parallel, one per core), then link ``tmp``; None or the first error."""
    from concurrent.futures import ThreadPoolExecutor

    cxx = _compiler()
    objects = [out_dir / f".{Path(s).stem}.{os.getpid()}.o" for s in LIB_SOURCES]
    cmds = [[cxx, "-std=c++17", "-fPIC", *flags, "-c", str(source_dir / s), "-o", str(o)]
            for s, o in zip(LIB_SOURCES, objects, strict=True)]
    cmds.append([cxx, "-shared", *flags, *map(str, objects), "-o", str(tmp)])
    try:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for proc in pool.map(lambda c: subprocess.run(c, capture_output=True, text=True), cmds[:-1]):
                if proc.returncode != 0:
                    return (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        proc = subprocess.run(cmds[-1], capture_output=True, text=True)
        return None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    finally:
        for o in objects:
            o.unlink(missing_ok=True)


def _compile(out_dir: Path, source_dir: Path) -> Path:
    """Compile into a temporary name, then rename into place; the OpenMP build first, else the plain one."""
    target = out_dir / LIB_NAME
    tmp = out_dir / f".{LIB_NAME}.{os.getpid()}.tmp"
    errors = []
    for flags in (COMPILE_FLAGS, FALLBACK_FLAGS):
        error = _build(flags, out_dir, source_dir, tmp)
        if error is None:
            os.replace(tmp, target)
            return target
        errors.append(error)
        tmp.unlink(missing_ok=True)
    raise LowbitError(f"building the lowbit native library failed: {errors[0]} (and without OpenMP/AVX-512: "
                      f"{errors[1]})")


def library_path(source_dir: Path = SOURCE_DIR) -> Path:
    """The built library of ``source_dir``, compiling it first if this key has none (under an flock)."""
    import fcntl

    out_dir = build_dir(source_dir)
    target = out_dir / LIB_NAME
    if target.is_file():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "build.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # released by the kernel if this process dies
        if not target.is_file():
            _compile(out_dir, source_dir)
    return target


_P, _I, _I64, _D = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_double
_SIGNATURES: dict[str, tuple[type | None, tuple[type, ...]]] = {
    "lowbit_last_error": (ctypes.c_char_p, ()),
    "lowbit_available_isas": (ctypes.c_char_p, ()),
    "lowbit_get_isa": (ctypes.c_char_p, ()),
    "lowbit_set_isa": (_I, (ctypes.c_char_p,)),
    "lowbit_get_threads": (_I, ()),
    "lowbit_set_threads": (_I, (_I,)),
    "lowbit_repack": (_I, (_P, _I64, _I, _I64, _I64, _I, _P)),
    "lowbit_weight_new": (_P, (_P, _I64, _P, _I64, _I64, _P, _P, _D, _I, _I, _I64, _I64, _I64, _I64, _P)),
    "lowbit_weight_free": (None, (_P,)),
    "lowbit_weight_compute": (_I, (_P, _P, _I64, _P)),
    "lowbit_decoder_new": (_P, (_I64, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _D, _P, _P)),
    "lowbit_decoder_free": (None, (_P,)),
    "lowbit_decoder_step": (_I, (_P, _P, _I64, _P, _P, _P, _I64, _P, _P, _P, _I64)),
    "lowbit_decoder_prefill": (_I, (_P, _P, _I64, _P, _P, _P, _I64, _P, _P)),
}


def library() -> ctypes.CDLL:
    """The native library (built on first use), its functions typed."""
    if _lib:
        return _lib[0]
    with _lock:
        if not _lib:
            lib = ctypes.CDLL(str(library_path()))
            for name, (restype, argtypes) in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = restype, list(argtypes)
            wanted = os.environ.get(ISA_ENV)
            if wanted and lib.lowbit_set_isa(wanted.encode()) != 0:
                warnings.warn(f"lowbit: {ISA_ENV}={wanted!r} is not available here; using "
                              f"{lib.lowbit_get_isa().decode()!r}", RuntimeWarning, stacklevel=2)
            _lib.append(lib)
    return _lib[0]


def check(status: int | None) -> None:
    """Raise the library's error line when a call returned -1 (or a null handle)."""
    if status is None or status == -1:
        raise LowbitError(library().lowbit_last_error().decode())


def available_isas() -> list[str]:
    """Instruction sets the kernels can use on this CPU, best last."""
    return library().lowbit_available_isas().decode().split(",")


def current_isa() -> str:
    """The instruction set in use."""
    return library().lowbit_get_isa().decode()


def set_isa(name: str) -> None:
    """Force an instruction set (``scalar``, ``avx2``, ``avx512vnni``) for every later call."""
    check(library().lowbit_set_isa(name.encode()))


def get_threads() -> int:
    """The thread team size of the native calls."""
    return int(library().lowbit_get_threads())


def set_threads(n: int) -> None:
    """Threads for every later native call (the OpenMP team size)."""
    check(library().lowbit_set_threads(int(n)))
