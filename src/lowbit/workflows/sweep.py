"""Accuracy against bytes: quantize one model with every recipe x method, evaluate each, report the front.

For every combination the model is quantized from a fresh float copy, saved as a packed checkpoint (so bytes
are measured on disk), loaded back through the packed-checkpoint family (so what is evaluated is what a user
would load), evaluated on the task, and compared with the float reference (top-1 agreement, embedding cosine,
accuracy kept). Results: ``sweep.json``, ``sweep.md`` and ``sweep.png`` (accuracy vs bytes, Pareto front).
A finished combination is kept in ``rows/``; a rerun of the same command resumes after the last one.

Example:
    >>> rows = sweep("lit-fashion", ["w8", "w4"], ["rtn", "gptq"], "fashion-mnist", "out/sweep")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from typing import Any

import torch

from lowbit.eval import evaluate
from lowbit.io import atomic_path, prepare_run_dir, register_output_kind, run_dir_kind, write_json
from lowbit.quant.defaults import DEFAULT_CALIB_SAMPLES
from lowbit.workflows.load import load
from lowbit.workflows.quantize import quantize, save

register_output_kind(run_dir_kind("sweep", "sweep.json", "rows"))

def _row(label: str, recipe: str, method: str, result: dict[str, Any], seconds_quantize: float | None,
         report: dict[str, Any] | None, timing: dict[str, float] | None = None) -> dict[str, Any]:
    all_totals = (report or {}).get("totals", {})
    totals = all_totals.get("total", {})
    return {
        "label": label,
        "checkpoint": result.get("model"),
        "recipe": recipe,
        "method": method,
        **{k: result[k] for k in ("task", "metrics", "footprint", "data", "env") if k in result},
        "model": label,  # what tables and the plot call this point
        "fidelity": result.get("fidelity"),
        "quantized": {k: totals.get(k) for k in ("quantized_params", "quantized_fp32_bytes", "packed_bytes",
                                                  "bits_per_weight", "float_bytes", "stored_bytes", "compression")
                      } if report else None,
        # bits per quantized weight and what stays float, per tower (the report's own totals)
        "towers": {t: {k: v.get(k) for k in ("bits_per_weight", "quantized_params", "float_params")}
                   for t, v in all_totals.items() if t != "total"} if report else None,
        "seconds_quantize": seconds_quantize,
        # CPU seconds of the process and the 1-minute load average at the start: on a shared machine the
        # wall time alone says little
        **(timing or {}),
    }


def _fp16_row(float_model: Any, task: str, limit: int | None, reference: dict[str, Any],
              progress: bool) -> dict[str, Any]:
    """The float model with its weights rounded to fp16 (computed in fp32, as a CPU user would run it): the
    cheapest compression, the bytes every low-bit row must beat."""
    from lowbit.eval.footprint import state_bytes

    model = copy.deepcopy(float_model).half().float()
    result = evaluate(model, task, limit=limit, reference=reference, progress=progress)
    result["footprint"] = {**result["footprint"], "file_bytes": state_bytes(float_model, torch.float16),
                           "file_bytes_scope": "fp16 state dict (every float tensor cast to fp16)"}
    return _row("fp16", "fp16", "float", result, None, None)


def sweep(
    model_name: str,
    recipes: list[str],
    methods: list[str],
    task: str,
    out_dir: str | os.PathLike[str],
    limit: int | None = None,
    calib_data: str | None = None,
    calib_samples: int = DEFAULT_CALIB_SAMPLES,
    keep_checkpoints: bool = False,
    progress: bool = True,
    pairs: list[tuple[str, str]] | None = None,
    resume: bool = True,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Evaluate the float model (fp32 and fp16) and every recipe x method; write JSON, Markdown and PNG into
    ``out_dir``.

    ``pairs`` (recipe, method) replaces the full recipes x methods grid with just those combinations;
    ``resume=False`` recomputes rows a previous run left in ``out_dir/rows``. ``out_dir`` must be new, empty or
    a sweep's (``overwrite`` writes into any other directory) and never the model's own directory.
    """
    import time

    from lowbit.eval.report import plot_accuracy_vs_bytes
    from lowbit.quant.recipe import load_recipe

    out = prepare_run_dir(out_dir, "sweep", overwrite=overwrite, sources=[model_name])
    (out / "rows").mkdir(parents=True, exist_ok=True)
    combos = list(pairs) if pairs is not None else [(r, m) for r in recipes for m in methods]
    parsed = {(r, m): load_recipe(r).with_method(m) for r, m in combos}  # validate everything up front
    float_model = load(model_name)
    reference = evaluate(float_model, task, limit=limit, progress=progress)
    rows = [_row("fp32", "fp32", "float", reference, None, None), _fp16_row(float_model, task, limit, reference,
                                                                             progress)]
    for (recipe, method), parsed_recipe in parsed.items():
        label = f"{recipe}+{method}"
        done = out / "rows" / f"{label}.json"
        if done.exists() and resume:
            rows.append(json.loads(done.read_text()))
            continue
        model = copy.deepcopy(float_model)
        load_avg = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), time.process_time()
        report = quantize(model, parsed_recipe, calib_data, calib_samples=calib_samples, progress=progress)
        seconds = round(time.perf_counter() - t0, 1)
        timing = {"cpu_seconds_quantize": round(time.process_time() - c0, 1), "load_avg_1min": round(load_avg, 2),
                  "calib_samples": calib_samples}
        ckpt = out / "checkpoints" / label
        save(model, ckpt, report=report)
        del model
        packed = load(str(ckpt))
        result = evaluate(packed, task, limit=limit, reference=reference, checkpoint_dir=ckpt,
                              progress=progress)
        row = _row(label, recipe, method, result, seconds, report.to_dict(), timing)
        write_json(done, row)
        rows.append(row)
        if not keep_checkpoints:
            shutil.rmtree(ckpt, ignore_errors=True)
    write_json(out / "sweep.json", rows)
    with atomic_path(out / "sweep.md") as tmp:
        tmp.write_text(sweep_markdown(rows))
    plot_accuracy_vs_bytes(rows, out / "sweep.png")
    return rows


