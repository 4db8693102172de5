"""Measure accuracy kept, bytes saved and milliseconds saved, side by side.

``evaluate(model, "fashion-mnist")`` returns one JSON-ready dict; ``write_report`` turns a list of them into
JSON, Markdown and an accuracy-vs-bytes plot.

Names are loaded on first use (PEP 562), so ``import lowbit.eval`` pulls in neither torch nor matplotlib.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lowbit.eval.fidelity import compare_models, fidelity
    from lowbit.eval.footprint import measure_footprint
    from lowbit.eval.report import format_table, plot_accuracy_vs_bytes, write_report
    from lowbit.eval.results import Outputs, Result
    from lowbit.eval.retrieval import retrieve
    from lowbit.eval.tasks import TASKS, Task, evaluate
    from lowbit.eval.zeroshot import zeroshot_classify

_WHERE = {
    "evaluate": "tasks",
    "TASKS": "tasks",
    "Task": "tasks",
    "zeroshot_classify": "zeroshot",
    "retrieve": "retrieval",
    "measure_footprint": "footprint",
    "fidelity": "fidelity",
    "compare_models": "fidelity",
    "write_report": "report",
    "format_table": "report",
    "plot_accuracy_vs_bytes": "report",
    "Result": "results",
    "Outputs": "results",
}

__all__ = [
    "TASKS",
    "Outputs",
    "Result",
    "Task",
    "compare_models",
    "evaluate",
    "fidelity",
    "format_table",
    "measure_footprint",
    "plot_accuracy_vs_bytes",
    "retrieve",
    "write_report",
    "zeroshot_classify",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'lowbit.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lowbit.eval.{_WHERE[name]}"), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
