"""The ``lowbit finetune`` verb: QLoRA adapters on a low-bit model (``lowbit.workflows.finetune.run_finetune``).

``register_finetune_cli(sub)`` adds it to ``lowbit``'s sub-command parser (one line in ``lowbit.cli``);
``python -m lowbit.cli.finetune finetune ...`` runs it stand-alone, which is also what ``torchrun`` launches::

    lowbit finetune runs/w2 --lora 8 --targets vision@conv1x1 --teacher lit-fashion --steps 200 --out runs/ft
    torchrun --nproc_per_node 2 -m lowbit.cli.finetune finetune runs/w2 --lora 8 ... --out runs/ft
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from lowbit import api
from lowbit.cli.base import OVERWRITE_HELP, exit_process, is_main_process, run_verbs


def cmd_finetune(args: argparse.Namespace) -> None:
    """Train LoRA adapters on MODEL's packed layers (QLoRA); saves them in PEFT format to OUT/adapters."""
    summary = api.finetune(
        args.model, args.out, lora=args.lora, targets=args.targets, alpha=args.alpha, dropout=args.dropout,
        data=args.data, steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, seed=args.seed, train_samples=args.train_samples, eval_every=args.eval_every,
        eval_samples=args.eval_samples, ckpt_every=args.ckpt_every, log_every=args.log_every, teacher=args.teacher,
        distill=args.distill, task_loss=args.task_loss, task_weight=args.task_weight, temperature=args.temperature,
        turns=args.turns,
        merge=args.merge, grad_checkpoint=args.grad_checkpoint, progress=not args.no_progress, overwrite=args.overwrite,
    )
    if is_main_process():
        print(summary_line(summary))


def summary_line(summary: dict[str, Any]) -> str:
    """One line for the terminal."""
    evals = summary.get("evals") or []
    last_eval = json.dumps({k: round(v, 4) for k, v in (evals[-1]["eval"] if evals else {}).items()})
    merged = ""
    if "merge" in summary:
        merged = f"; merged (rel. RMS error {summary['merge']['rel_rms']:.3g}): {summary['merged_model']}"
    return (f"QLoRA {summary['steps']} steps, {summary['lora']['layers']} adapters "
            f"({summary['lora']['trainable_params']} params); eval {last_eval}; adapters: {summary['adapters']}"
            f"{merged}")


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``lowbit finetune``."""
    p.set_defaults(func=cmd_finetune)
    p.add_argument("model", help="packed checkpoint directory (or any model lowbit.load reads)")
    p.add_argument("--out", required=True, help="run directory: checkpoints, log, adapters/ (PEFT), summary.json")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--lora", type=int, default=8, help="adapter rank r")
    p.add_argument("--targets", default=None,
                   help="layers to adapt: TOWER[/PATTERN][@KIND+KIND] items, comma separated (kinds: linear, "
                        "conv1x1), e.g. 'vision@conv1x1,text/*attention*' (default: every layer of a dual encoder; "
                        "for llava the language model's decoder blocks, not its output head)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (scaling alpha/r; default 2r)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout on the adapters' input")
    p.add_argument("--data", default=None,
                   help="training data (default: fashion-mnist for dual encoders, fashion-vqa for llava)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32, help="global batch size (split over processes)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-samples", type=int, default=2000, help="training samples (first N of the train split)")
    p.add_argument("--teacher", default=None,
                   help="float model to distil from, e.g. lit-fashion (similarity KL + embedding cosine) or "
                        "llava-fashion-hd (KL of the answer-token logits)")
    p.add_argument("--distill", default="both", choices=["kl", "cosine", "both", "none"],
                   help="distillation terms with --teacher (llava: kl or both, the answer-logit KL)")
    p.add_argument("--task-loss", default="clip", choices=["clip", "siglip", "none"],
                   help="dual encoders: the contrastive loss; llava: any but none keeps the answer cross-entropy")
    p.add_argument("--task-weight", type=float, default=0.5, help="weight of the task loss when distilling")
    p.add_argument("--temperature", type=float, default=1.0, help="distillation temperature T (loss scaled by T^2)")
    p.add_argument("--turns", type=int, default=1, help="llava: conversation turns per training image")
    p.add_argument("--merge", action="store_true",
                   help="also fold the adapters into a new packed checkpoint OUT/model (re-rounded on each layer's "
                        "grid; the merge error is reported)")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="llava: recompute each decoder block in the backward instead of keeping its activations "
                        "(less memory, ~1 more forward per step; the same gradients)")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    p.add_argument("--eval-samples", type=int, default=500, help="test samples per evaluation (0: none)")
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--no-progress", action="store_true")


def register_finetune_cli(sub: Any) -> None:
    """Add ``finetune`` to ``lowbit``'s sub-command parser (``sub`` from ``add_subparsers``)."""
    p = sub.add_parser("finetune", help=(cmd_finetune.__doc__ or "").splitlines()[0], description=cmd_finetune.__doc__)
    add_finetune_arguments(p)


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (``python -m lowbit.cli.finetune finetune ...``), same exit codes as ``lowbit``."""
    return run_verbs(register_finetune_cli, __doc__, argv)


if __name__ == "__main__":
    exit_process(main())
