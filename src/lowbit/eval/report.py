"""Turn ``evaluate`` results into files people read: JSON, a Markdown table and an accuracy-vs-bytes plot.

matplotlib is imported only inside ``plot_accuracy_vs_bytes`` and drives the Agg canvas directly (no
pyplot, no global backend switch), so importing ``lowbit.eval`` stays cheap and works on headless machines.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError
from lowbit.eval.results import headline
from lowbit.io import atomic_path, write_json

# (header, key in summary_row, formatter kind). Columns that are empty for every row are dropped.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("Model", "model", "text"),
    ("Task", "task", "text"),
    ("N", "n", "int"),
    ("Top-1 %", "top1", "pct"),
    ("Top-5 %", "top5", "pct"),
    ("I→T R@1 %", "i2t_r1", "pct"),
    ("T→I R@1 %", "t2i_r1", "pct"),
    ("Weights in memory", "weight_bytes", "bytes"),
    ("File", "file_bytes", "bytes"),
    ("As fp16", "fp16_bytes", "bytes"),
    ("Image ms b1", "image_ms_b1", "ms"),
    ("Image ms b32", "image_ms_b32", "ms"),
    ("Text ms b1", "text_ms_b1", "ms"),
    ("Agreement %", "agreement", "pct"),
    ("Acc kept %", "accuracy_kept", "pct"),
)


def human_bytes(n: float) -> str:
    """``1536 -> '1.50 KiB'``: binary units, 3 significant-ish digits.

    Example:
        >>> human_bytes(3 * 2**20)
        '3.00 MiB'
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "—"
    if kind == "pct":
        return f"{100 * float(value):.1f}"
    if kind == "bytes":
        return human_bytes(float(value))
    if kind == "ms":
        return f"{float(value):.2f}"
    return str(value)


def summary_row(result: dict[str, Any]) -> dict[str, Any]:
    """The flat numbers one table row shows for an ``evaluate`` result (missing ones are None).

    Example:
        >>> summary_row({"model": "m", "task": "t", "metrics": {"top1": 0.5}})["top1"]
        0.5
    """
    metrics = result.get("metrics") or {}
    footprint = result.get("footprint") or {}
    fid = result.get("fidelity") or {}
    row: dict[str, Any] = {"model": result.get("model"), "task": result.get("task")}
    row["n"] = metrics.get("n", (result.get("data") or {}).get("n"))
    for key in ("top1", "top5", "i2t_r1", "t2i_r1"):
        row[key] = metrics.get(key)
    for key in ("weight_bytes", "file_bytes", "fp16_bytes", "image_ms_b1", "image_ms_b32", "text_ms_b1"):
        row[key] = footprint.get(key)
    row["agreement"] = fid.get("agreement")
    row["accuracy_kept"] = fid.get("accuracy_kept")
    return row


def _as_list(results: Sequence[dict[str, Any]] | dict[str, Any]) -> list[dict[str, Any]]:
    return [results] if isinstance(results, dict) else list(results)


