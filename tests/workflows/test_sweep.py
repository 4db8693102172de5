"""The accuracy-vs-bytes sweep on the real default model (small slice of the test set)."""

from __future__ import annotations

import json

import pytest

from lowbit.quant.defaults import DEFAULT_CALIB_SAMPLES


@pytest.mark.slow
def test_sweep_writes_report_and_orders_bytes(tmp_path):
    from lowbit.workflows.sweep import sweep

    out = tmp_path / "sweep"
    recipes = ["w8", "vision=w4g64,text=w4g64,text@embedding=w4g32a,projector=w8,floats=fp16"]
    rows = sweep("lit-fashion", recipes, ["rtn"], "fashion-mnist", out, limit=300, progress=False)
    assert [r["label"] for r in rows] == ["fp32", "fp16", "w8+rtn", f"{recipes[1]}+rtn"]
    for suffix in ("json", "md", "png"):
        assert (out / f"sweep.{suffix}").stat().st_size > 0
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    float_row, fp16, w8, w4 = rows
    # fp16 (the cheapest compression) is its own row: half the fp32 bytes, the same accuracy
    assert fp16["footprint"]["file_bytes"] == pytest.approx(float_row["footprint"]["file_bytes"] / 2, rel=0.01)
    assert abs(fp16["metrics"]["top1"] - float_row["metrics"]["top1"]) <= 0.005
    assert "x fp32" in (out / "sweep.md").read_text()
    # 8-bit keeps accuracy; fidelity is measured against the float reference.
    assert w8["metrics"]["top1"] >= float_row["metrics"]["top1"] - 0.02
    assert w8["fidelity"]["agreement"] >= 0.95 and w8["fidelity"]["image_cosine"] >= 0.99
    # Bytes on disk shrink with bits; the whole file (manifest included) is what rows compare.
    assert w4["footprint"]["disk_bytes"] < w8["footprint"]["disk_bytes"] < float_row["footprint"]["weight_bytes"]
    assert w8["footprint"]["file_bytes"] > w8["footprint"]["disk_bytes"]
    assert w4["quantized"]["bits_per_weight"] < 4.6
    # per-tower bits and what stayed float, CPU seconds and the machine load beside the wall time
    assert set(w4["towers"]) >= {"vision", "text", "projector"}
    assert w4["towers"]["text"]["float_params"] > 0  # the norms stay float (stored as fp16)
    assert w8["cpu_seconds_quantize"] > 0 and w8["load_avg_1min"] >= 0 and w8["calib_samples"] == DEFAULT_CALIB_SAMPLES
    # A rerun resumes from the finished rows instead of recomputing them.
    saved = json.loads((out / "rows" / "w8+rtn.json").read_text())
    again = sweep("lit-fashion", recipes, ["rtn"], "fashion-mnist", out, limit=300, progress=False)
    assert again[2] == saved
