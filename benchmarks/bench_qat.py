"""Below two bits on lit-fashion: PTQ (binary, ternary, PB-LLM) accuracy, then QAT with distillation.

Scopes: ``both`` = every 1x1 conv of the vision tower + every linear of the text tower; ``text`` = the text
tower's linears only. Depthwise/stem convs and the projector heads stay float. Steps:

1. float model: zero-shot top-1 on the first N Fashion-MNIST test images;
2. PTQ with each method (``lowbit.quant.binary`` / ``ternary`` / ``pbllm``) and scope: top-1 and effective
   bits per quantized weight;
3. QAT runs (``lowbit.train.qat.run_qat``, ``--qat scope:method:steps,...``) on a train subset, folded to the
   packed format, saved, reloaded with ``lowbit.load`` and evaluated on the same test images.

Single-threaded on purpose: on the shared 2-core machine two torch threads ran 4x slower than one.

    .venv/bin/python benchmarks/bench_qat.py                  # writes benchmarks/results/qat.json (~12 min)
    .venv/bin/python benchmarks/bench_qat.py --qat text:binary:5 --eval-samples 100 --out /tmp/qat.json  # quick
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml

import lowbit
from lowbit.eval.env import environment
from lowbit.io import write_json
from lowbit.quant.apply import quantize_
from lowbit.quant.recipe import load_recipe_file
from lowbit.train.qat import QATArgs, QATLoss, run_qat

RESULTS = Path(__file__).resolve().parent / "results" / "qat.json"


SCOPES = {"both": (("vision", "conv1x1"), ("text", "linear")), "text": (("text", "linear"),)}


def recipe_yaml(scope: str, method: str) -> dict[str, Any]:
    """The layers of ``scope`` with ``method`` (per output channel); every other layer float."""
    bits = {"binary": 1, "pbllm": 1, "ternary": 2}[method]
    rules: list[dict[str, Any]] = [{"tower": t, "kinds": [k], "method": method, "bits": bits} for t, k in SCOPES[scope]]
    return {"version": 1, "name": f"{scope}-{method}", "rules": [*rules, {"tower": "*", "skip": True}]}


def top1(model: Any, n: int) -> float:
    return float(lowbit.evaluate(model, "fashion-mnist", limit=n, footprint=False, progress=False)["metrics"]["top1"])


def _first_losses(run: Path) -> dict[str, float]:
    """The first logged losses of a QAT run (train_log.jsonl), to compare with the last."""
    for line in (run / "train_log.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if "loss" in entry:
            return {k: round(v, 4) for k, v in entry.items() if k in ("loss", "kl", "cos", "task")}
    return {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="binary,ternary,pbllm")
    ap.add_argument("--scopes", default="both,text")
    ap.add_argument("--qat", default="text:binary:150,both:ternary:60", help="scope:method:steps,...")
    ap.add_argument("--eval-samples", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--scale-lr", type=float, default=0.1)
    ap.add_argument("--train-samples", type=int, default=2000)
    ap.add_argument("--run-dir", default="/tmp/lowbit-bench-qat")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"config": vars(args), "eval": f"zero-shot top-1, first {args.eval_samples} test images",
                           "scopes": {k: [f"{t}/{kind}" for t, kind in v] for k, v in SCOPES.items()}}

    def recipe_path(scope: str, method: str) -> Path:
        path = run_dir / f"recipe-{scope}-{method}.yaml"
        path.write_text(yaml.safe_dump(recipe_yaml(scope, method), sort_keys=False))
        return path

    out["float"] = {"top1": top1(lowbit.load("lit-fashion"), args.eval_samples)}
    print("float", out["float"], flush=True)
    out["ptq"] = {}
    for scope in args.scopes.split(","):
        for method in args.methods.split(","):
            model = lowbit.load("lit-fashion")
            t = time.perf_counter()
            report = quantize_(model, load_recipe_file(recipe_path(scope, method)), progress=False)
            total = report.totals()["total"]
            row = out["ptq"][f"{scope}:{method}"] = {
                "top1": top1(model, args.eval_samples), "bits_per_weight": round(total["bits_per_weight"], 4),
                "quantized_params": total["quantized_params"],
                "weight_error_rms": round(total["weight_error_rms"], 4), "seconds": round(time.perf_counter() - t, 1),
            }
            print("ptq", scope, method, row, flush=True)

    out["qat"] = {}
    for item in args.qat.split(","):
        scope, method, steps_text = item.split(":")
        steps = int(steps_text)
        t = time.perf_counter()
        recipe = recipe_path(scope, method)
        qat_dir = run_dir / f"qat-{scope}-{method}"
        summary = run_qat(QATArgs(
            model="lit-fashion", recipe=str(recipe), out=str(qat_dir), steps=steps, batch_size=args.batch_size,
            lr=args.lr, scale_lr=args.scale_lr, warmup_steps=max(steps // 10, 1), train_samples=args.train_samples,
            eval_every=max(steps // 3, 1), eval_samples=500, ckpt_every=max(steps // 3, 1), loss=QATLoss(),
            progress=False,
        ))
        reloaded = lowbit.load(str(qat_dir / "model"))  # the folded packed checkpoint, through the normal loader
        row = out["qat"][f"{scope}:{method}"] = {
            "top1": top1(reloaded, args.eval_samples), "ptq_top1": out["ptq"].get(f"{scope}:{method}", {}).get("top1"),
            "bits_per_weight": round(summary["totals"]["bits_per_weight"], 4), "steps": summary["steps"],
            "train_samples": args.train_samples, "batch_size": args.batch_size,
            "last_losses": {k: round(v, 4) for k, v in summary["last"].items() if isinstance(v, float)},
            "first_losses": _first_losses(qat_dir),
            "evals_500": [{"step": e["step"], **{k: round(v, 4) for k, v in e["eval"].items()}}
                          for e in summary["evals"]],
            "seconds": round(time.perf_counter() - t, 1),
            "reproduce": f"lowbit qat lit-fashion --recipe {recipe} --steps {steps} --batch-size {args.batch_size} "
                         f"--lr {args.lr} --scale-lr {args.scale_lr} --warmup-steps {max(steps // 10, 1)} "
                         f"--train-samples {args.train_samples} --eval-every {max(steps // 3, 1)} "
                         f"--ckpt-every {max(steps // 3, 1)} --out {qat_dir}",
        }
        print("qat", scope, method, json.dumps(row), flush=True)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["env"] = environment()
    write_json(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
