"""Benchmark lowbit's packed low-bit CPU kernels against torch / ONNX Runtime baselines.

    .venv/bin/python benchmarks/bench_kernels.py            # full run -> benchmarks/results/kernels.{json,md}
    .venv/bin/python benchmarks/bench_kernels.py --quick    # smoke test: one small shape, few repeats

Every number is a median over interleaved rounds of the same run (see lowbit.kernels.bench).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

from lowbit.kernels import fast
from lowbit.kernels.bench import BASELINES, DEFAULT_MS, DEFAULT_SHAPES, FORMATS, markdown_table, run_kernel_bench

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one small shape, M in {1, 16}, 5 repeats")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--isas", default="", help="comma list (default: every SIMD ISA available, best first)")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--json", type=Path, default=RESULTS / "kernels.json")
    args = p.parse_args()

    shapes, ms, repeats, budget = DEFAULT_SHAPES, DEFAULT_MS, args.repeats, 25.0
    if args.quick:
        shapes, ms, repeats, budget = ((768, 768),), (1, 16), 5, 5.0
        if args.json == RESULTS / "kernels.json":
            args.json = RESULTS / "kernels_quick.json"
    isas = [s for s in args.isas.split(",") if s] or [i for i in reversed(fast.available_isas()) if i != "scalar"]
    rows = run_kernel_bench(shapes, ms, args.formats.split(","), repeats, args.json, threads=args.threads,
                            isas=isas, budget_s=budget)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    md = [
        "# lowbit kernel benchmark",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, threads={args.threads}, "
        f"read bandwidth {rows[0]['bw_gbs'] if rows else '?'} GB/s, load average after run {load[0]:.1f}.",
        "Median ms per call (interleaved rounds, same run); columns `format@isa` are lowbit.",
        "",
        markdown_table(rows, BASELINES),
        "",
    ]
    args.json.with_suffix(".md").write_text("\n".join(md))
    print(f"wrote {args.json} and {args.json.with_suffix('.md')}")


if __name__ == "__main__":
    main()
