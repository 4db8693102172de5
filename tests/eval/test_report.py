"""Reports: JSON round-trips, Markdown holds the rows, the PNG is real, the Pareto front is right."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from lowbit.errors import LowbitError
from lowbit.eval.report import (
    format_table,
    markdown_table,
    pareto_front,
    plot_accuracy_vs_bytes,
    summary_row,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _result(model: str, top1: float, size: int, task: str = "fashion-mnist") -> dict:
    return {
        "model": model,
        "task": task,
        "metrics": {"top1": top1, "top5": 0.99, "n": 100},
        "footprint": {"weight_bytes": size, "disk_bytes": None, "image_ms_b1": 12.345, "image_ms_b32": 3.2,
                      "text_ms_b1": 1.5, "latency_scope": "encode only"},
        "fidelity": {"agreement": 0.9, "accuracy_kept": 0.95},
        "data": {"name": "fashion-mnist", "n": 100, "skipped": 0},
    }


RESULTS = [
    _result("clip-fp32", 0.75, 600 * 2**20),
    _result("clip-int8", 0.74, 150 * 2**20),
    _result("clip-int4", 0.60, 80 * 2**20),
    _result("clip-int4-bad", 0.50, 90 * 2**20),  # dominated by int4: off the front
]


def test_pareto_front() -> None:
    assert pareto_front([(10, 0.9), (5, 0.8), (7, 0.7), (20, 0.9)]) == [1, 0]
    pts = [(r["footprint"]["weight_bytes"], r["metrics"]["top1"]) for r in RESULTS]
    assert pareto_front(pts) == [2, 1, 0]
    assert pareto_front([]) == []


def test_write_report_directory(tmp_path) -> None:
    paths = write_report(RESULTS, tmp_path / "report")
    assert json.loads(paths["json"].read_text()) == RESULTS
    md = paths["markdown"].read_text()
    for r in RESULTS:
        assert f"| {r['model']} | fashion-mnist | 100 | {100 * r['metrics']['top1']:.1f} | 99.0 |" in md
    assert "Weights" in md and "600.00 MiB" in md and "12.35" in md and "Agreement %" in md
    assert "R@1" not in md  # classification only: empty retrieval columns are dropped
    png = paths["plot"].read_bytes()
    assert paths["plot"].name == "accuracy_vs_bytes.png" and png.startswith(PNG_MAGIC)
    with Image.open(paths["plot"]) as img:
        img.verify()
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporaries


def test_write_report_single_result_to_file(tmp_path) -> None:
    retrieval = {"model": "m", "task": "shapes", "metrics": {"i2t_r1": 0.5, "t2i_r1": 0.25, "n": 8},
                 "footprint": {"weight_bytes": 2048}}
    paths = write_report(retrieval, tmp_path / "run.json")
    assert json.loads((tmp_path / "run.json").read_text()) == retrieval
    assert "| m | shapes | 8 | 50.0 | 25.0 | 2.00 KiB |" in (tmp_path / "run.md").read_text()
    assert (tmp_path / "run.png").read_bytes().startswith(PNG_MAGIC) and paths["plot"] == tmp_path / "run.png"


def test_nothing_to_plot(tmp_path) -> None:
    bare = {"model": "m", "task": "t", "metrics": {"top1": 0.5}}
    with pytest.raises(LowbitError, match="nothing to plot"):
        plot_accuracy_vs_bytes([bare], tmp_path / "x.png")
    with pytest.warns(UserWarning, match="plot skipped"):
        paths = write_report([bare], tmp_path)
    assert "plot" not in paths and not (tmp_path / "accuracy_vs_bytes.png").exists()


def test_plot_flat_rows(tmp_path) -> None:
    rows = [{"label": "a", "bytes": 10, "accuracy": 0.5}, {"label": "b", "bytes": 1000, "accuracy": 0.9}]
    assert plot_accuracy_vs_bytes(rows, tmp_path / "flat.png").read_bytes().startswith(PNG_MAGIC)


def test_markdown_and_summary() -> None:
    assert summary_row(RESULTS[0])["weight_bytes"] == 600 * 2**20
    md = markdown_table({"model": "a|b", "task": "t", "metrics": {"top1": 0.5}})
    assert md.splitlines() == ["| Model | Task | Top-1 % |", "|---|---|---|", "| a\\|b | t | 50.0 |"]


def test_format_table_rich_and_plain(monkeypatch) -> None:
    single = format_table(RESULTS[0])
    assert "metrics.top1" in single and "0.75" in single and "600.00 MiB" in single
    many = format_table(RESULTS)
    assert all(r["model"] in many for r in RESULTS)
    monkeypatch.setitem(sys.modules, "rich.console", None)  # simulate rich not installed
    plain = format_table(RESULTS)
    assert plain.splitlines()[0].startswith("Model") and "clip-int4-bad" in plain


def test_import_is_cheap() -> None:
    code = "import sys, lowbit.eval; print('matplotlib' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    code = "import sys; from lowbit.eval import evaluate, write_report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
