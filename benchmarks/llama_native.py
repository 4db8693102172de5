"""Where the benchmarks' native llama.cpp build lives, keyed by this CPU's instruction-set flags.

``make setup`` builds llama-cpp-python for AVX2 only (every CPU the project runs on has it, and pip caches that
wheel). The decode benchmark compares against llama.cpp at its best on the machine, so ``make bench-setup``
builds it once more from source with ``GGML_NATIVE=ON`` (``-march=native``) into
``<venv>/llama-native/<key>/`` (``pip --target``, no wheel cache). The key names the CPU's instruction-set flags:
the machine changes between AVX2-only and AVX-512 CPUs, and a native build from another CPU would crash or
under-use this one, so a build is used only where its recorded flags equal this CPU's.

    python benchmarks/llama_native.py            # the directory for this CPU (make bench-setup builds there)
    python benchmarks/llama_native.py --stamp "CMAKE ARGS" DIR   # record a finished build (make bench-setup)
    python benchmarks/llama_native.py --check    # the usable native build, or exit 1 saying why not
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

# /proc/cpuinfo flags that change what -march=native may emit (instruction sets); the rest (virtualisation, power
# management, mitigations) may differ between hosts of one CPU model without changing the code.
ISA_FLAG = re.compile(r"(avx|sse|ssse|fma|f16c|bmi|amx|vaes|vpclmul|gfni|sha|adx|popcnt|movbe|abm|lzcnt|aes|pclmul|"
                      r"xop|tbm|fp16|asimd|sve|sme\d*$|i8mm|bf16|dotprod)")
STAMP = "lowbit-native-build.json"


def isa_flags() -> list[str]:
    """This CPU's instruction-set flags (sorted), from /proc/cpuinfo's ``flags`` (x86) or ``Features`` (Arm)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return sorted({f for f in value.split() if ISA_FLAG.match(f)})
    return []


def cpu_key(flags: list[str] | None = None) -> str:
    """``<machine>-<widest vector ISA>-<hash of the flags>``, e.g. ``x86_64-avx512-3f9c0a1b2d``."""
    flags = isa_flags() if flags is None else flags
    level = next((name for name, flag in (("avx512", "avx512f"), ("avx2", "avx2"), ("avx", "avx"), ("sve", "sve"),
                                            ("asimd", "asimd")) if flag in flags), "base")
    digest = hashlib.sha256(" ".join(flags).encode()).hexdigest()[:10]
    return f"{platform.machine()}-{level}-{digest}"


def native_dir(prefix: Path | None = None) -> Path:
    """The directory of this CPU's native build under ``prefix`` (default: this Python's venv)."""
    return Path(sys.prefix if prefix is None else prefix) / "llama-native" / cpu_key()


def usable_build(prefix: Path | None = None) -> tuple[Path | None, str]:
    """(the native build's directory, what it is) when one exists for exactly this CPU's flags, else (None, why)."""
    path = native_dir(prefix)
    stamp = path / STAMP
    if not (path / "llama_cpp" / "__init__.py").is_file() or not stamp.is_file():
        return None, f"no native llama.cpp build for this CPU ({cpu_key()}): run `make bench-setup`"
    record = json.loads(stamp.read_text())
    if record.get("isa_flags") != isa_flags():
        return None, f"the build in {path} was made on a CPU with other flags: run `make bench-setup`"
    return path, (f"llama-cpp-python {record.get('version')} built from source with {record.get('cmake_args')} "
                  f"on this CPU ({record.get('key')})")


def stamp(path: Path, cmake_args: str) -> dict[str, Any]:
    """Record which CPU and flags the build in ``path`` was made for (make bench-setup, after pip)."""
    version = next((p.name.removesuffix(".dist-info").split("-")[1] for p in path.glob("llama_cpp_python-*.dist-info")),
                   None)
    record = {"key": cpu_key(), "isa_flags": isa_flags(), "cmake_args": cmake_args, "version": version,
              "stamped": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (path / STAMP).write_text(json.dumps(record, indent=1) + "\n")
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stamp", nargs=2, metavar=("CMAKE_ARGS", "DIR"), help="record a finished build in DIR")
    ap.add_argument("--check", action="store_true", help="print the usable build, or exit 1 saying why not")
    args = ap.parse_args()
    if args.stamp:
        print(json.dumps(stamp(Path(args.stamp[1]), args.stamp[0])))
    elif args.check:
        path, what = usable_build()
        print(f"{path}: {what}" if path else what)
        sys.exit(0 if path else 1)
    else:
        print(native_dir())


if __name__ == "__main__":
    main()
