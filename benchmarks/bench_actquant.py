"""Activation quantization (issue 21): static W8A8 / W4A8 / W4A4 on the built-in models, after save + load.

Every row is quantized from the float model (calibration: the first ``--calib-samples`` images of the family's
own set, Fashion-MNIST TRAIN, and the caption templates x class names; nothing from the test split), saved as
a packed checkpoint, loaded back and evaluated zero-shot on the first ``--limit`` Fashion-MNIST TEST images on
the CPU kernels, against the float model on the same images (drop in points, agreement of predictions).

Recipes (short strings of lowbit.quant.recipe; ``aN`` = static per-tensor N-bit activations calibrated min-max,
``attention=a8`` = int8 QKᵀ / AV with uniform 8-bit probabilities, ``a4l`` = 4-bit with log2 probabilities):

- ``w8``: the current path, int8 weights with the kernels' dynamic int8 activations (per row and 128 inputs);
- ``W8A8``: every linear's input static int8 (one precomputed scale), attention matmuls int8;
- ``W4A8``: GPTQ int4 weights (groups of 32) under SmoothQuant's migration, static int8 inputs, int8 attention;
- ``W4A4``: GPTQ int4 weights, static asymmetric 4-bit inputs: plain min-max (uniform 4-bit attention
  probabilities) vs RepQ-ViT (post-LayerNorm per-channel ranges reparameterised, log2 attention probabilities).

Latency: the image tower's embedding (``encode_image`` on preprocessed pixels, median of ``--reps`` calls after
warm-up, ``--threads`` threads) of the loaded w8 (dynamic) and W8A8 (static) checkpoints at batch 1 and 32, in
the same process one after the other, with the CPU model and load average recorded (a shared 2-core machine).

    flock /work/heavy.lock .venv/bin/python benchmarks/bench_actquant.py               # actquant.json
    .venv/bin/python benchmarks/bench_actquant.py --limit 500 --rows w8a8 --out /tmp/aq.json   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import lowbit
from lowbit.eval.env import environment
from lowbit.io import write_json
from lowbit.quant.recipe import load_recipe

RESULTS = Path(__file__).resolve().parent / "results"
VIT = "clip-vit-tiny-fashion"
LIT = "lit-fashion"
W4 = "w4g32a8:smoothquant"
# label -> (model, recipe, target max drop in points or None)
ROWS: dict[str, tuple[str, Any, float | None]] = {
    "vit-w8-dynamic": (VIT, "vision=w8,text=w8,projector=w8", None),
    "vit-w8a8": (VIT, "vision=w8a8,text=w8a8,projector=w8a8,attention=a8", 0.5),
    "vit-w8a8-linears": (VIT, "vision=w8a8,text=w8a8,projector=w8a8", 0.5),
    "vit-w8a8-smoothquant": (VIT, "vision=w8a8:smoothquant,text=w8a8:smoothquant,projector=w8a8,attention=a8", 0.5),
    "vit-w4a8": (VIT, {"rules": [
        {"tower": t, "bits": 4, "group_size": 32, "method": "smoothquant", "options": {"base": "gptq"},
         "activations": "a8"} for t in ("vision", "text")] + [
        {"tower": "projector", "bits": 8, "activations": "a8"}], "attention": "a8"}, 1.0),
    "vit-w4a4-minmax": (VIT, {"rules": [
        {"tower": t, "bits": 4, "group_size": 32, "method": "gptq", "activations": "a4z"} for t in ("vision", "text")]
        + [{"tower": "projector", "bits": 8, "activations": "a8"}], "attention": "a4"}, None),
    "vit-w4a4-repq": (VIT, {"rules": [
        {"tower": t, "bits": 4, "group_size": 32, "method": "repq", "options": {"base": "gptq"},
         "activations": "a4z"} for t in ("vision", "text")] + [
        {"tower": "projector", "bits": 8, "activations": "a8"}], "attention": "a4l"}, None),
    "lit-w8a8": (LIT, "vision=w8a8,text=w8a8,projector=w8a8,attention=a8", 0.5),
    "lit-w8a8-percentile": (LIT, {"rules": [
        {"tower": t, "bits": 8, "activations": {"bits": 8, "calibration": "percentile", "percentile": 99.99}}
        for t in ("vision", "text", "projector")], "attention": "a8"}, 0.5),
}
LATENCY_PAIR = ("vit-w8-dynamic", "vit-w8a8")  # the comparison
LATENCY_EXTRA = ("vit-w8a8-linears",)  # static linears alone (float attention): what the kernels' entry changes


def _recipe(spec: Any, label: str) -> Any:
    from lowbit.quant.recipe import Recipe

    return Recipe.from_dict(spec, name=label) if isinstance(spec, dict) else load_recipe(spec)


def _median_ms(fn: Any, reps: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def _latency(models: dict[str, Any], reps: int) -> dict[str, Any]:
    from lowbit.data import resolve_dataset

    images = resolve_dataset("fashion-mnist", split="test", limit=32).images
    out: dict[str, Any] = {"load_avg_1min_before": round(os.getloadavg()[0], 2)}
    for batch in (1, 32):
        for label, model in models.items():
            pixels = model.preprocess(images[:batch])
            with torch.inference_mode():
                ms = _median_ms(lambda m=model, p=pixels: m.encode_image(p), reps)
            out[f"{label}_b{batch}_ms"] = round(ms, 3)
        a, b = (out[f"{x}_b{batch}_ms"] for x in LATENCY_PAIR)
        out[f"static_over_dynamic_b{batch}"] = round(b / a, 3)
        for extra in LATENCY_EXTRA:
            if f"{extra}_b{batch}_ms" in out:
                out[f"{extra}_over_dynamic_b{batch}"] = round(out[f"{extra}_b{batch}_ms"] / a, 3)
    out["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
    out["scope"] = ("encode_image on preprocessed pixels, median ms per call after 2 warm-up calls; both "
                    "checkpoints loaded in this process, measured alternately per batch size")
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    labels = [x for x in args.rows.split(",") if x] if args.rows else list(ROWS)
    unknown = [x for x in labels if x not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; accepted: {', '.join(ROWS)}")
    floats: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    loaded: dict[str, Any] = {}
    for label in labels:
        name, spec, target = ROWS[label]
        if name not in floats:
            floats[name] = lowbit.evaluate(lowbit.load(name), "fashion-mnist", limit=args.limit, footprint=False,
                                           progress=False)
            print(f"{name} float: top-1 {floats[name]['metrics']['top1']:.4f} on {floats[name]['data']['n']}",
                  flush=True)
        model = lowbit.load(name)
        recipe = _recipe(spec, label)
        t0, c0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
        report = lowbit.quantize(model, recipe, calib_samples=args.calib_samples, progress=False)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        out_dir = work / label
        if out_dir.exists():
            shutil.rmtree(out_dir)
        lowbit.save(model, out_dir, report)
        del model
        back = lowbit.load(str(out_dir))  # measured after save + load, on the kernels
        result = lowbit.evaluate(back, "fashion-mnist", limit=args.limit, footprint=False, progress=False,
                                 reference=floats[name])
        ref1, top1 = floats[name]["metrics"]["top1"], result["metrics"]["top1"]
        acts = [m.activations for m in report.modules if m.activations]
        row = {
            "label": label, "model": name, "recipe": recipe.describe() + (
                f", attention={recipe.attention.short()}" if recipe.attention else ""),
            "n": result["data"]["n"], "top1": top1, "fp32_top1": ref1, "drop_pt": round(100 * (ref1 - top1), 2),
            "agreement_with_fp32": (result.get("fidelity") or {}).get("agreement"),
            "image_cosine": (result.get("fidelity") or {}).get("image_cosine"),
            "layers_with_quantized_inputs": len(acts), "quantized_layers": len(report.modules),
            "attention_modules_quantized": len(report.attention),
            "bits_per_weight_quantized": round(report.totals()["total"]["bits_per_weight"], 3),
            "quantize_wall_s": round(seconds, 1), "quantize_cpu_s": round(cpu, 1),
            "load_avg_1min_at_quantize": round(load0, 2), "calib_samples": args.calib_samples,
            "transforms": {k: {f: len(v) if isinstance(v, (list, dict)) else v for f, v in t.items()}
                           for k, t in report.transforms.items()},  # e.g. how many norms SmoothQuant folded into
        }
        if target is not None:
            row["target_max_drop_pt"] = target
            row["meets_target"] = row["drop_pt"] <= target
        rows.append(row)
        print(f"{label}: top-1 {top1:.4f} (drop {row['drop_pt']} pt, agreement {row['agreement_with_fp32']}), "
              f"{row['layers_with_quantized_inputs']}/{row['quantized_layers']} layers with quantized inputs, "
              f"{row['attention_modules_quantized']} attentions", flush=True)
        if label in LATENCY_PAIR + LATENCY_EXTRA:
            loaded[label] = back
    latency = _latency({k: loaded[k] for k in LATENCY_PAIR + LATENCY_EXTRA if k in loaded}, args.reps) \
        if all(k in loaded for k in LATENCY_PAIR) else None
    w4a4 = {r["label"]: r for r in rows if r["label"].startswith("vit-w4a4")}
    margin = None
    if len(w4a4) == 2:  # points of top-1 RepQ-ViT (+ log2 attention probabilities) keeps over plain min-max
        margin = round(w4a4["vit-w4a4-minmax"]["drop_pt"] - w4a4["vit-w4a4-repq"]["drop_pt"], 2)
    return {
        "issue": 21,
        "what": "static activation quantization after save + load on the CPU kernels; zero-shot Fashion-MNIST",
        "command": args.command, "threads": args.threads, "limit": args.limit, "env": environment(),
        "float": {k: {"top1": v["metrics"]["top1"], "n": v["data"]["n"]} for k, v in floats.items()},
        "rows": rows, "image_latency_w8a8_static_vs_w8_dynamic": latency,
        "w4a4_repq_margin_over_minmax_pt": margin,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="", help=f"comma list of {', '.join(ROWS)} (default: all)")
    parser.add_argument("--limit", type=int, default=10000)
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--work", default="/tmp/lowbit-actquant-bench")
    parser.add_argument("--out", default=str(RESULTS / "actquant.json"))
    args = parser.parse_args()
    args.command = "python benchmarks/bench_actquant.py " + " ".join(sys.argv[1:])
    result = run(args)
    out = Path(args.out)
    if args.rows and out.is_file():  # a partial re-run replaces its rows and keeps the others' measurements
        previous = json.loads(out.read_text())
        mine = {r["label"] for r in result["rows"]}
        result["rows"] = [r for r in previous["rows"] if r["label"] not in mine] + result["rows"]
        result["rows"].sort(key=lambda r: list(ROWS).index(r["label"]))
        for key in ("image_latency_w8a8_static_vs_w8_dynamic", "w4a4_repq_margin_over_minmax_pt"):
            if result[key] is None:
                result[key] = previous.get(key)
        result["float"] = {**previous.get("float", {}), **result["float"]}
        result["partial_reruns"] = previous.get("partial_reruns", []) + [
            {"command": args.command, "rows": sorted(mine), "env": result["env"]}]
    write_json(out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
