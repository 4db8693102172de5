"""Pre-training throughput of the ViT dual-encoder presets on this CPU, and the accuracy curve of the default.

    .venv/bin/python benchmarks/bench_pretrain.py            # -> benchmarks/results/pretrain.json
    .venv/bin/python benchmarks/bench_pretrain.py --quick    # 3 timed steps per preset, smoke test

Throughput is images (= image-text pairs) per second of full training steps: forward of both towers, CLIP loss,
backward, gradient clipping and AdamW, on synthetic batches (data loading is not measured: the in-memory
pipeline costs a slice and an int->float conversion per batch). Median step time over the timed steps, after
warm-up. The accuracy curve is read from the training log shipped with ``clip-vit-tiny-fashion``.

``--parts sweep`` runs the weight-quantization sweep of the PTQ room on the ViT default (w8/w4/w3/w2 x
rtn/gptq/awq, Fashion-MNIST zero-shot on ``--sweep-limit`` test images, all 10k by default), writes its own
table and plot to ``benchmarks/results/sweep-clip-vit-tiny-fashion/`` and a summary into ``pretrain.json``.
Each part replaces only its own section of an existing ``pretrain.json`` and carries its own environment.

    .venv/bin/python benchmarks/bench_pretrain.py --parts sweep   # ~2.5 min on 1 thread
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from lowbit.eval.env import environment
from lowbit.io import write_json
from lowbit.models.vit_default import ASSET_DIR
from lowbit.train.clip_train import ContrastiveModel, contrastive_loss_fn
from lowbit.train.presets import build_dual_encoder, resolve_preset

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB, TEXT_TOKENS = 128, 14  # about the default's vocabulary and caption length


def step_throughput(preset: str, batch: int, steps: int, threads: int, bf16: bool = False) -> dict:
    """Median images/s of full training steps of ``preset`` at ``batch``."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    p = resolve_preset(preset)
    model = ContrastiveModel(build_dual_encoder(p, VOCAB)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = contrastive_loss_fn("clip")
    pixels = torch.randn(batch, 3, p.image_size, p.image_size)
    ids = torch.randint(4, VOCAB, (batch, TEXT_TOKENS))
    ids[:, 0], ids[:, -1] = 2, 3
    batch_dict = {"pixel_values": pixels, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    times = []
    for i in range(steps + 2):  # two warm-up steps (allocator, oneDNN kernel selection)
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model, batch_dict)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"preset": preset, "batch": batch, "threads": threads, "bf16": bf16, "steps_timed": steps,
            "median_step_s": round(med, 4), "images_per_s": round(batch / med, 1),
            "parameters": sum(q.numel() for q in model.parameters()),
            "image_size": p.image_size, "patch_size": p.patch_size,
            "tokens_per_image": (p.image_size // p.patch_size) ** 2}


def accuracy_curve(log: Path) -> list[dict]:
    """(step, top1) of every evaluation in a ``train_log.jsonl``."""
    if not log.is_file():
        return []
    rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    return [{"step": r["step"], "top1": r["eval"]["top1"], "n": r["eval"].get("n")} for r in rows if "eval" in r]


def sweep_section(limit: int | None) -> dict:
    """The PTQ sweep on the ViT default: one compact row per recipe x method (full rows in the sweep dir)."""
    from lowbit.workflows.sweep import sweep

    out = RESULTS / "sweep-clip-vit-tiny-fashion"
    t0 = time.perf_counter()
    rows = sweep("clip-vit-tiny-fashion", ["w8", "w4", "w3", "w2"], ["rtn", "gptq", "awq"], "fashion-mnist", out,
                 limit=limit)
    summary = [{"label": r["label"], "top1": r["metrics"]["top1"], "n": r["metrics"].get("n"),
                "agreement": (r.get("fidelity") or {}).get("agreement"),
                "bits_per_weight": (r.get("quantized") or {}).get("bits_per_weight"),
                "quantize_s": r.get("seconds_quantize")} for r in rows]
    return {"env": environment(), "seconds": round(time.perf_counter() - t0, 1), "dir": str(out.relative_to(RESULTS)),
            "rows": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", default="1,2", help="comma list of torch thread counts")
    ap.add_argument("--bf16", action="store_true", help="also measure bfloat16 autocast")
    ap.add_argument("--json", type=Path, default=RESULTS / "pretrain.json")
    ap.add_argument("--parts", default="throughput,curve", help="comma list of: throughput, curve, sweep")
    ap.add_argument("--sweep-limit", type=int, default=None, help="test images for the sweep (default: all)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if not parts <= {"throughput", "curve", "sweep"}:
        ap.error(f"--parts takes throughput, curve, sweep; got {args.parts!r}")
    result = json.loads(args.json.read_text()) if args.json.is_file() else {"benchmark": "pretrain"}
    if "throughput" in parts:
        result.update(throughput_section(args))
    if "curve" in parts:
        result["default_model"] = {"name": "clip-vit-tiny-fashion",
                                   "accuracy_curve": accuracy_curve(ASSET_DIR / "train_log.jsonl"),
                                   "final": json.loads((ASSET_DIR / "metrics.json").read_text())
                                   if (ASSET_DIR / "metrics.json").is_file() else None}
    if "sweep" in parts:
        result["ptq_sweep"] = sweep_section(args.sweep_limit)
    write_json(args.json, result)
    print(f"wrote {args.json}")


def throughput_section(args: argparse.Namespace) -> dict:
    """Training images/s of every preset x thread count (x bf16), with the environment it was measured in."""
    steps = 3 if args.quick else 10
    rows = []
    for preset in args.presets.split(","):
        for threads in (int(t) for t in args.threads.split(",")):
            for bf16 in (False, True) if args.bf16 else (False,):
                rows.append(step_throughput(preset, args.batch, steps, threads, bf16))
                print(json.dumps(rows[-1]))
    load = os.getloadavg()
    return {"env": environment(), "load_average_after": [round(x, 2) for x in load],
            "note": "shared CPU: the load average shows how much of it other processes used during the run",
            "throughput": rows}


if __name__ == "__main__":
    main()
