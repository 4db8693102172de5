"""The ``lowbit qat`` verb: quantization-aware training with distillation (``lowbit.workflows.qat.run_qat``).

``register_qat_cli(sub)`` adds it to ``lowbit``'s sub-command parser (one line in ``lowbit.cli``);
``python -m lowbit.cli.qat qat ...`` runs it stand-alone, which is also what ``torchrun`` launches::

    lowbit qat lit-fashion --recipe vision=w1.58,text=w1.58 --steps 300 --out runs/t
    torchrun --nproc_per_node 2 -m lowbit.cli.qat qat lit-fashion --recipe ... --out runs/t
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from lowbit import api
from lowbit.cli.base import OVERWRITE_HELP, exit_process, is_main_process, run_verbs


def cmd_qat(args: argparse.Namespace) -> None:
    """Quantization-aware training of MODEL with a recipe, distilled from the float model; resumes from OUT."""
    block_ap = None
    if args.block_ap:
        block_ap = {"samples": args.block_ap_samples, "steps": args.block_ap_steps, "lr": args.block_ap_lr,
                    "scale_lr": args.block_ap_scale_lr, "float_lr": args.block_ap_float_lr,
                    "match_norms": not args.no_match_norms, "tail": not args.block_ap_no_tail}
    summary = api.qat(
        args.model, args.recipe, args.out, data=args.data, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, scale_lr=args.scale_lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, seed=args.seed, train_samples=args.train_samples,
        eval_every=args.eval_every, eval_samples=args.eval_samples, ckpt_every=args.ckpt_every,
        log_every=args.log_every, progress=not args.no_progress, train=args.train, block_ap=block_ap,
        overwrite=args.overwrite,
        loss={"distill": args.distill, "task_loss": args.task_loss, "task_weight": args.task_weight,
              "temperature": args.temperature},
    )
    if is_main_process():
        print(summary_line(summary))


def summary_line(summary: dict[str, Any]) -> str:
    """One line for the terminal."""
    evals = summary.get("evals") or []
    last_eval = json.dumps({k: round(v, 4) for k, v in (evals[-1]["eval"] if evals else {}).items()})
    bits = (summary.get("totals") or summary.get("start_totals") or {}).get("bits_per_weight", 0.0)
    return (f"QAT {summary['steps']} steps on {summary['world_size']} process(es); eval {last_eval}; "
            f"{bits:.2f} bits/weight; model: {summary['model']}")


def add_qat_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``lowbit qat`` (used by ``register_qat_cli``)."""
    p.set_defaults(func=cmd_qat)
    p.add_argument("model", help="built-in name (lit-fashion) or CLIP/SigLIP directory to quantize")
    p.add_argument("--recipe", required=True,
                   help="preset, YAML path or short string, e.g. 'vision=w1:binary,text=w1.58,projector=w8'")
    p.add_argument("--out", required=True, help="run directory: checkpoints, log, summary.json, model/ (packed)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--data", default="fashion-mnist", help="image-text data: dataset name or folder")
    p.add_argument("--steps", type=int, default=300, help="end-to-end steps (0: Block-AP only)")
    p.add_argument("--train", default="all", choices=["all", "scales"],
                   help="end to end, train latent weights and steps (all) or only the steps (scales: E2E-QP)")
    p.add_argument("--block-ap", action="store_true",
                   help="first reconstruct block by block against the float model (EfficientQAT Block-AP)")
    p.add_argument("--block-ap-samples", type=int, default=512, help="calibration images for Block-AP")
    p.add_argument("--block-ap-steps", type=int, default=100, help="Adam steps per block")
    p.add_argument("--block-ap-lr", type=float, default=1e-4, help="Block-AP learning rate of latent weights")
    p.add_argument("--block-ap-scale-lr", type=float, default=1e-3, help="Block-AP learning rate of the steps")
    p.add_argument("--block-ap-float-lr", type=float, default=1e-3,
                   help="Block-AP learning rate of each block's float parameters (norms, biases; 0: frozen)")
    p.add_argument("--no-match-norms", action="store_true",
                   help="do not re-estimate batch-norm statistics of quantized blocks before Block-AP")
    p.add_argument("--block-ap-no-tail", action="store_true",
                   help="reconstruct each tower's last block on its output, not through pooling + projector to the "
                        "normalised embedding")
    p.add_argument("--batch-size", type=int, default=32, help="global batch size (split over processes)")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate of the latent weights")
    p.add_argument("--scale-lr", type=float, default=1.0, help="learning-rate multiplier of the quantizer steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-samples", type=int, default=5000, help="training images (first N of the train split)")
    p.add_argument("--distill", default="both", choices=["kl", "cosine", "both", "none"])
    p.add_argument("--task-loss", default="clip", choices=["clip", "siglip", "none"])
    p.add_argument("--task-weight", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0, help="distillation temperature")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    p.add_argument("--eval-samples", type=int, default=500, help="test samples per evaluation (0: none)")
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--no-progress", action="store_true")


def register_qat_cli(sub: Any) -> None:
    """Add ``qat`` to ``lowbit``'s sub-command parser (``sub`` from ``add_subparsers``)."""
    p = sub.add_parser("qat", help=(cmd_qat.__doc__ or "").splitlines()[0], description=cmd_qat.__doc__)
    add_qat_arguments(p)


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (``python -m lowbit.cli.qat qat ...``), same exit codes as ``lowbit``."""
    return run_verbs(register_qat_cli, __doc__, argv)


if __name__ == "__main__":
    exit_process(main())
