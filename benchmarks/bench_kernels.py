"""Benchmark lowbit's packed low-bit CPU kernels against torch / ONNX Runtime baselines.

    .venv/bin/python benchmarks/bench_kernels.py            # full run -> benchmarks/results/kernels.{json,md}
    .venv/bin/python benchmarks/bench_kernels.py --quick    # smoke test: one small shape, few repeats
    .venv/bin/python benchmarks/bench_kernels.py --like-avx2-machine   # -> benchmarks/results/kernels-avx2.*

Every number is a median (and 10th percentile) over interleaved rounds of the same run (see
lowbit.workflows.bench_kernels); the markdown file also checks the targets of the "fast packed low-bit kernels" issue.

``--like-avx2-machine`` compares lowbit's AVX2 path with baselines that are AVX2 too where the libraries allow
it: the run restarts itself with MKL, oneDNN and ATen limited to AVX2 (``AVX2_ENV``), so torch fp32 runs as on
an AVX2-only CPU. fbgemm (torch dynamic int8) and ONNX Runtime's MLAS choose their instruction set from the
CPU alone and keep AVX-512 VNNI on a CPU that has it: there the dynamic-int8 columns are stronger than an
AVX2 machine's.
"""

from __future__ import annotations

import os

from avx2_env import AVX2_ENV, restart_like_avx2_machine_if_asked

restart_like_avx2_machine_if_asked()  # before torch is imported

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from lowbit.kernels import fast  # noqa: E402
from lowbit.workflows.bench_kernels import (  # noqa: E402
    BASELINES,
    DEFAULT_MS,
    DEFAULT_SHAPES,
    FORMATS,
    markdown_table,
    run_kernel_bench,
)

RESULTS = Path(__file__).resolve().parent / "results"


def _get(rows: Sequence[dict[str, Any]], fmt: str, isa: str, k: int, n: int, m: int) -> dict[str, Any] | None:
    for r in rows:
        if (r["format"], r["isa"], r["K"], r["N"], r["M"]) == (fmt, isa, k, n, m):
            return r
    return None


def target_checks(rows: Sequence[dict[str, Any]], stat: str = "ms") -> list[str]:
    """Markdown lines checking the issue's targets, per ISA, on medians (``ms``) or ``p10``."""
    pre = "ms_" if stat == "ms" else "p10_"
    out = ["| ISA | target | shape | measured | verdict |", "|---|---|---|---|---|"]

    def line(isa: str, target: str, shape: str, measured: str, ok: bool) -> None:
        out.append(f"| {isa} | {target} | {shape} | {measured} | {'met' if ok else 'NOT met'} |")

    for isa in dict.fromkeys(r["isa"] for r in rows):
        for k, n in ((4096, 4096), (4096, 11008)):
            for fmt in ("int4_g32", "int4_g128"):
                r = _get(rows, fmt, isa, k, n, 1)
                if r is None:
                    continue
                ort = r[pre + "ort_nbits4"]
                line(isa, f"M=1 {fmt} <= ORT MatMulNBits-4", f"({k},{n})", f"{r[stat]:.3f} vs {ort:.3f} ms",
                     r[stat] <= ort)
                line(isa, f"M=1 {fmt} <= 1.3 x floor", f"({k},{n})",
                     f"{r[stat]:.3f} vs 1.3 x {r['floor_ms']:.3f} ms", r[stat] <= 1.3 * r["floor_ms"])
            low = {}
            for fmt in ("int2_g64", "ternary", "binary"):
                r = _get(rows, fmt, isa, k, n, 1)
                if r is None:
                    continue
                low[fmt] = r[stat]
                ratio = r[pre + "ort_nbits4"] / r[stat]
                line(isa, f"M=1 {fmt} >= 1.6x faster than ORT 4-bit", f"({k},{n})", f"{ratio:.2f}x", ratio >= 1.6)
            if "binary" in low and len(low) > 1:
                others = min(v for f, v in low.items() if f != "binary")
                line(isa, "M=1 binary faster than int2/ternary", f"({k},{n})",
                     f"{low['binary']:.3f} vs {others:.3f} ms", low["binary"] < others)
        for k, n in ((4096, 4096), (768, 3072)):
            for fmt in ("int8", "int4_g128", "int4_g32", "int8_rowact", "int4_g128_rowact"):
                r = _get(rows, fmt, isa, k, n, 197)
                if r is None:
                    continue
                best = min(r[pre + "torch_dyn_int8"], r[pre + "ort_dyn_int8"])
                line(isa, f"M=197 {fmt} <= best dynamic int8", f"({k},{n})", f"{r[stat]:.3f} vs {best:.3f} ms",
                     r[stat] <= best)
        slower = [r for r in rows if r["isa"] == isa and r[stat] > r[pre + "fp32"]]
        line(isa, "no format slower than torch fp32", "all", f"{len(slower)} slower of "
             f"{sum(r['isa'] == isa for r in rows)}", not slower)
    return out