def _table(results: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    rows = [summary_row(r) for r in results]
    used = [c for c in COLUMNS if c[2] == "text" or any(row[c[1]] is not None for row in rows)]
    return [c[0] for c in used], [[_fmt(row[key], kind) for _, key, kind in used] for row in rows]


def markdown_table(results: Sequence[dict[str, Any]] | dict[str, Any]) -> str:
    """One Markdown table row per result: model, task, accuracy, bytes, latency, fidelity.

    Example:
        >>> print(markdown_table({"model": "m", "task": "t", "metrics": {"top1": 0.5}}))
        | Model | Task | Top-1 % |
        |---|---|---|
        | m | t | 50.0 |
    """
    header, body = _table(_as_list(results))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
    return "\n".join(lines)


def _details(result: dict[str, Any]) -> list[tuple[str, str]]:
    """Key/value lines for one result, skipping bulky or textual fields."""
    pairs: list[tuple[str, str]] = [("model", str(result.get("model"))), ("task", str(result.get("task")))]
    for section in ("metrics", "footprint", "fidelity", "data"):
        for key, value in (result.get(section) or {}).items():
            if isinstance(value, dict) or key.endswith("_scope"):
                continue
            if isinstance(value, float):
                shown = human_bytes(value) if key.endswith("bytes") else f"{value:.4g}"
            elif isinstance(value, int) and key.endswith("bytes"):
                shown = f"{human_bytes(value)} ({value:,} B)"
            else:
                shown = str(value)
            pairs.append((f"{section}.{key}", shown))
    return pairs


def format_table(result: Sequence[dict[str, Any]] | dict[str, Any]) -> str:
    """A terminal table: key/value details for one result, a summary row per result for a list.

    Uses rich when installed, plain aligned text otherwise.

    Example:
        >>> print(format_table(evaluate(model, "fashion-mnist", limit=100)))  # doctest: +SKIP
    """
    if isinstance(result, dict):
        header, body = ["key", "value"], [list(p) for p in _details(result)]
    else:
        header, body = _table(result)
    try:
        import io

        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
                         for r in [header, *body])
    table = Table(*header)
    for row in body:
        table.add_row(*row)
    buf = io.StringIO()
    Console(file=buf, width=200, color_system=None, highlight=False, force_terminal=False).print(table)
    return buf.getvalue().rstrip("\n")


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of (bytes, accuracy) points no other point beats (fewer-or-equal bytes and higher accuracy),
    ordered by bytes.

    Example:
        >>> pareto_front([(10, 0.9), (5, 0.8), (7, 0.7), (20, 0.9)])
        [1, 0]
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def whole_bytes(footprint: dict[str, Any]) -> float | None:
    """The bytes a user ships: every file of the checkpoint, else the state dict, else weights in memory."""
    for key in ("file_bytes", "disk_bytes", "weight_bytes"):
        if footprint.get(key) is not None:
            return float(footprint[key])
    return None


def _point(row: dict[str, Any]) -> tuple[str, str, float, float] | None:
    """(label, group, whole-model bytes, accuracy) of an ``evaluate`` result / sweep row (grouped by method when
    the row names one, else by task) or of a flat row with ``label``, ``bytes``, ``accuracy``."""
    if "metrics" in row:
        head = headline(row.get("metrics") or {})
        size = whole_bytes(row.get("footprint") or {})
        if head is None or size is None:
            return None
        group = row["method"] if row.get("method") else f"{row.get('task')} ({head[0]})"
        return str(row.get("model")), str(group), size, head[1]
    if row.get("accuracy") is None or row.get("bytes") is None:
        return None
    return str(row.get("label")), str(row.get("task", "")), float(row["bytes"]), float(row["accuracy"])


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
# label offsets (points) tried in turn until a label overlaps neither another label nor a marker
_LABEL_OFFSETS = ((5, 5), (5, -11), (-5, 5), (-5, -11), (5, 15), (5, -21), (-5, 15), (-5, -21), (12, 0),
                  (-12, 0), (5, 25), (5, -31))


def _place_labels(ax: Any, fig: Any, labelled: list[tuple[str, float, float]]) -> None:
    """Annotate each point, moving a label to the first offset where its box overlaps no earlier label and no
    marker (greedy; points in order of x then y)."""
    renderer = fig.canvas.get_renderer()
    markers = [ax.transData.transform((x, y)) for _, x, y in labelled]
    placed: list[Any] = []
    for label, x, y in sorted(labelled, key=lambda p: (p[1], p[2])):
        for dx, dy in _LABEL_OFFSETS:
            text = ax.annotate(label, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=7,
                               ha="left" if dx >= 0 else "right")
            box = text.get_window_extent(renderer).expanded(1.05, 1.1)
            hits_marker = any(box.contains(mx, my) for mx, my in markers)
            if not hits_marker and not any(box.overlaps(other) for other in placed):
                placed.append(box)
                break
            text.remove()
        else:  # crowded: keep the first position rather than drop the label
            text = ax.annotate(label, (x, y), textcoords="offset points", xytext=_LABEL_OFFSETS[0], fontsize=7)
            placed.append(text.get_window_extent(renderer))


