"""The main job: the default model on Fashion-MNIST (zero-shot) and shapes (retrieval)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowbit.eval import evaluate
from lowbit.eval.report import write_report
from lowbit.workflows.load import load


def demo(limit: int | None = None, out_dir: str | None = None) -> list[dict[str, Any]]:
    """Evaluate ``lit-fashion``; with ``out_dir`` also write the JSON / Markdown / PNG report."""
    model = load("lit-fashion")
    results = [evaluate(model, "fashion-mnist", limit=limit),
               evaluate(model, "shapes", limit=limit, footprint=False)]
    if out_dir:
        write_report(results, Path(out_dir))
    return results
