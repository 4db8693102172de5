"""Post-training weight quantization of BOTH towers of the default model: fp32 vs w8/w4/w3/w2 x RTN/GPTQ/AWQ.

Runs ``lowbit.sweep`` (presets ``lowbit/configs/recipes/wN.yaml``; ``Recipe.with_method`` gives each method
the preset's N-bit rules, its 8-bit rules for the stem / depthwise convs / projector stay as written):
every combination is quantized from the float ``lit-fashion`` model, saved as a packed checkpoint, loaded
back and evaluated zero-shot on the seeded ``--limit`` subset of the Fashion-MNIST TEST split. The sweep's
table, JSON and plot go to ``benchmarks/results/sweep-lit-fashion``. Then the headline rows (``--full``) are
evaluated again from their packed checkpoints on all 10,000 test images, against the float model on the
same 10,000. Calibration: the first ``--calib-samples`` images of a seeded permutation of the TRAIN split,
and the training caption templates x class names for the text tower; nothing from the test split. The
presets were chosen once on held-out TRAIN images; the test split only measures them.

Per row of ``benchmarks/results/ptq.json``: top-1, drop vs fp32 in points on the same n images (with a
guide to its noise: the standard error of a paired difference, from the share of images whose prediction
changed), bits per weight as stated by the quantization report (over the quantized layers, and per tower
with the parameters kept float), quantize seconds (wall, process CPU, and the 1-minute load average: the
2-core machine is shared), and whether the issue's target is met.

    LOWBIT_HOME=.ci-cache .venv/bin/python benchmarks/bench_ptq.py        # writes benchmarks/results/ptq.json
    LOWBIT_HOME=.ci-cache .venv/bin/python benchmarks/bench_ptq.py --recipes w4 --methods gptq --limit 200 \\
        --full "" --sweep-dir /tmp/ptq-sweep --out /tmp/ptq.json           # quick
    # the same rows in parallel processes (one per recipe), then one run that resumes them and writes JSON:
    for r in w8 w4 w3 w2; do .venv/bin/python benchmarks/bench_ptq.py --recipes $r --sweep-only & done; wait
    for x in float w8+rtn w4+gptq w3+gptq; do
        .venv/bin/python benchmarks/bench_ptq.py --full-eval-only --only $x & done; wait
    .venv/bin/python benchmarks/bench_ptq.py
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

import lowbit
from lowbit.eval.env import environment
from lowbit.io import write_json

RESULTS = Path(__file__).resolve().parent / "results"
# Issue 3, item 7: the largest top-1 drop (points) vs full precision, and the methods it is claimed for.
TARGETS: dict[str, dict[str, Any]] = {
    "w8": {"max_drop_pt": 0.3, "methods": ["rtn", "gptq", "awq"], "rule": "any method"},
    "w4": {"max_drop_pt": 1.0, "methods": ["gptq", "awq"], "rule": "GPTQ or AWQ"},
    "w3": {"max_drop_pt": 3.0, "methods": ["gptq"], "rule": "GPTQ"},
}
GPTQ_SECONDS_TARGET = 120.0  # "GPTQ of the whole default model finishes in under 2 minutes on 2 cores"


def _paired_se_pt(agreement: float | None, n: int) -> float | None:
    """Rough standard error (points) of a paired accuracy difference: only changed predictions move it."""
    return None if agreement is None else round(100 * math.sqrt(max(1.0 - agreement, 1.0 / n) / n), 2)


def _measured(row: dict[str, Any], result: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    n = int(result["metrics"]["n"])
    top1, ref1 = float(result["metrics"]["top1"]), float(ref["metrics"]["top1"])
    agreement = (result.get("fidelity") or {}).get("agreement")
    out = {
        "recipe": row["recipe"], "method": row["method"], "n": n, "top1": top1, "fp32_top1": ref1,
        "drop_pt": round(100 * (ref1 - top1), 2), "drop_se_pt": _paired_se_pt(agreement, n),
        "agreement_with_fp32": agreement, "image_cosine": (result.get("fidelity") or {}).get("image_cosine"),
        "bits_per_weight_quantized": round(row["quantized"]["bits_per_weight"], 3),
        "towers": row.get("towers"),
        "quantize_wall_s": row.get("seconds_quantize"), "quantize_cpu_s": row.get("cpu_seconds_quantize"),
        "load_avg_1min": row.get("load_avg_1min"), "calib_samples": row.get("calib_samples"),
    }
    target = TARGETS.get(row["recipe"])
    if target and row["method"] in target["methods"]:
        out["target_max_drop_pt"] = target["max_drop_pt"]
        out["meets_target"] = out["drop_pt"] <= target["max_drop_pt"]
    return out


def _full_eval(sweep_dir: Path, label: str, model_name: str) -> dict[str, Any]:
    """Zero-shot top-1 and predictions on all 10k test images of the float model (``label`` "float") or of
    a sweep checkpoint, cached in ``SWEEP/full/LABEL.json`` so separate processes can share the work."""
    from lowbit.data import resolve_dataset
    from lowbit.eval.zeroshot import zeroshot_classify

    cache = sweep_dir / "full" / f"{label}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    model = lowbit.load(model_name if label == "float" else str(sweep_dir / "checkpoints" / label))
    result = zeroshot_classify(model, resolve_dataset("fashion-mnist", split="test"), progress=False)
    out = {"label": label, "n": int(result["n"]), "top1": float(result["top1"]),
           "predictions": result.outputs.predictions.tolist()}
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_json(cache, out)
    print(f"{label} on all {out['n']}: top-1 {out['top1']:.4f}", flush=True)
    return out


def _timed_gptq(args: argparse.Namespace) -> dict[str, Any]:
    """One GPTQ quantization of the whole model (w4 preset) with ``--timing-threads`` threads, nothing else
    running in this process: the sweep rows' own times are from parallel processes on a shared machine."""
    import os
    import time

    before = torch.get_num_threads()
    torch.set_num_threads(args.timing_threads)
    try:
        model = lowbit.load(args.model)
        load = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), time.process_time()
        lowbit.quantize(model, "w4", calib_samples=args.calib_samples, progress=False)
        out = {"recipe": "w4", "method": "gptq", "threads": args.timing_threads, "calib_samples": args.calib_samples,
               "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(time.process_time() - c0, 1),
               "load_avg_1min_at_start": round(load, 2), "load_avg_1min_at_end": round(os.getloadavg()[0], 2)}
    finally:
        torch.set_num_threads(before)
    print(f"GPTQ w4 of the whole model: {out['wall_s']} s wall, {out['cpu_s']} s CPU "
          f"({args.timing_threads} threads, load {out['load_avg_1min_at_start']})", flush=True)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    sweep_dir = Path(args.sweep_dir)
    full = [x for x in args.full.split(",") if x]
    if args.full_eval_only:  # just fill the 10k cache (the float model and existing checkpoints)
        for label in ["float", *(x.replace(":", "+") for x in full)] if not args.only else [args.only]:
            _full_eval(sweep_dir, label, args.model)
        return {}
    recipes, methods = args.recipes.split(","), args.methods.split(",")
    skip = {tuple(x.split(":")) for x in args.skip.split(",") if x}
    pairs = [(r, m) for r in recipes for m in methods if (r, m) not in skip]
    rows = lowbit.sweep(args.model, recipes, methods, "fashion-mnist", sweep_dir, limit=args.limit,
                        calib_samples=args.calib_samples, keep_checkpoints=True, progress=False, pairs=pairs)
    if args.sweep_only:
        return {"rows": rows}
    float_row = rows[0]
    quant_rows = [r for r in rows[1:] if r.get("quantized")]  # the sweep's fp16 row has no quantize report
    subset_ref = {"metrics": float_row["metrics"]}
    full_ref = _full_eval(sweep_dir, "float", args.model) if full else None
    measured: list[dict[str, Any]] = []
    for row in quant_rows:
        subset = _measured(row, row, subset_ref)
        if f"{row['recipe']}:{row['method']}" in full:
            assert full_ref is not None
            got = _full_eval(sweep_dir, row["label"], args.model)
            same = sum(a == b for a, b in zip(got["predictions"], full_ref["predictions"], strict=True)) / got["n"]
            result = {"metrics": {"n": got["n"], "top1": got["top1"]}, "fidelity": {"agreement": same}}
            entry = _measured(row, result, {"metrics": {"top1": full_ref["top1"]}})
            entry["image_cosine"] = None  # measured on the subset only (see "subset")
            entry["subset"] = {k: subset[k] for k in ("n", "top1", "fp32_top1", "drop_pt", "drop_se_pt",
                                                      "agreement_with_fp32", "image_cosine")}
        else:
            entry = subset
        measured.append(entry)
        print(f"{entry['recipe']}+{entry['method']}: top-1 {entry['top1']:.4f} (fp32 {entry['fp32_top1']:.4f}, "
              f"n={entry['n']}) drop {entry['drop_pt']:+.2f} pt, {entry['bits_per_weight_quantized']:.2f} bits/w, "
              f"quantize {entry['quantize_wall_s']} s wall / {entry['quantize_cpu_s']} s CPU", flush=True)
    if not args.keep_checkpoints:
        shutil.rmtree(sweep_dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(sweep_dir / "full", ignore_errors=True)

    timing = _timed_gptq(args) if args.timing_threads else None
    summary: dict[str, Any] = {}
    for recipe, target in TARGETS.items():
        hits = [r for r in measured if r["recipe"] == recipe and r["method"] in target["methods"]]
        if hits:
            best = min(hits, key=lambda r: (r["n"] < 10000, r["drop_pt"]))  # prefer rows measured on all 10k
            summary[recipe] = {"target": f"drop <= {target['max_drop_pt']} pt ({target['rule']})",
                               "best": f"{best['method']}: {best['drop_pt']:+.2f} pt on n={best['n']}",
                               "met": bool(best["drop_pt"] <= target["max_drop_pt"])}
    gptq = [r for r in measured if r["method"] == "gptq" and r["quantize_wall_s"] is not None]
    if timing:
        summary["gptq_seconds_dedicated_run"] = {
            "target": f"< {GPTQ_SECONDS_TARGET:.0f} s on 2 cores", **timing,
            "met": timing["wall_s"] < GPTQ_SECONDS_TARGET}
    if gptq:
        summary["gptq_seconds"] = {
            "target": f"< {GPTQ_SECONDS_TARGET:.0f} s on 2 cores",
            "max_wall_s": max(r["quantize_wall_s"] for r in gptq),
            "max_cpu_s": max(r["quantize_cpu_s"] for r in gptq),
            "load_avg_1min": [r["load_avg_1min"] for r in gptq],
            "met_wall": max(r["quantize_wall_s"] for r in gptq) < GPTQ_SECONDS_TARGET,
        }
    out = {
        "benchmark": "ptq", "model": args.model, "task": "fashion-mnist zero-shot, test split",
        "calibration": {"data": "fashion-mnist train split (seeded permutation prefix)",
                        "samples": args.calib_samples,
                        "text": "distinct captions topped up with the caption templates x class names"},
        "fp32": {"subset": {"n": int(float_row["metrics"]["n"]), "top1": float_row["metrics"]["top1"]},
                 **({"all": {"n": full_ref["n"], "top1": full_ref["top1"]}} if full_ref else {})},
        "rows": measured, "skipped": args.skip.split(",") if args.skip else [], "summary": summary,
        "threads": args.threads, "env": environment(),
        "sweep": str(sweep_dir),
        "command": "LOWBIT_HOME=.ci-cache .venv/bin/python benchmarks/bench_ptq.py " + " ".join(args.argv),
    }
    write_json(Path(args.out), out)
    return out


def retime(args: argparse.Namespace) -> dict[str, Any]:
    """``--timing-only``: a new dedicated GPTQ timing run replaces that entry of an existing ``ptq.json``."""
    out = json.loads(Path(args.out).read_text())
    timing = _timed_gptq(args)
    out["summary"]["gptq_seconds_dedicated_run"] = {"target": f"< {GPTQ_SECONDS_TARGET:.0f} s on 2 cores", **timing,
                                                    "met": timing["wall_s"] < GPTQ_SECONDS_TARGET,
                                                    "env": environment(),
                                                    "command": "LOWBIT_HOME=.ci-cache .venv/bin/python "
                                                               "benchmarks/bench_ptq.py --timing-only"}
    write_json(Path(args.out), out)
    return out


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--model", default="lit-fashion")
    p.add_argument("--recipes", default="w8,w4,w3,w2")
    p.add_argument("--methods", default="rtn,gptq,awq")
    p.add_argument("--full", default="w8:rtn,w4:gptq,w3:gptq",
                   help="recipe:method rows evaluated on all 10k test images (every row: on --limit)")
    p.add_argument("--skip", default="", help="recipe:method combinations to leave out (comma-separated)")
    p.add_argument("--limit", type=int, default=2000, help="seeded subset of test images for the sweep rows")
    p.add_argument("--calib-samples", type=int, default=512, help="calibration images (the presets ask for >= 512)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timing-threads", type=int, default=2,
                   help="threads of a dedicated, timed GPTQ run of the w4 preset at the end (0: skip it)")
    p.add_argument("--sweep-dir", default=str(RESULTS / "sweep-lit-fashion"))
    p.add_argument("--keep-checkpoints", action="store_true")
    p.add_argument("--sweep-only", action="store_true",
                   help="only run (or resume) the sweep rows, keeping checkpoints: lets several processes share "
                        "the combinations; a final run without it resumes them all and writes ptq.json")
    p.add_argument("--full-eval-only", action="store_true",
                   help="only evaluate the float model and the --full checkpoints on all 10k (cached)")
    p.add_argument("--only", help="with --full-eval-only: just this label (float, w4+gptq, ...)")
    p.add_argument("--out", default=str(RESULTS / "ptq.json"))
    p.add_argument("--timing-only", action="store_true",
                   help="only the dedicated GPTQ timing run, written into the existing --out JSON")
    args = p.parse_args(argv)
    args.argv = list(argv)
    retime(args) if args.timing_only else run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
