"""The kernel benchmark harness (lowbit.workflows.bench_kernels): rows carry what the issue asks, for every baseline."""

from __future__ import annotations

import json
from pathlib import Path

from lowbit.workflows.bench_kernels import BASELINES, run_kernel_bench
from tests.kernels.conftest import needs_kernels


def test_rows_have_every_baseline_and_a_checked_result(tmp_path: Path) -> None:
    needs_kernels()
    out = tmp_path / "k.json"
    rows = run_kernel_bench(shapes=[(96, 40)], ms=[1, 5], formats=["int4_g32", "ternary"], repeats=3, json_path=out,
                            threads=1, budget_s=1.0, log=None)
    assert json.loads(out.read_text()) == rows
    assert {(r["format"], r["M"]) for r in rows} == {(f, m) for f in ("int4_g32", "ternary") for m in (1, 5)}
    for r in rows:
        assert {"format", "K", "N", "M", "ms", "isa", "floor_ms", "packed_bytes"} <= set(r)
        assert all(r[f"ms_{b}"] > 0 and r[f"p10_{b}"] > 0 for b in BASELINES)
        assert r["ms"] > 0 and r["rounds"] >= 3
        assert r["rel_err"] < 1e-2  # the kernels against the float64 reference on the same weight
        assert r["packed_bytes"] < 96 * 40  # under a byte per weight
