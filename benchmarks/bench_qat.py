"""Below two bits on lit-fashion, BOTH towers quantized: PTQ vs QAT (Block-AP + end to end) for w2, ternary,
partial binary (PB-LLM) and binary.

Scope ``both``: every 1x1 conv of the vision tower and every linear of the text tower at the method's width;
the stem and depthwise convs of EfficientNet-Lite0 and the projector heads at 8 bits (RTN, per channel);
embeddings, norms and biases float. Per method:

1. PTQ: ``lowbit.quant.apply.quantize_`` with the recipe; zero-shot top-1 on the first N test images;
2. QAT: ``lowbit.train.qat.run_qat`` with Block-AP (EfficientQAT, ``lowbit.quant.block_ap``: block-wise
   reconstruction of latent weights, steps and the blocks' float norms/biases against the float model on
   cached block inputs of calibration images and text disjoint from the zero-shot prompts, the vision tower's
   last block through the projector to the embedding), then end to end (``--e2e-train all``: latent weights
   and steps; ``scales``: EfficientQAT's E2E-QP, steps only) with the contrastive + distillation loss; folded to
   the packed format, saved, reloaded with ``lowbit.load`` and evaluated on the same images.

Each row gives the effective bits per weight of the low-bit layers, of all quantized layers (with the
8-bit ones), per tower including everything kept float, the stored bytes, the training seconds, and the
``lowbit qat`` command that reproduces it. Single-threaded: on the shared 2-core machine that is what one
run gets.

    .venv/bin/python benchmarks/bench_qat.py                 # writes benchmarks/results/qat.json
    .venv/bin/python benchmarks/bench_qat.py --methods ternary --eval-samples 200 --block-ap-steps 5 \\
        --e2e-steps 0 --out /tmp/qat.json                    # quick
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml

import lowbit
from lowbit.eval.env import environment
from lowbit.io import write_json
from lowbit.quant.apply import quantize_
from lowbit.quant.block_ap import BlockAPConfig
from lowbit.quant.recipe import load_recipe_file
from lowbit.quant.report import QuantReport
from lowbit.train.block_ap_stage import STATE_FILE, BlockAPStage
from lowbit.train.qat import QATLoss
from lowbit.workflows.qat import QATArgs, run_qat

RESULTS = Path(__file__).resolve().parent / "results" / "qat.json"
NOTES = {
    "recipe": "QAT = Block-AP (block-wise reconstruction of latent weights, steps, norms and biases; the vision "
              "tower's last block through pooling + projector to the normalised embedding), then end to end "
              "(--train all: latent weights + steps) with the contrastive + KL + cosine distillation loss against "
              "the float model",
    "calibration": "Block-AP: the first block_ap_samples training images; text blocks on captions/templates "
                   "DISJOINT from the zero-shot prompts (lowbit.train.block_ap_stage.CALIBRATION_TEMPLATES). The "
                   "end-to-end stage pairs the training images with captions drawn from the dataset's templates, "
                   "which are also its zero-shot prompts, as the float model's own head training did",
    "eval": "the folded packed checkpoint reloaded with lowbit.load on the default backend (packed kernels, int8 "
            "activations where the kernels quantize them)",
}
KEPT_8BIT = [{"tower": "projector", "pattern": "*", "method": "rtn", "bits": 8},
             {"tower": "*", "kinds": ["conv"], "method": "rtn", "bits": 8}]  # stem + depthwise convs
LOW_BIT: dict[str, dict[str, Any]] = {
    "w2": {"method": "rtn", "bits": 2, "group_size": 32, "symmetric": True},
    "ternary": {"method": "ternary", "bits": 2, "options": {"storage": "base3"}},
    "pbllm": {"method": "pbllm", "bits": 1, "options": {"fraction": 0.005}},
    "binary": {"method": "binary", "bits": 1},
}


def recipe_yaml(method: str) -> dict[str, Any]:
    """Both towers' 1x1 convs / linears at ``method``; stem, depthwise and projector 8-bit."""
    low = LOW_BIT[method]
    rules = [*KEPT_8BIT, {"tower": "vision", "kinds": ["conv1x1"], **low},
             {"tower": "text", "kinds": ["linear"], **low}]
    return {"version": 1, "name": f"both-{method}", "rules": rules}


