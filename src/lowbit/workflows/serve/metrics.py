"""Prometheus text-format metrics without a dependency: counters, gauges and fixed-bucket histograms.

Updated from the event loop and from worker threads, so every update takes one lock (cheap next to a forward).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

Labels = tuple[tuple[str, str], ...]


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in labels)
    return "{" + inner + "}"


class Metrics:
    """The server's metrics; ``render()`` is the body of ``GET /metrics``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[Labels, float]] = {}
        self._histograms: dict[str, tuple[Sequence[float], dict[Labels, list[float]]]] = {}
        self._gauges: dict[str, Callable[[], dict[Labels, float]]] = {}
        self._help: dict[str, str] = {}
        self._tokens: deque[tuple[float, int]] = deque()  # (time, tokens) of the last window, for tokens/s

    def describe(self, name: str, text: str) -> None:
        self._help[name] = text

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._counters.setdefault(name, {})
            series[key] = series.get(key, 0.0) + value

    def observe(self, name: str, value: float, buckets: Sequence[float] = LATENCY_BUCKETS, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            bounds, series = self._histograms.setdefault(name, (tuple(buckets), {}))
            row = series.setdefault(key, [0.0] * (len(bounds) + 2))  # bucket counts..., count, sum
            for i, bound in enumerate(bounds):
                if value <= bound:
                    row[i] += 1
            row[-2] += 1
            row[-1] += value

    def gauge(self, name: str, read: Callable[[], dict[Labels, float]]) -> None:
        """A gauge read at scrape time (queue depths, in-flight counts)."""
        self._gauges[name] = read

    def tokens(self, n: int, window: float = 10.0) -> None:
        """Count ``n`` generated tokens (``lowbit_generated_tokens_total`` and the recent tokens/s gauge)."""
        now = time.monotonic()
        self.inc("lowbit_generated_tokens_total", n)
        with self._lock:
            self._tokens.append((now, n))
            while self._tokens and self._tokens[0][0] < now - window:
                self._tokens.popleft()

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        with self._lock:
            return sum(n for t, n in self._tokens if t >= now - window) / window

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            counters = {k: dict(v) for k, v in self._counters.items()}
            histograms = {k: (b, {lk: list(r) for lk, r in s.items()}) for k, (b, s) in self._histograms.items()}
        for name, series in sorted(counters.items()):
            lines += [f"# HELP {name} {self._help.get(name, name)}", f"# TYPE {name} counter"]
            lines += [f"{name}{_labels(k)} {v:g}" for k, v in sorted(series.items())]
        for name, read in sorted(self._gauges.items()):
            lines += [f"# HELP {name} {self._help.get(name, name)}", f"# TYPE {name} gauge"]
            lines += [f"{name}{_labels(k)} {v:g}" for k, v in sorted(read().items())]
        for name, (bounds, series) in sorted(histograms.items()):
            lines += [f"# HELP {name} {self._help.get(name, name)}", f"# TYPE {name} histogram"]
            for key, row in sorted(series.items()):
                for bound, count in zip(bounds, row, strict=False):
                    lines.append(f"{name}_bucket{_labels((*key, ('le', f'{bound:g}')))} {count:g}")
                lines.append(f"{name}_bucket{_labels((*key, ('le', '+Inf')))} {row[-2]:g}")
                lines.append(f"{name}_count{_labels(key)} {row[-2]:g}")
                lines.append(f"{name}_sum{_labels(key)} {row[-1]:g}")
        return "\n".join(lines) + "\n"
