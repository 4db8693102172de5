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

``--llava``: the same after-save+load protocol on ``llava-fashion-hd`` (the lit rows of ``--out`` are kept):

4. Full precision (SmolLM2's "float" weights are its dequantized Q4_1 GGUF weights, see ``models/smollm.py``)
   and the language model at generic-grid w4 / w3 GPTQ (``bench_vlm.py``'s ``--generic-recipe`` at each width,
   its calibration), each evaluated on the first ``--vqa`` held-out fashion-vqa test questions (``bench_vlm``'s
   and ``bench_bytes``'s evaluation: ``lowbit.evaluate(model, "fashion-vqa")``, greedy answers).
5. ``lowbit finetune`` of each packed checkpoint: rank-``--llava-lora`` adapters on every linear of the LM's decoder
   blocks (the default llava targets: not the tied head, not the vision tower), answer-token cross-entropy on
   generated instructions about Fashion-MNIST *train* images (disjoint from the test images the evaluation asks
   about), with ``--llava-teacher`` plus the KL of the float model's answer logits; then the checkpoint loaded
   afresh, the saved adapters attached, evaluated again. ``--reuse-baselines`` takes the fp and PTQ rows (and
   the other widths' rows and the memory rows) from the section already in ``--out`` instead of re-measuring
   them (deterministic: same code, checkpoints and greedy decoding), each with the command that measured it.
6. Memory: peak resident memory (the process's high-water mark, VmHWM) of ``--mem-steps`` training
   steps at batch ``--llava-batch``, each in its own fresh subprocess on the same loop, data and batch: QLoRA on
   the w4 checkpoint vs full fine-tuning (AdamW on every language-model parameter) of the float model.

    flock /work/heavy.lock .venv/bin/python benchmarks/bench_qlora.py              # writes results/qlora.json
    flock /work/heavy.lock .venv/bin/python benchmarks/bench_qlora.py --steps 2 --train-samples 64 \\
        --eval-samples 64 --out /tmp/qlora-quick.json                               # quick
    .venv/bin/python benchmarks/bench_qlora.py --llava              # adds the "llava" section to results/qlora.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

import lowbit
from lowbit.eval.env import environment
from lowbit.eval.footprint import current_rss_mib
from lowbit.io import write_json
from lowbit.quant.lora import attach_lora, load_adapters
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


LLAVA = "llava-fashion-hd"
LLAVA_TOLERANCE_PT = {4: 0.5, 3: 1.5}  # the targets: QLoRA within this many points of full precision
LLAVA_NOTES = {
    "full_precision": "SmolLM2-135M-Instruct ships only as a Q4_1 GGUF: lowbit's full-precision LM is those weights "
                      "dequantized to float32 (models/smollm.py)",
    "data": "training: conversations generated about Fashion-MNIST train-split images (lowbit.data.vqa, "
            "fashion-vqa 'train'); evaluation: the first --vqa questions about test-split images. The question "
            "templates are shared, the images (and so the image-question pairs) are disjoint",
    "task_training": "the adapters are trained on the evaluated task's own (train-split) distribution, which the "
                     "full-precision model never was (only its projector was): QLoRA can pass full precision",
    "grad_checkpoint": "the recovery runs keep activations (faster); --grad-checkpoint recomputes them with the same "
                       "gradients (tests/workflows/test_finetune.py), so the memory rows' checkpointed pair applies "
                       "to the same training",
}


def vqa_eval(model: Any, n: int, reference: dict[str, Any] | None = None) -> dict[str, Any]:
    """fashion-vqa on the first ``n`` held-out questions (bench_vlm / bench_bytes's evaluation); KL and agreement
    of the first answer token against ``reference``."""
    result = lowbit.evaluate(model, "fashion-vqa", limit=n, reference=reference, footprint=False, progress=False)
    return result


def _metrics(result: dict[str, Any]) -> dict[str, Any]:
    m = result["metrics"]
    return {k: m[k] for k in ("accuracy", "n", "accuracy_footwear", "accuracy_item", "accuracy_yesno", "kl",
                              "agreement") if k in m}


def llava_recipe(bits: int) -> str:
    """bench_vlm.py's generic-grid recipe (GPTQ on lowbit's integer grid, head float) at ``bits`` for the LM."""
    from bench_vlm import GENERIC_RECIPE

    return GENERIC_RECIPE.replace("language=w4g32", f"language=w{bits}g32")


def llava_checkpoint(bits: int, root: Path) -> tuple[Path, float | None]:
    """The packed checkpoint of ``llava_recipe(bits)`` (quantized with bench_vlm's calibration if missing)."""
    from bench_vlm import CALIB_SAMPLES

    path = root / f"w{bits}gptq"
    if (path / "manifest.json").is_file():
        return path, None
    t = time.perf_counter()
    model = lowbit.load(LLAVA)
    report = lowbit.quantize(model, llava_recipe(bits), calib_data="fashion-mnist", calib_samples=CALIB_SAMPLES,
                             progress=False)
    lowbit.save(model, path, report=report, overwrite=True)
    return path, round(time.perf_counter() - t, 1)


def fresh_run_dir(path: Path) -> None:
    """A finetune run directory from an earlier benchmark run is removed (this run must train, not resume)."""
    import shutil

    if (path / "finetune_run.json").is_file():
        shutil.rmtree(path)


def llava_finetune_args(args: argparse.Namespace, packed: Path, out: Path, steps: int) -> FinetuneArgs:
    return FinetuneArgs(model=str(packed), out=str(out), lora=args.llava_lora, steps=steps,
                        batch_size=args.llava_batch, lr=args.llava_lr, train_samples=args.llava_train_samples,
                        warmup_steps=min(10, steps), eval_samples=0, ckpt_every=min(50, steps), log_every=10,
                        teacher=args.llava_teacher, distill="kl", task_weight=args.llava_task_weight, progress=False,
                        overwrite=True)


def llava_section(args: argparse.Namespace, previous: dict[str, Any] | None,
                  publish: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """fp, then per width PTQ and QLoRA, the memory probes after the first width; ``publish`` gets the section
    so far after each part (``complete`` false until the end), so a cut-short run still leaves its rows.

    ``previous``: the section of an earlier run of this script (``--reuse-baselines``): its fp and PTQ metrics
    are taken over instead of re-evaluated (same code, same packed checkpoints, greedy decoding: deterministic),
    its rows of widths not run now and its memory rows are kept, each with the command that measured it; the new
    QLoRA evaluations then have no fp reference (no kl / agreement)."""
    root = Path(args.llava_dir)
    log = Path(args.log) if args.log else None

    def say(msg: str) -> None:
        if log is not None:
            with log.open("a") as f:
                f.write(f"{time.strftime('%H:%M:%S')} {msg}\n")

    t0, load0 = time.perf_counter(), os.getloadavg()
    if previous is not None:
        if previous.get("n") != args.vqa:
            raise SystemExit(f"--reuse-baselines: the previous section has n={previous.get('n')}, not --vqa {args.vqa}")
        fp, fp_metrics = None, previous["fp"] | {"measured_by": previous["command"]}
    else:
        fp_model = lowbit.load(LLAVA)
        fp = vqa_eval(fp_model, args.vqa)
        del fp_model
        fp_metrics = _metrics(fp)
    fp_acc = fp_metrics["accuracy"]
    say(f"fp {fp_acc}")
    rows: dict[str, Any] = {}
    if previous is not None:  # rows of other widths, as measured then
        rows.update({k: r | {"measured_by": r.get("measured_by", previous["command"])}
                     for k, r in previous["rows"].items() if int(k[1:]) not in args.widths})
    out: dict[str, Any] = {"model": LLAVA, "n": args.vqa, "eval": f"fashion-vqa accuracy, first {args.vqa} held-out "
                           "test questions (greedy answers); kl / agreement: first answer token against fp",
                           "fp": fp_metrics, "rows": rows, "notes": LLAVA_NOTES, "threads": args.threads}
    if previous is not None and "memory" in previous and not (4 in args.widths and args.mem_steps):
        out["memory"] = previous["memory"] | {"measured_by": previous["memory"].get("measured_by",
                                                                                   previous["command"])}

    def snapshot(complete: bool) -> None:
        out["table"] = llava_table(fp_acc, rows)
        out["complete"] = complete
        out["seconds"] = round(time.perf_counter() - t0, 1)
        out["load_average"] = {"start": [round(x, 2) for x in load0], "end": [round(x, 2) for x in os.getloadavg()]}
        publish(out)

    steps_by_bits = dict(zip(args.widths, args.llava_steps, strict=True))
    for bits in args.widths:
        row_load0 = os.getloadavg()
        packed, quant_s = llava_checkpoint(bits, root)
        if previous is not None and f"w{bits}" in previous["rows"] and quant_s is None:
            before = previous["rows"][f"w{bits}"]
            ptq_metrics, ptq_by = before["ptq"], before.get("measured_by", previous["command"])
        else:
            ptq = vqa_eval(lowbit.load(str(packed)), args.vqa, reference=fp)
            ptq_metrics, ptq_by = _metrics(ptq), None
        say(f"w{bits} ptq {ptq_metrics['accuracy']} (quantize {quant_s} s)")
        run = root / f"w{bits}-run"
        fresh_run_dir(run)
        ft = llava_finetune_args(args, packed, run, steps_by_bits[bits])
        cpu0, t = time.process_time(), time.perf_counter()
        summary = run_finetune(ft)
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu0
        cpu0, t = time.process_time(), time.perf_counter()
        fresh = lowbit.load(str(packed))
        load_adapters(fresh, run / "adapters")
        qlora = vqa_eval(fresh, args.vqa, reference=fp)
        eval_wall, eval_cpu = time.perf_counter() - t, time.process_time() - cpu0
        del fresh
        acc = qlora["metrics"]["accuracy"]
        say(f"w{bits} qlora {acc} ({summary['train_seconds']} s, cpu {cpu:.0f} s)")
        log_rows = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
        rates = [h["samples_per_s"] for h in log_rows if "samples_per_s" in h]
        rows[f"w{bits}"] = {
            "recipe": llava_recipe(bits), "checkpoint": str(packed), "quantize_seconds": quant_s,
            "checkpoint_resolved": str(packed.resolve()),  # a --llava-dir may link an earlier run's checkpoint
            "ptq": ptq_metrics | ({"measured_by": ptq_by} if ptq_by else {}),
            "ptq_gap_pt": round(100 * (fp_acc - ptq_metrics["accuracy"]), 2),
            "qlora": _metrics(qlora) | {
                "steps": summary["steps"], "samples_seen": summary["steps"] * ft.batch_size,
                "train_seconds": summary["train_seconds"],
                "vision_token_seconds": summary.get("vision_token_seconds"),
                "finetune_wall_seconds": round(wall, 1), "finetune_cpu_seconds": round(cpu, 1),
                "eval_wall_seconds": round(eval_wall, 1), "eval_cpu_seconds": round(eval_cpu, 1),
                "median_samples_per_s": sorted(rates)[len(rates) // 2] if rates else None,
                "lora": summary["lora"], "last": summary["last"], "args": asdict(ft),
                "command": finetune_command(ft, args.threads),
            },
            "qlora_gap_pt": round(100 * (fp_acc - acc), 2), "target_gap_pt": LLAVA_TOLERANCE_PT.get(bits),
            "met": LLAVA_TOLERANCE_PT.get(bits) is not None and 100 * (fp_acc - acc) <= LLAVA_TOLERANCE_PT[bits],
            "load_average": {"start": [round(x, 2) for x in row_load0],
                             "end": [round(x, 2) for x in os.getloadavg()]},
            "timing_note": "wall seconds include any pauses of this job by the machine's timing jobs (SIGSTOP); "
                           "cpu seconds are this process's CPU time (time.process_time), 1 thread",
        }
        snapshot(False)
        if bits == 4 and args.mem_steps:
            out["memory"] = memory_rows(args, root)
            say(f"memory {out['memory']['ratio']} (no checkpointing: {out['memory']['no_checkpoint']['ratio']})")
            snapshot(False)
    snapshot(True)
    return out


def finetune_command(ft: FinetuneArgs, threads: int) -> str:
    """The ``lowbit finetune`` command line equal to ``ft``."""
    extra = "".join(f" --{k.replace('_', '-')} {v}" for k, v in (("teacher", ft.teacher),) if v)
    extra += f" --task-weight {ft.task_weight}" if ft.teacher else ""
    return (f"lowbit finetune {ft.model} --lora {ft.lora} --steps {ft.steps} --batch-size {ft.batch_size} --lr "
            f"{ft.lr} --train-samples {ft.train_samples} --warmup-steps {ft.warmup_steps}{extra} --eval-samples 0 "
            f"--out {ft.out}  # with {threads} thread(s)")


def llava_table(fp_acc: float, rows: dict[str, Any]) -> str:
    lines = ["| row | fashion-vqa acc | gap to fp (pt) | steps | train s |", "|---|---:|---:|---:|---:|",
             f"| full precision (dequantized Q4_1) | {fp_acc:.3f} | 0 | | |"]
    for name, r in rows.items():
        q = r["qlora"]
        lines.append(f"| {name} GPTQ (PTQ) | {r['ptq']['accuracy']:.3f} | {r['ptq_gap_pt']:.1f} | | |")
        lines.append(f"| {name} GPTQ + QLoRA | {q['accuracy']:.3f} | {r['qlora_gap_pt']:.1f} | {q['steps']} | "
                     f"{q['train_seconds']:.0f} |")
    return "\n".join(lines)


# --- memory: QLoRA on the w4 VLM vs full fine-tuning of the float LM ----------------------------------------------
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # see memory_rows' "allocator"


def vm_hwm_mib() -> float:
    """This process's peak resident set size (``VmHWM``), in MiB. Not ``getrusage``'s ru_maxrss: that one
    survives ``fork`` + ``execve``, so a probe started by a 2 GB parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def memory_probe(kind: str, packed: str, batch: int, steps: int, lora: int, recompute: bool) -> dict[str, Any]:
    """``steps`` training steps in this (fresh) process; its peak resident memory. ``qlora``: the packed
    checkpoint with adapters on the LM's decoder blocks; ``full``: the float model, AdamW on every LM parameter.
    ``recompute``: gradient checkpointing of the decoder blocks (``lowbit finetune --grad-checkpoint``)."""
    from lowbit.train.loop import TrainConfig, train
    from lowbit.workflows.finetune import AdapterAnswerLoss, checkpoint_blocks, llava_batches

    base = current_rss_mib()
    model = lowbit.load(packed if kind == "qlora" else LLAVA)
    if kind == "qlora":
        attach_lora(model, FinetuneArgs(model=packed, out="", lora=lora).lora_config(model))
    else:
        model.requires_grad_(False)
        model.language.requires_grad_(True)
    if recompute:
        checkpoint_blocks(model)
    loaded = current_rss_mib()
    batches, _, _ = llava_batches(model, "fashion-vqa", batch * steps, batch)
    ready = vm_hwm_mib()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    t = time.perf_counter()
    state = train(AdapterAnswerLoss(model), lambda m, b: m(b), batches, TrainConfig(
        steps=steps, lr=1e-5, batch_size=batch, weight_decay=0.0, progress=False, log_every=1))
    return {"kind": kind, "model": packed if kind == "qlora" else LLAVA, "grad_checkpoint": recompute,
            "trainable_params": trainable, "peak_rss_mib": round(vm_hwm_mib(), 1),
            "rss_after_imports_mib": round(base, 1), "rss_after_load_mib": round(loaded, 1),
            "peak_before_training_mib": round(ready, 1), "steps": steps,
            "batch": batch, "seconds": round(time.perf_counter() - t, 1), "loss": state.last.get("loss")}


def memory_rows(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """The probes, each in a fresh subprocess of this script (so none sees another's high-water mark)."""
    import subprocess

    from lowbit.workflows.finetune import llava_batches

    # the vision tokens of the probes' images are computed once here (cached by content): the probes read them
    llava_batches(lowbit.load(LLAVA), "fashion-vqa", args.llava_batch * args.mem_steps, args.llava_batch)
    packed = str(root / "w4gptq")
    pairs: dict[str, Any] = {}
    for recompute in (True, False):
        rows = {}
        for kind in ("qlora", "full"):
            cmd = [sys.executable, __file__, "--memory-probe", kind, "--packed", packed, "--llava-batch",
                   str(args.llava_batch), "--mem-steps", str(args.mem_steps), "--llava-lora", str(args.llava_lora),
                   "--threads", str(args.threads)] + (["--grad-checkpoint"] if recompute else [])
            done = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, **MALLOC_ENV})
            rows[kind] = json.loads(done.stdout.strip().splitlines()[-1])
        ratio = rows["qlora"]["peak_rss_mib"] / rows["full"]["peak_rss_mib"]
        above = [rows[k]["peak_rss_mib"] - rows[k]["rss_after_imports_mib"] for k in ("qlora", "full")]
        pairs["grad_checkpoint" if recompute else "no_checkpoint"] = {
            "qlora": rows["qlora"], "full": rows["full"], "ratio": round(ratio, 3),
            "ratio_above_imports": round(above[0] / above[1], 3), "met": ratio <= 0.4}
    return {**pairs, "target_ratio": 0.4, "ratio": pairs["grad_checkpoint"]["ratio"],
            "met": pairs["grad_checkpoint"]["met"],
            "measure": "peak resident set size (VmHWM of /proc/self/status) of a fresh process per probe running "
                       "the same training loop (lowbit.train.loop, AdamW) on the same batches: the whole process, "
                       "Python and torch included (ratio), and above the RSS right after the imports "
                       "(ratio_above_imports)",
            "fairness": "same script, data, batch, steps, loss (answer tokens), threads and activation strategy "
                        "(each pair both with or both without gradient checkpointing of the decoder blocks, as QLoRA "
                        "(Dettmers et al.) trains); full fine-tuning trains every language-model parameter (the "
                        "embedding table tied to the head included) with its AdamW moments; the vision tower and "
                        "projector are frozen in both; the features come from the shared on-disk cache",
            "allocator": f"{MALLOC_ENV}: glibc otherwise serves the multi-MB activation tensors from its heap and "
                         "keeps freed ones resident, so RSS would measure the allocator's history, not live memory; "
                         "the same setting for every probe",
            "command": f"{' '.join(f'{k}={v}' for k, v in MALLOC_ENV.items())} {sys.executable} "
                       f"benchmarks/bench_qlora.py --memory-probe qlora|full --packed {packed} --llava-batch "
                       f"{args.llava_batch} --mem-steps {args.mem_steps} --threads {args.threads} [--grad-checkpoint]"}


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
    p.add_argument("--llava", action="store_true", help="the llava-fashion-hd section (lit rows of --out kept)")
    p.add_argument("--vqa", type=int, default=500, help="held-out fashion-vqa questions")
    p.add_argument("--widths", type=lambda t: [int(x) for x in t.split(",")], default=[4, 3])
    p.add_argument("--llava-steps", type=lambda t: [int(x) for x in t.split(",")], default=[100, 100],
                   help="steps per width")
    p.add_argument("--llava-lora", type=int, default=8)
    p.add_argument("--llava-lr", type=float, default=1e-3)
    p.add_argument("--llava-batch", type=int, default=8)
    p.add_argument("--llava-train-samples", type=int, default=2000)
    p.add_argument("--llava-dir", default="/tmp/qlora-llava")
    p.add_argument("--llava-teacher", default=None,
                   help="distil the answer logits of this float llava (e.g. llava-fashion-hd) on top of the CE")
    p.add_argument("--llava-task-weight", type=float, default=0.5, help="CE weight when distilling")
    p.add_argument("--mem-steps", type=int, default=3, help="memory probe steps (0: no memory rows)")
    p.add_argument("--memory-probe", choices=("qlora", "full"), help=argparse.SUPPRESS)
    p.add_argument("--grad-checkpoint", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--reuse-baselines", action="store_true",
                   help="--llava: take fp / PTQ metrics, other widths' rows and the memory rows from --out's section")
    p.add_argument("--log", default=None, help="progress lines appended here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.packed, args.llava_batch, args.mem_steps,
                                      args.llava_lora, args.grad_checkpoint)))
        return
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    if args.llava:
        command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_qlora.py " + shlex.join(sys.argv[1:])

        def publish(section: dict[str, Any]) -> None:
            write_json(Path(args.out), {**previous, "llava": section | {"command": command, "env": environment()}})

        if args.reuse_baselines and "llava" not in previous:
            raise SystemExit(f"--reuse-baselines: {args.out} has no llava section to take the baselines from")
        llava = llava_section(args, previous["llava"] if args.reuse_baselines else None, publish)
        print(llava["table"])
        print(json.dumps({k: {"met": r["met"], "gap": r["qlora_gap_pt"]} for k, r in llava["rows"].items()}
                         | {"memory": llava.get("memory", {}).get("ratio")}))
        return
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
    if "llava" in previous:
        out["llava"] = previous["llava"]
    write_json(Path(args.out), out)
    print(json.dumps({k: out[k] for k in ("ptq", "targets")} | {"qlora_top1": qlora_top1, "merged": merged_top1,
                      "train_seconds": summary["train_seconds"]}, indent=1))


if __name__ == "__main__":
    main()