def top1(model: Any, n: int) -> float:
    return float(lowbit.evaluate(model, "fashion-mnist", limit=n, footprint=False, progress=False)["metrics"]["top1"])


def footprint(report: QuantReport) -> dict[str, Any]:
    """Bits per weight of the low-bit layers, of all quantized layers, and per tower with its float parts."""
    low = [m for m in report.modules if m.bits < 8]
    low_params = sum(m.params for m in low)
    totals = report.totals()
    towers = {t: {"bits_per_weight_all_params": round(8 * v["stored_bytes"] / max(v["quantized_params"]
                                                                                   + v["float_params"], 1), 3),
                  "quantized_bits_per_weight": round(v["bits_per_weight"], 4), "stored_bytes": v["stored_bytes"]}
              for t, v in totals.items() if t != "total"}
    total = totals["total"]
    return {"low_bit_bits_per_weight": round(8 * sum(m.packed_bytes for m in low) / max(low_params, 1), 4),
            "low_bit_params": low_params, "quantized_bits_per_weight": round(total["bits_per_weight"], 4),
            "quantized_params": total["quantized_params"], "stored_bytes": total["stored_bytes"],
            "weight_error_rms": round(total["weight_error_rms"], 4), "towers": towers}


def reproduce(recipe: Path, qat: QATArgs) -> str:
    assert qat.block_ap is not None
    b = qat.block_ap.block
    return (f"lowbit qat lit-fashion --recipe {recipe} --block-ap --block-ap-samples {qat.block_ap.samples} "
            f"--block-ap-steps {b.steps} --block-ap-lr {b.lr} --block-ap-scale-lr {b.scale_lr} "
            f"--block-ap-float-lr {b.float_lr}{'' if b.tail else ' --block-ap-no-tail'} --steps {qat.steps} "
            f"--train {qat.train} --lr {qat.lr} --scale-lr {qat.scale_lr} --warmup-steps {qat.warmup_steps} "
            f"--batch-size {qat.batch_size} --train-samples {qat.train_samples} --eval-samples {qat.eval_samples} "
            f"--out {qat.out}")


