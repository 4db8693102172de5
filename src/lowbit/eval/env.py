"""Where a measurement was taken: latency and memory numbers mean nothing without the machine behind them."""

from __future__ import annotations

import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux), else whatever ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment() -> dict[str, Any]:
    """JSON-ready description of this run's software and hardware.

    Example:
        >>> sorted(environment())  # doctest: +NORMALIZE_WHITESPACE
        ['cpu', 'lowbit', 'platform', 'python', 'threads', 'time', 'torch']
    """
    import torch

    from lowbit.version import __version__

    return {
        "torch": torch.__version__,
        "lowbit": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }
