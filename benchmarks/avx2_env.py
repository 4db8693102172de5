"""``--like-avx2-machine`` for the kernel benchmarks: restart the run with MKL, oneDNN and ATen limited to AVX2, so
torch's float baselines run as on an AVX2-only CPU (fbgemm and ONNX Runtime's MLAS still pick their instruction set
from the CPU). Torch-free: the limits are read when torch loads its libraries, so this runs before importing it."""

from __future__ import annotations

import os
import sys

AVX2_ENV = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
FLAG = "--like-avx2-machine"


def restart_like_avx2_machine_if_asked() -> None:
    """Re-exec this script with ``AVX2_ENV`` when ``--like-avx2-machine`` is on its command line and not yet set."""
    if FLAG in sys.argv and any(os.environ.get(k) != v for k, v in AVX2_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ENV})
