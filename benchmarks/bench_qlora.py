"""QLoRA on lit-fashion at w2 GPTQ: LoRA adapters on the packed 2-bit layers vs the QAT row of qat.json.

1. The w2 GPTQ packed checkpoint (``lowbit quantize lit-fashion --recipe w2``; made once into ``--packed`` if
   missing), reloaded with ``lowbit.load``: zero-shot top-1 on the first ``--eval-samples`` Fashion-MNIST test
   images (the PTQ starting point).
2. ``lowbit finetune`` (``lowbit.workflows.finetune.run_finetune``): rank-``--lora`` adapters on ``--targets``,
   the contrastive + KL + cosine distillation loss against the float ``lit-fashion`` (the QAT row's loss), on the
   first ``--train-samples`` training images, ``--threads`` threads (the QAT row's count). Wall and CPU time of
   the training (teacher embeddings included) are compared with the QAT row's ``train_seconds``.
3. After save + load: the packed checkpoint loaded afresh, the saved PEFT adapters attached
   (``lowbit.quant.lora.load_adapters``), top-1 on the same images; and the merged packed checkpoint (adapters
   re-rounded into the 2-bit grid), with its merge error.

    flock /work/heavy.lock .venv/bin/python benchmarks/bench_qlora.py              # writes results/qlora.json
    flock /work/heavy.lock .venv/bin/python benchmarks/bench_qlora.py --steps 2 --train-samples 64 \\
        --eval-samples 64 --out /tmp/qlora-quick.json                               # quick
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

import lowbit
from lowbit.eval.env import environment
from lowbit.io import write_json
from lowbit.quant.lora import load_adapters
from lowbit.workflows.finetune import FinetuneArgs, run_finetune

RESULTS = Path(__file__).resolve().parent / "results"
NOTES = {
    "merge": "folding the adapters into a 2-bit grid (codes re-rounded on each layer's own scales) loses most of the "
             "update (compare merge.rel_rms with merge.delta_rel_rms): at 2 bits keep the adapters separate",
    "steps": "chosen by a 6-step probe to fit 0.8 x 1/4 of the QAT row's training time; the probe's steps pay for the "
             "teacher's embeddings of new images, so the estimate is conservative",
}
PROBE_STEPS = 6
BUDGET = 0.8  # of a quarter of the QAT row's training time: the model loads and the teacher come on top


def top1(model: Any, n: int) -> float:
    return float(lowbit.evaluate(model, "fashion-mnist", limit=n, footprint=False, progress=False)["metrics"]["top1"])


def qat_row() -> dict[str, Any]:
    doc = json.loads((RESULTS / "qat.json").read_text())
    row = doc["rows"]["w2"]["qat"]
    return {"top1": row["top1"], "train_seconds": row["train_seconds"], "threads": row.get("threads"),
            "float_top1": doc["float"]["top1"], "n": doc["n"], "file": "benchmarks/results/qat.json rows.w2.qat",
            "note": "QAT's w2 recipe is RTN-initialised both-towers w2 (conv1x1 + text linears); QLoRA starts from "
                    "the w2 preset's GPTQ checkpoint (the sweep's w2+gptq row)"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--packed", default="/tmp/qlora/w2gptq", help="w2 GPTQ checkpoint (made here if missing)")
    p.add_argument("--run-dir", default="/tmp/qlora/run")
    p.add_argument("--lora", type=int, default=8)
    p.add_argument("--targets", default="vision@conv1x1,projector")
    p.add_argument("--steps", type=int, default=0, help="0: as many as fit in 0.8 x 1/4 of QAT's time (probe)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--train-samples", type=int, default=1024)
    p.add_argument("--eval-samples", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "qlora.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0, load0 = time.perf_counter(), os.getloadavg()
    out: dict[str, Any] = {"command": "flock /work/heavy.lock .venv/bin/python benchmarks/bench_qlora.py "
                           + shlex.join(sys.argv[1:]), "config": vars(args), "n": args.eval_samples,
                           "eval": f"zero-shot top-1, first {args.eval_samples} Fashion-MNIST test images",
                           "qat_row": qat_row()}
    if not (Path(args.packed) / "manifest.json").is_file():
        model = lowbit.load("lit-fashion")
        t = time.perf_counter()
        report = lowbit.quantize(model, "w2", progress=False)
        lowbit.save(model, args.packed, report=report)
        out["quantize_seconds"] = round(time.perf_counter() - t, 1)
        del model
    out["ptq"] = {"top1": top1(lowbit.load(args.packed), args.eval_samples),
                  "command": f"lowbit quantize lit-fashion --recipe w2 --out {args.packed}"}
    qat_seconds = out["qat_row"]["train_seconds"]
    if args.steps == 0:  # auto: as many steps as fit in BUDGET of a quarter of QAT's time, from a probe run
        probe = run_finetune(FinetuneArgs(model=args.packed, out=args.run_dir + "-probe", lora=args.lora,
                                          targets=args.targets, steps=PROBE_STEPS, batch_size=args.batch_size,
                                          lr=args.lr, train_samples=args.train_samples, eval_samples=0,
                                          teacher="lit-fashion", progress=False, overwrite=True))
        # the probe's steps all pay for new teacher embeddings; later steps of the run mostly do not: conservative
        per_step = probe["train_seconds"] / PROBE_STEPS
        args.steps = max(10, int(BUDGET * qat_seconds / 4 / per_step))
        out["probe"] = {"steps": PROBE_STEPS, "train_seconds": probe["train_seconds"], "chosen_steps": args.steps}
    ft = FinetuneArgs(model=args.packed, out=args.run_dir, lora=args.lora, targets=args.targets, steps=args.steps,
                      batch_size=args.batch_size, lr=args.lr, train_samples=args.train_samples, eval_samples=0,
                      ckpt_every=args.steps, teacher="lit-fashion", merge=True, progress=False, overwrite=True)
    cpu0, t = time.process_time(), time.perf_counter()
    summary = run_finetune(ft)
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu0
    fresh = lowbit.load(args.packed)
    load_adapters(fresh, Path(args.run_dir) / "adapters")
    qlora_top1 = top1(fresh, args.eval_samples)
    merged_top1 = top1(lowbit.load(summary["merged_model"]), args.eval_samples)
    cmd = (f"lowbit finetune {args.packed} --lora {args.lora} --targets {shlex.quote(args.targets)} --teacher "
           f"lit-fashion --steps {args.steps} --batch-size {args.batch_size} --lr {args.lr} --train-samples "
           f"{args.train_samples} --eval-samples 0 --merge --out {args.run_dir}  # with {args.threads} thread(s)")
    out["qlora"] = {
        "top1_after_save_load": qlora_top1, "top1_merged_packed": merged_top1, "merge": summary.get("merge"),
        "train_seconds": summary["train_seconds"], "finetune_wall_seconds": round(wall, 1),
        "finetune_cpu_seconds": round(cpu, 1), "fraction_of_qat_train_seconds": round(summary["train_seconds"]
                                                                                         / qat_seconds, 3),
        "lora": summary["lora"], "last": summary["last"], "args": asdict(ft), "command": cmd,
        "adapters": summary["adapters"],
    }
    out["targets"] = {"top1_ge_0.84": qlora_top1 >= 0.84,
                      "time_le_quarter_of_qat": summary["train_seconds"] <= qat_seconds / 4}
    out["notes"] = NOTES
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["load_average"] = {"start": [round(x, 2) for x in load0], "end": [round(x, 2) for x in os.getloadavg()]}
    out["env"] = environment()
    write_json(Path(args.out), out)
    print(json.dumps({k: out[k] for k in ("ptq", "targets")} | {"qlora_top1": qlora_top1, "merged": merged_top1,
                      "train_seconds": summary["train_seconds"]}, indent=1))


if __name__ == "__main__":
    main()
