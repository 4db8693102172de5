"""One side of the M=197 A/B in README.md: median ms of the M=197 kernel cells, lowbit alone, 2 threads.

    PYTHONPATH=<checkout>/src python ab_m197.py   # one JSON line; alternate checkouts round by round
"""

from __future__ import annotations

import json
import time

import torch

from lowbit.kernels import fast
from lowbit.workflows.bench_kernels import FORMATS, make_format_weight

CELLS = ("int8", "int4_g128", "int4_g32", "int8_rowact", "int4_g128_rowact")


def median_ms(k: int, n: int, fmt: str, calls: int) -> float:
    spec = FORMATS[fmt]
    x = torch.randn(197, k)
    handle = fast.prepare(make_format_weight(k, n, spec), act_block=spec.act_block)
    for _ in range(3):
        fast.linear(x, handle)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fast.linear(x, handle)
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2] * 1e3


if __name__ == "__main__":
    torch.set_num_threads(2)
    print(json.dumps({f"{k}x{n} {f}": median_ms(k, n, f, 15 if k == 768 else 7)
                      for k, n in ((4096, 4096), (768, 3072)) for f in CELLS}))