def parser() -> argparse.ArgumentParser:
    """The options (their defaults are the measured recipe; bench_bytes.py trains with them too)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="w2,ternary,pbllm,binary")
    ap.add_argument("--eval-samples", type=int, default=2000)
    ap.add_argument("--block-ap-samples", type=int, default=512)
    ap.add_argument("--block-ap-steps", type=int, default=60)
    ap.add_argument("--block-ap-lr", type=float, default=1e-3)
    ap.add_argument("--block-ap-scale-lr", type=float, default=1e-2)
    ap.add_argument("--block-ap-float-lr", type=float, default=1e-2)
    ap.add_argument("--e2e-steps", type=int, default=300, help="end-to-end steps after Block-AP (0: Block-AP only)")
    ap.add_argument("--e2e-lr", type=float, default=1e-4, help="end-to-end peak learning rate")
    ap.add_argument("--e2e-train", default="all", choices=["all", "scales"],
                    help="end to end, train latent weights + steps (all) or only the steps (scales: E2E-QP)")
    ap.add_argument("--e2e-scale-lr", type=float, default=1.0, help="learning-rate multiplier of the steps end to end")
    ap.add_argument("--block-ap-no-tail", action="store_true",
                    help="last blocks on their outputs, not through the projector to the embedding")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--train-samples", type=int, default=2000)
    ap.add_argument("--run-dir", default="/tmp/lowbit-bench-qat")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--update", action="store_true",
                    help="keep the other methods' rows already in --out (runs of single methods in parallel)")
    return ap


def qat_args(recipe: Path, out: Path, args: argparse.Namespace) -> QATArgs:
    """The ``run_qat`` arguments of one method's run from the options of ``parser``."""
    return QATArgs(
        model="lit-fashion", recipe=str(recipe), out=str(out), steps=args.e2e_steps,
        train=args.e2e_train, lr=args.e2e_lr, scale_lr=args.e2e_scale_lr, batch_size=args.batch_size,
        warmup_steps=max(args.e2e_steps // 10, 0), train_samples=args.train_samples,
        eval_samples=500, eval_every=0, ckpt_every=min(50, max(args.e2e_steps, 1)), loss=QATLoss(), progress=False,
        block_ap=BlockAPStage(samples=args.block_ap_samples, block=BlockAPConfig(
            steps=args.block_ap_steps, lr=args.block_ap_lr, scale_lr=args.block_ap_scale_lr,
            float_lr=args.block_ap_float_lr, tail=not args.block_ap_no_tail)),
    )


def main() -> None:
    args = parser().parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"config": vars(args), "n": args.eval_samples,
                           "eval": f"zero-shot top-1, first {args.eval_samples} Fashion-MNIST test images",
                           "scope": "both towers: vision conv1x1 + text linear at the method; stem, depthwise "
                                    "convs and projector 8-bit RTN; embeddings, norms, biases float",
                           "recipes": {m: recipe_yaml(m) for m in args.methods.split(",")}, "notes": NOTES}
    out["float"] = {"top1": top1(lowbit.load("lit-fashion"), args.eval_samples)}
    print("float", out["float"], flush=True)
    out["rows"] = {}
    for method in args.methods.split(","):
        recipe = run_dir / f"recipe-both-{method}.yaml"
        recipe.write_text(yaml.safe_dump(recipe_yaml(method), sort_keys=False))
        model = lowbit.load("lit-fashion")
        t = time.perf_counter()
        report = quantize_(model, load_recipe_file(recipe), progress=False)
        seconds = time.perf_counter() - t
        ptq = {"top1": top1(model, args.eval_samples), **footprint(report), "quantize_seconds": round(seconds, 1)}
        del model
        print("ptq", method, json.dumps(ptq), flush=True)
        qat = qat_args(recipe, run_dir / f"qat-both-{method}", args)
        t, wall = time.perf_counter(), time.time()
        summary = run_qat(qat)
        seconds = time.perf_counter() - t
        # A rerun with more E2E steps loads the saved Block-AP result: count its recorded time once.
        bap_file = Path(qat.out) / STATE_FILE
        bap_seconds = float((summary.get("block_ap") or {}).get("seconds", 0.0))
        e2e_seconds = seconds - bap_seconds if bap_file.stat().st_mtime >= wall else seconds
        model_dir = Path(qat.out) / "model"
        reloaded = lowbit.load(str(model_dir))  # the folded packed checkpoint through the normal loader
        manifest = json.loads((model_dir / "manifest.json").read_text())
        qrow = {
            "top1": top1(reloaded, args.eval_samples),
            "top1_after_block_ap_500": (summary.get("block_ap") or {}).get("eval", {}).get("top1"),
            **footprint(QuantReport.from_dict(manifest["report"])),
            "model_safetensors_bytes": (model_dir / "model.safetensors").stat().st_size,
            "train_seconds": round(bap_seconds + e2e_seconds, 1), "block_ap_seconds": round(bap_seconds, 1),
            "e2e_and_fold_seconds": round(e2e_seconds, 1), "threads": args.threads,
            "block_ap": asdict(qat.block_ap) if qat.block_ap else None,
            "block_errors": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in b.items()}
                             for b in (summary.get("block_ap") or {}).get("blocks", [])],
            "e2e_steps": summary["steps"], "e2e_last": summary.get("last"),
            "reproduce": reproduce(recipe, qat),
        }
        out["rows"][method] = {"ptq": ptq, "qat": qrow,
                               "drop_vs_float": {"ptq": round(out["float"]["top1"] - ptq["top1"], 4),
                                                 "qat": round(out["float"]["top1"] - qrow["top1"], 4)}}
        print("qat", method, json.dumps(qrow), flush=True)
        _write(args, out, t0)  # partial results survive a later failure
    _write(args, out, t0)
    print(f"wrote {args.out}")


def _write(args: argparse.Namespace, out: dict[str, Any], t0: float) -> None:
    """Write ``out`` to ``args.out``; with ``--update`` merged into the rows (and recipes) already there."""
    doc = {**out, "seconds": round(time.perf_counter() - t0, 1), "env": environment()}
    path = Path(args.out)
    if args.update and path.is_file():
        old = json.loads(path.read_text())
        doc["rows"] = {**old.get("rows", {}), **out["rows"]}
        doc["recipes"] = {**old.get("recipes", {}), **out["recipes"]}
        doc["seconds_per_method"] = {**old.get("seconds_per_method", {}), **{m: doc["seconds"] for m in out["rows"]}}
    write_json(path, doc)


if __name__ == "__main__":
    main()