def plot_accuracy_vs_bytes(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Scatter of accuracy against weight bytes, one colour per task, Pareto front drawn, points labelled.

    ``rows`` are ``evaluate`` results (top-1, else mean R@1, against ``footprint.weight_bytes``) or flat
    dicts with ``label``, ``bytes``, ``accuracy`` and optionally ``task``. Writes a PNG atomically.

    Example:
        >>> plot_accuracy_vs_bytes([fp32_result, int4_result], "out/pareto.png")  # doctest: +SKIP
    """
    points = [p for p in map(_point, rows) if p is not None]
    if not points:
        raise LowbitError(
            f"nothing to plot; received {len(rows)} rows without accuracy and weight bytes; "
            "accepted: evaluate() results with footprint, or rows with 'bytes' and 'accuracy'"
        )
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError as exc:
        raise LowbitError(
            "plotting needs matplotlib; received an environment without it; "
            "accepted: pip install 'lowbit[report]'"
        ) from exc

    # Plot in one readable binary unit (ticks at 100, 200 MiB rather than 1.04e8 bytes).
    biggest, unit, scale = max(p[2] for p in points), "B", 1.0
    for name, factor in (("KiB", 1024.0), ("MiB", 1024.0**2), ("GiB", 1024.0**3)):
        if biggest >= factor:
            unit, scale = name, factor
    points = [(label, group, size / scale, acc) for label, group, size, acc in points]
    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    groups = list(dict.fromkeys(p[1] for p in points))
    for i, group in enumerate(groups):
        pts = [p for p in points if p[1] == group]
        ax.scatter([p[2] for p in pts], [p[3] for p in pts], color=f"C{i}", marker=_MARKERS[i % len(_MARKERS)],
                   s=36, label=group or None, zorder=3)
    front = [points[i] for i in pareto_front([(p[2], p[3]) for p in points])]
    ax.step([p[2] for p in front], [p[3] for p in front], where="post", color="0.4", alpha=0.7, linestyle="--",
            zorder=2, label="Pareto front")
    sizes = [p[2] for p in points]
    if min(sizes) > 0 and max(sizes) / min(sizes) > 20:
        ax.set_xscale("log")  # fp32 vs 2-bit spans 16x+; a linear axis would crush the small models together
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))  # 20, 50, 100, 200 MiB, ...
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())  # 2..9 x 10^k labels would overlap
    ax.margins(x=0.15)  # room for the labels of the outermost points
    ax.set_ylim(0, 1.05)  # a fixed 0-1 scale keeps plots of different runs comparable by eye
    ax.set_xlabel(f"whole model file ({unit}; every checkpoint file)   \u2190 smaller is better")
    ax.set_ylabel("accuracy (top-1, or mean R@1)   higher is better \u2192")
    ax.set_title("accuracy vs whole-model bytes (dashed: Pareto front)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    _place_labels(ax, fig, [(label, x, y) for label, _, x, y in points])
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def write_report(
    results: Sequence[dict[str, Any]] | dict[str, Any],
    out_dir_or_path: str | os.PathLike[str],
    plot: bool = True,
) -> dict[str, Path]:
    """Write JSON, Markdown and (if anything is plottable) a PNG; returns ``{"json", "markdown", "plot"}``.

    A path with a suffix (``out/run.json``) names the JSON; the others take its stem (``out/run.md``,
    ``out/run.png``). A path without one is a directory receiving ``results.json``, ``results.md`` and
    ``accuracy_vs_bytes.png``. All writes are atomic. The PNG is skipped (with a warning) when matplotlib
    is missing or no result has both accuracy and weight bytes.

    Example:
        >>> write_report([evaluate(m, "fashion-mnist") for m in models], "out/")  # doctest: +SKIP
    """
    rows = _as_list(results)
    out = Path(out_dir_or_path)
    if out.suffix and not out.is_dir():
        json_path, md_path, png_path = (out.with_suffix(s) for s in (".json", ".md", ".png"))
    else:
        json_path, md_path, png_path = out / "results.json", out / "results.md", out / "accuracy_vs_bytes.png"
    paths = {"json": json_path, "markdown": md_path, "plot": png_path}
    write_json(paths["json"], results if isinstance(results, dict) else rows)
    with atomic_path(paths["markdown"]) as tmp:
        tmp.write_text("# lowbit evaluation\n\n" + markdown_table(rows) + "\n")
    written = {"json": paths["json"], "markdown": paths["markdown"]}
    if plot:
        try:
            written["plot"] = plot_accuracy_vs_bytes(rows, paths["plot"])
        except LowbitError as exc:
            warnings.warn(f"accuracy-vs-bytes plot skipped: {exc}", stacklevel=2)
    return written