def plot(rows: Sequence[dict[str, Any]], path: Path) -> bool:
    """Bar charts of median ms (log scale) per shape for M = 1 and the largest M; False without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import NullFormatter
    except ImportError:
        return False
    shapes = list(dict.fromkeys((r["K"], r["N"]) for r in rows))
    ms = sorted({r["M"] for r in rows})
    ms = [ms[0], ms[-1]] if len(ms) > 1 else ms
    fig = Figure(figsize=(4.2 * len(shapes), 3.6 * len(ms)))
    FigureCanvasAgg(fig)
    for i, m in enumerate(ms):
        for j, (k, n) in enumerate(shapes):
            ax = fig.add_subplot(len(ms), len(shapes), i * len(shapes) + j + 1)
            sel = [r for r in rows if (r["K"], r["N"], r["M"]) == (k, n, m)]
            if not sel:
                continue
            names = [b for b in BASELINES if f"ms_{b}" in sel[0]]
            vals = [sel[0][f"ms_{b}"] for b in names]
            names += [f"{r['format']}@{r['isa']}" for r in sel]
            vals += [r["ms"] for r in sel]
            colors = ["0.6"] * (len(names) - len(sel)) + ["C0" if "vnni" in r["isa"] else "C1" for r in sel]
            ax.barh(range(len(vals)), vals, color=colors)
            ax.set_yticks(range(len(vals)), names, fontsize=6)
            ax.set_xscale("log")
            ax.invert_yaxis()
            ax.set_title(f"K={k} N={n} M={m} (median ms)", fontsize=8)
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.tick_params(axis="x", labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one small shape, M in {1, 16}, 5 repeats")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--isas", default="", help="comma list (default: every SIMD ISA available, best first)")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--json", type=Path, default=RESULTS / "kernels.json")
    p.add_argument("--like-avx2-machine", action="store_true",
                   help="lowbit's AVX2 path against torch fp32 limited to AVX2 (see above)")
    args = p.parse_args()
    if args.like_avx2_machine:
        args.isas = args.isas or "avx2"
        if args.json == RESULTS / "kernels.json":
            args.json = RESULTS / "kernels-avx2.json"

    shapes, ms, repeats, budget = DEFAULT_SHAPES, DEFAULT_MS, args.repeats, 25.0
    if args.quick:
        shapes, ms, repeats, budget = ((768, 768),), (1, 16), 5, 5.0
        if args.json == RESULTS / "kernels.json":
            args.json = RESULTS / "kernels_quick.json"
    isas = [s for s in args.isas.split(",") if s] or [i for i in reversed(fast.available_isas()) if i != "scalar"]
    rows = run_kernel_bench(shapes, ms, args.formats.split(","), repeats, args.json, threads=args.threads,
                            isas=isas, budget_s=budget)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    first = rows[0] if rows else {}
    md = [
        "# lowbit kernel benchmark",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}, {first.get('cpu', platform.machine())}, threads={args.threads}, "
        f"read bandwidth {first.get('bw_gbs', '?')} GB/s (best of the run), load average during the run "
        f"{min((r['load_avg'] for r in rows), default=float('nan')):.1f}-"
        f"{max((r['load_avg'] for r in rows), default=float('nan')):.1f} (after: {load[0]:.1f}).",
        f"Columns `format@isa` are lowbit (ISAs this CPU runs: {', '.join(fast.available_isas())}; measured: "
        f"{', '.join(isas)}); the others are baselines measured in the same interleaved rounds.",
        *([f"Like an AVX2 machine: torch fp32 limited to AVX2 ({', '.join(f'{k}={v}' for k, v in AVX2_ENV.items())}); "
           "torch dynamic int8 (fbgemm) and ONNX Runtime (MLAS) still choose AVX-512 VNNI where the CPU has it."]
          if args.like_avx2_machine else []),
        "",
        "## Targets (medians)",
        "",
        *target_checks(rows, "ms"),
        "",
        "## Targets (10th percentiles: closer to an idle machine)",
        "",
        *target_checks(rows, "p10"),
        "",
        "## Median ms per call",
        "",
        markdown_table(rows, BASELINES, "ms"),
        "",
        "## 10th percentile ms per call",
        "",
        markdown_table(rows, BASELINES, "p10"),
        "",
    ]
    args.json.with_suffix(".md").write_text("\n".join(md))
    png = args.json.with_suffix(".png")
    print(f"wrote {args.json}, {args.json.with_suffix('.md')}" + (f", {png}" if plot(rows, png) else ""))


if __name__ == "__main__":
    main()
