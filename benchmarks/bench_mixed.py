"""Mixed precision under a budget (issue 21): ``lowbit search`` on lit-fashion against uniform recipes, measured
after save + load on the kernels, on the same evaluation as benchmarks/bench_bytes.py (zero-shot Fashion-MNIST,
the full 10000-image test set unless ``--limit``).

    flock /work/heavy.lock .venv/bin/python benchmarks/bench_mixed.py            # -> results/mixed.json, mixed.png
    flock /work/heavy.lock .venv/bin/python benchmarks/bench_mixed.py --budgets 3.0 --limit 500   # a quick check

Rows: fp32; the uniform presets ``w4`` / ``w3`` / ``w2`` (GPTQ, act-order + clip search, groups of 128 / 32 / 32,
the same embeddings, projector and k x k conv rules), re-measured here unless ``--uniform-from bytes.json``; and
one searched mix per ``--budgets`` value (average bits per searched weight: the linear / 1x1-conv layers the
presets' main rule quantizes, widths 2,3,4,8 in groups of 32, GPTQ with the presets' options; everything else as
the presets). Sensitivities are measured once (cached under $LOWBIT_HOME/search). Targets: at 3.0 bits a drop
<= 1 pt (uniform w3: 3.0 pt in bytes.json), at 2.5 bits <= 3 pt, without QAT.

``--llava N`` instead searches llava-fashion-hd's language model at 4.0 average bits and compares it with uniform
w4 GPTQ (the same recipe at one width) by the mean KL of the first answer token on N held-out fashion-vqa
questions, after save + load (section ``llava`` of mixed.json, written after each row)::

    /work/wt/bin/accuracy 2 .venv/bin/python benchmarks/bench_mixed.py --llava 200 --widths 3,4,5,6,8 \
        --probe-data fashion-vqa --probe-samples 32 --sensitivity fisher --refine 24
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import lowbit
from lowbit.eval.env import environment
from lowbit.eval.report import whole_bytes
from lowbit.io import write_json
from lowbit.quant.recipe import Recipe, load_recipe
from lowbit.workflows.search import DEFAULT_OPTIONS, search, uniform_recipe

RESULTS = Path(__file__).resolve().parent / "results"
MODEL, TASK = "lit-fashion", "fashion-mnist"
TARGETS = {3.0: 1.0, 2.5: 3.0}  # budget bits -> max drop pt


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def proxy_agreement(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """How well GPTQ's Hessian-weighted error tr(dW H dWᵀ) (HAWQ-style proxy) ranks the (layer, width) choices
    against the measured probe KL: Spearman correlation over all choices below 8 bits."""
    import numpy as np

    pairs = [(c["loss"], c["proxy"]) for la in layers for c in la["choices"]
             if c["bits"] < 8 and c["proxy"] == c["proxy"]]  # NaN: no Hessian
    if len(pairs) < 3:
        return {"n": len(pairs)}
    loss, proxy = (np.argsort(np.argsort(np.array(v))) for v in zip(*pairs, strict=True))
    return {"n": len(pairs), "spearman": round(float(np.corrcoef(loss, proxy)[0, 1]), 4)}


def _measure(float_model: Any, reference: dict[str, Any], recipe: Any, label: str, limit: int | None,
             work: Path) -> dict[str, Any]:
    """Quantize a copy, save, load from disk, evaluate on the kernels against the float reference."""
    t0, c0 = time.perf_counter(), _cpu()
    model = copy.deepcopy(float_model)
    report = lowbit.quantize(model, recipe, progress=False)
    out = work / label.replace(" ", "_")
    lowbit.save(model, out, report=report)
    del model
    packed = lowbit.load(str(out))
    result = lowbit.evaluate(packed, TASK, limit=limit, reference=reference, progress=False, checkpoint_dir=out)
    top1, base = result["metrics"]["top1"], reference["metrics"]["top1"]
    fp = result.get("footprint") or {}
    return {"label": label, "accuracy": top1, "drop_pt": round(100 * (base - top1), 2),
            "agreement": (result.get("fidelity") or {}).get("agreement"), "file_bytes": whole_bytes(fp),
            "bits_per_weight": report.totals()["total"].get("bits_per_weight"),
            "seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(_cpu() - c0, 1)}


LLAVA_BASE = "language@embedding=w8g32,language=w4g32:gptq,vision=w8,projector=w8,floats=fp16"  # bytes.json's
LLAVA_CALIB = 64  # image+question sequences, as bench_vlm.py / bench_bytes.py


def llava_rows(n_vqa: int, budget: float, work: Path, widths: list[int], probe: dict[str, Any],
               on_row: Any = None) -> dict[str, Any]:
    """llava-fashion-hd's language model: a searched mix at ``budget`` average bits against uniform w4 GPTQ with the
    same options (the search's own recipe with every layer at 4 bits), mean KL of the first answer token against
    full precision on the same held-out fashion-vqa questions (test split; a ``probe_data`` probe reads the train
    split), after save + load. ``probe``: the search's probe options (probe_data, probe_samples, sensitivity,
    refine_measures). ``on_row(section)`` is called with the section so far after each row (a partial record)."""
    model = lowbit.load("llava-fashion-hd")
    c0 = _cpu()
    reference = lowbit.evaluate(model, "fashion-vqa", limit=n_vqa, progress=False)
    print(f"reference: {reference['metrics']['accuracy']} ({_cpu() - c0:.0f} s CPU)", flush=True)
    common = {"base": LLAVA_BASE, "calib_data": TASK, "calib_samples": LLAVA_CALIB, "measure": False,
              "progress": True, "widths": widths, **probe}
    c0 = _cpu()
    found = search(model, budget_bits=budget, **common)
    search_cpu = round(_cpu() - c0, 1)
    print(f"search: {search_cpu} s CPU; {json.dumps(found['expected']['params_by_width'])}", flush=True)
    # The baseline is the search's own recipe with every searched layer at 4 bits (same method, options, groups)
    searched_params = sum(layer["params"] for layer in found["layers"])
    uniform = {"recipe": uniform_recipe(load_recipe(LLAVA_BASE), 4, "gptq", 32, DEFAULT_OPTIONS["gptq"],
                                        "uniform w4 gptq").to_dict(),
               "expected": {"avg_bits": 4.0, "params_by_width": {"w4": searched_params}}}
    rows = []
    for label, chosen in ((f"searched {budget:g} bits", found), ("uniform w4 gptq", uniform)):
        c0 = _cpu()
        quant = copy.deepcopy(model)
        recipe = Recipe.from_dict(chosen["recipe"], name=label)
        report = lowbit.quantize(quant, recipe, calib_data=TASK, calib_samples=LLAVA_CALIB, progress=False)
        out = work / label.replace(" ", "_")
        lowbit.save(quant, out, report=report)
        del quant
        packed = lowbit.load(str(out))
        result = lowbit.evaluate(packed, "fashion-vqa", limit=n_vqa, reference=reference, progress=False,
                                 checkpoint_dir=out)
        rows.append({"label": label, "accuracy": result["metrics"]["accuracy"],
                     "kl": (result.get("fidelity") or {}).get("kl"),
                     "file_bytes": whole_bytes(result.get("footprint") or {}),
                     "avg_bits_searched": chosen["expected"]["avg_bits"],
                     "params_by_width": chosen["expected"]["params_by_width"],
                     "cpu_seconds": round(_cpu() - c0, 1)})
        print(json.dumps(rows[-1]), flush=True)
        del packed
        if on_row is not None and len(rows) < 2:
            on_row(_llava_section(n_vqa, reference, rows, search_cpu, probe, found))
    return _llava_section(n_vqa, reference, rows, search_cpu, probe, found)


def _llava_section(n_vqa: int, reference: dict[str, Any], rows: list[dict[str, Any]], search_cpu: float,
                   probe: dict[str, Any], found: dict[str, Any]) -> dict[str, Any]:
    done = len(rows) == 2
    return {"model": "llava-fashion-hd (language model searched)", "vqa": n_vqa, "base": LLAVA_BASE,
            "full_precision_accuracy": reference["metrics"]["accuracy"], "rows": rows, "search_cpu_seconds": search_cpu,
            "search": {**probe, "sensitivity_record": found["sensitivity"], "expected": found["expected"],
                       "refinement": found.get("refinement")},
            "layers_by_width": _by_width(found["layers"]),
            "target": "searched mix <= 4.0 average bits with lower mean KL than uniform w4 GPTQ",
            "met": bool(rows[0]["avg_bits_searched"] <= 4.0 and rows[0]["kl"] < rows[1]["kl"]) if done else None,
            **({} if done else {"partial": "the uniform row is still to be measured"}),
            "layers": found["layers"]}


def _by_width(layers: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """How many layers of each kind (q_proj, down_proj, ...) the search put at each width."""
    out: dict[str, dict[str, int]] = {}
    for la in layers:
        kind = la["name"].rsplit(".", 1)[-1]
        out.setdefault(f"w{la['bits']}", {})[kind] = out.get(f"w{la['bits']}", {}).get(kind, 0) + 1
    return {w: dict(sorted(k.items())) for w, k in sorted(out.items())}


def plot(rows: list[dict[str, Any]], fp32: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for kind, marker, color in (("uniform", "s", "tab:gray"), ("searched", "o", "tab:blue")):
        pts = sorted((r["file_bytes"] / 1e6, 100 * r["accuracy"], r["label"]) for r in rows if r["kind"] == kind)
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, linestyle="-" if
                kind == "searched" else ":", label=f"{kind} ({'lowbit search' if kind == 'searched' else 'presets'})")
        for x, y, label in pts:
            dy = 7 if kind == "searched" else -13  # searched above their points, uniform below: no overlap
            last = x == max(r["file_bytes"] / 1e6 for r in rows)  # the rightmost label goes left, inside the axes
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(-5 if last else 5, dy), fontsize=8,
                        color=color, ha="right" if last else "left",
                        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
    ax.axhline(100 * fp32["accuracy"], color="tab:green", linestyle="--", linewidth=1,
               label=f"fp32 ({fp32['file_bytes'] / 1e6:.0f} MB)")
    ax.set_xlabel("whole checkpoint, MB (every file; smaller is better ←)")
    ax.set_ylabel("zero-shot Fashion-MNIST top-1, % (higher is better ↑)")
    ax.set_title("lit-fashion: searched mixed precision vs uniform recipes (after save + load)")
    ax.margins(x=0.12, y=0.1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="2.5,3.0,3.5", help="average bits per searched weight")
    parser.add_argument("--uniform", default="w4,w3,w2", help="uniform presets to measure alongside")
    parser.add_argument("--uniform-from", help="take the uniform rows from this bytes.json instead of re-measuring")
    parser.add_argument("--limit", type=int, help="Fashion-MNIST test images (default: all 10000)")
    parser.add_argument("--llava", type=int, help="instead: llava-fashion-hd's LM on this many fashion-vqa questions")
    parser.add_argument("--widths", default="2,3,4,8", help="widths the search chooses from")
    parser.add_argument("--probe-data", help="--llava: probe on this VQA set's train-split prompts (fashion-vqa)")
    parser.add_argument("--probe-samples", type=int, default=16, help="--llava: probe prompts / captions")
    parser.add_argument("--sensitivity", default="kl", help="--llava: kl (measured) or fisher")
    parser.add_argument("--refine", type=int, default=0, help="--llava: measured refinement, at most N measurements")
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON's rows")
    parser.add_argument("--json", default=str(RESULTS / "mixed.json"))
    args = parser.parse_args()
    if args.replot:
        saved = json.loads(Path(args.json).read_text())
        plot(saved["rows"], saved["fp32"], Path(args.json).with_suffix(".png"))
        return
    if args.llava:
        t0, c0, load_avg = time.perf_counter(), _cpu(), os.getloadavg()[0]
        probe = {"probe_data": args.probe_data, "probe_samples": args.probe_samples,
                 "sensitivity": args.sensitivity, "refine_measures": args.refine}
        extra = "".join(f" --{k} {v}" for k, v in (("probe-data", args.probe_data), ("probe-samples",
                        args.probe_samples), ("sensitivity", args.sensitivity), ("refine", args.refine)) if v)
        previous = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {}
        earlier = previous.get("llava") or {}
        earlier = earlier.get("previous_run") if earlier.get("partial") else earlier  # a partial one: keep its
        # predecessor

        def write(section: dict[str, Any]) -> None:
            section.update(seconds=round(time.perf_counter() - t0, 1), cpu_seconds=round(_cpu() - c0, 1),
                           seconds_note="wall time includes any pauses of the accuracy slot; cpu_seconds is this "
                                        "process's CPU time", load_avg_1min=load_avg,
                           load_avg_1min_end=os.getloadavg()[0], env=environment(), threads=torch.get_num_threads(),
                           command=f"benchmarks/bench_mixed.py --llava {args.llava} --widths {args.widths}{extra}")
            if earlier:
                section["previous_run"] = {k: earlier.get(k) for k in ("command", "rows", "met", "search_cpu_seconds")}
            write_json(args.json, {**previous, "llava": section})

        with tempfile.TemporaryDirectory(prefix="lowbit-mixed-") as tmp:
            section = llava_rows(args.llava, 4.0, Path(tmp), [int(w) for w in args.widths.split(",")], probe,
                                 on_row=write)
        write(section)
        print(json.dumps({k: section[k] for k in ("rows", "met")}))
        return
    t0, load_avg = time.perf_counter(), os.getloadavg()[0]
    float_model = lowbit.load(MODEL)
    reference = lowbit.evaluate(float_model, TASK, limit=args.limit, progress=False)
    fp32 = {"label": "fp32", "accuracy": reference["metrics"]["top1"],
            "file_bytes": whole_bytes(reference.get("footprint") or {})}
    rows: list[dict[str, Any]] = []
    searches: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lowbit-mixed-") as tmp:
        work = Path(tmp)
        for budget in [float(b) for b in args.budgets.split(",") if b]:
            c0, s0 = _cpu(), time.perf_counter()
            found = search(float_model, budget_bits=budget, measure=False)
            search_cpu, search_seconds = round(_cpu() - c0, 1), round(time.perf_counter() - s0, 1)
            recipe = Recipe.from_dict(found["recipe"], name=found["recipe"]["name"])
            row = {**_measure(float_model, reference, recipe, f"searched {budget:g} bits", args.limit, work),
                   "kind": "searched", "budget_bits": budget, "expected": found["expected"],
                   "search_cpu_seconds": search_cpu, "search_seconds": search_seconds,
                   "sensitivity_cached": found["sensitivity"]["cached"]}
            if budget in TARGETS:
                row["target_max_drop_pt"] = TARGETS[budget]
                row["meets_target"] = row["drop_pt"] <= TARGETS[budget]
            rows.append(row)
            searches[f"{budget:g}"] = {"recipe": found["recipe"], "layers": found["layers"],
                                       "sensitivity": found["sensitivity"]}
            if "proxy_vs_measured" not in searches:
                cache = json.loads(Path(found["sensitivity"]["cache_file"]).read_text())
                searches["proxy_vs_measured"] = proxy_agreement(cache["layers"])
            print(json.dumps({k: v for k, v in row.items() if k != "expected"}), flush=True)
        if args.uniform_from:
            prior = json.loads(Path(args.uniform_from).read_text())["models"][MODEL]
            wanted = set(args.uniform.split(","))
            for r in prior:
                key = str(r["label"]).split("+")[0]
                if key in wanted:
                    rows.append({**{k: r[k] for k in ("accuracy", "drop_pt", "agreement", "file_bytes",
                                                     "bits_per_weight")}, "label": f"uniform {key}",
                                 "kind": "uniform", "source": args.uniform_from})
        else:
            for preset in [u for u in args.uniform.split(",") if u]:
                rows.append({**_measure(float_model, reference, preset, f"uniform {preset}", args.limit, work),
                             "kind": "uniform"})
                print(json.dumps(rows[-1]), flush=True)
    json_path = Path(args.json)
    plot(rows, fp32, json_path.with_suffix(".png"))
    result = {"benchmark": "mixed", "model": MODEL, "task": TASK, "limit": args.limit, "fp32": fp32, "rows": rows,
              "searches": searches, "targets": {f"{b:g} bits": {"max_drop_pt": d, "met": next(
                  (r["meets_target"] for r in rows if r.get("budget_bits") == b), None)} for b, d in TARGETS.items()},
              "seconds": round(time.perf_counter() - t0, 1), "load_avg_1min": load_avg,
              "load_avg_1min_end": os.getloadavg()[0], "env": environment(), "threads": torch.get_num_threads(),
              "command": "benchmarks/bench_mixed.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "json")}
    previous = json.loads(json_path.read_text()) if json_path.is_file() else {}
    write_json(json_path, {**result, **({"llava": previous["llava"]} if "llava" in previous else {})})
    print(json.dumps(result["targets"]))


if __name__ == "__main__":
    main()