def _cell(value: Any, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def sweep_markdown(rows: list[dict[str, Any]]) -> str:
    """One table: accuracy kept, fidelity, bits, whole-file bytes (and as a share of fp32), latency — per
    recipe x method, fp32 and fp16 first."""
    from lowbit.eval.report import whole_bytes

    fp32 = whole_bytes(rows[0].get("footprint") or {}) if rows else None
    head = ("| recipe | method | top-1 / R@1 | kept | agreement | image cos | bits/weight (quantized) | "
            "file MiB | x fp32 | image ms b1 | image ms b32 | quantize s |")
    lines = [f"# Sweep: {rows[0].get('task')} on {rows[0].get('data', {}).get('n')} samples", "", head,
             "|" + "---|" * 12]
    for r in rows:
        metrics, fid, fp, q = r.get("metrics", {}), r.get("fidelity") or {}, r.get("footprint") or {}, \
            r.get("quantized") or {}
        acc = metrics.get("top1", metrics.get("i2t_r1"))
        size = whole_bytes(fp)
        lines.append(" | ".join([
            f"| {r['recipe']}", r["method"], _cell(acc, ".4f"), _cell(fid.get("accuracy_kept"), ".3f"),
            _cell(fid.get("agreement"), ".4f"), _cell(fid.get("image_cosine"), ".4f"),
            _cell(q.get("bits_per_weight"), ".2f"), _cell(size and size / 2**20, ".2f"),
            _cell(size and fp32 and size / fp32, ".3f"), _cell(fp.get("image_ms_b1"), ".2f"),
            _cell(fp.get("image_ms_b32"), ".2f"), _cell(r.get("seconds_quantize"), ".1f"),
        ]) + " |")
    return "\n".join(lines) + "\n"
