"""Command-line verbs of training and data preparation: ``lowbit train clip`` and ``lowbit data shard``.

``register_cli(sub)`` adds both verbs to ``lowbit``'s sub-command parser (one line in ``lowbit.cli``);
``python -m lowbit.cli.train ...`` runs them stand-alone, which is also what ``torchrun`` launches::

    torchrun --nproc_per_node 2 -m lowbit.cli.train train clip --data fashion-mnist --steps 100 --out runs/a
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from lowbit import api
from lowbit.cli.base import OVERWRITE_HELP, exit_process, is_main_process, run_verbs
from lowbit.errors import LowbitError


def cmd_train_clip(args: argparse.Namespace) -> None:
    """Pre-train a ViT dual encoder from scratch (CLIP or SigLIP loss); resumes from OUT when it has a checkpoint."""
    summary = api.train_clip(
        args.data, args.out, model=args.model, loss=args.loss, steps=args.steps,
            batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
            grad_clip=args.grad_clip, bf16=args.bf16, seed=args.seed, log_every=args.log_every,
            eval_every=args.eval_every, eval_task=args.eval_task or "", eval_limit=args.eval_limit,
            ckpt_every=args.ckpt_every, patch_dropout=args.patch_dropout, captions=args.captions,
            positives=args.positives,
            num_workers=args.num_workers, limit=args.limit, progress=not args.no_progress,
            preset_overrides=_overrides(args.arch), export_fp16=args.export_fp16, overwrite=args.overwrite,
    )
    if is_main_process():
        print(summary_line(summary))


def summary_line(summary: dict[str, Any]) -> str:
    """One line for the terminal."""
    ev = summary.get("final_eval") or {}
    metric = json.dumps({k: round(v, 4) for k, v in ev.items() if isinstance(v, float)})
    return (f"trained {summary['steps']} steps on {summary['world_size']} process(es) in {summary['seconds']} s; "
            f"eval {metric}; model: {summary['model']}")


def _overrides(items: list[str] | None) -> dict[str, int]:
    """``["patch_size=8", "vision_layers=6"]`` -> ``{"patch_size": 8, "vision_layers": 6}``."""
    out: dict[str, int] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise LowbitError(f"--arch takes FIELD=INTEGER; received {item!r}; accepted: e.g. patch_size=8")
        out[key.strip()] = int(value)
    return out


def cmd_data_shard(args: argparse.Namespace) -> None:
    """Write a dataset (any supported spec) as webdataset tar shards in the img2dataset layout."""
    manifest = api.shard_dataset(args.src, args.out, shard_size=args.shard_size, split=args.split, limit=args.limit,
                                 image_format=args.format, overwrite=args.overwrite)
    print(f"wrote {manifest['samples']} samples in {len(manifest['shards'])} shards to {args.out}"
          + (f" ({manifest['skipped']} unreadable images skipped)" if manifest["skipped"] else ""))


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train models from scratch (train clip)", description=__doc__)
    tsub = p.add_subparsers(dest="train_what", required=True, parser_class=type(p))
    c = tsub.add_parser("clip", help=(cmd_train_clip.__doc__ or "").splitlines()[0], description=cmd_train_clip.__doc__)
    c.set_defaults(func=cmd_train_clip)
    c.add_argument("--model", default="tiny", help="size preset: tiny, small")
    c.add_argument("--arch", action="append", metavar="FIELD=N",
                   help="override a preset field, e.g. --arch patch_size=8 --arch text_layers=2 (repeatable)")
    c.add_argument("--data", required=True,
                   help="dataset name(s), folder(s) or one shard directory; comma-separated, e.g. fashion-mnist,shapes")
    c.add_argument("--out", required=True, help="run directory: checkpoints, log, tokenizer, exported model/")
    c.add_argument("--loss", default="clip", choices=["clip", "siglip"])
    c.add_argument("--steps", type=int, default=1000)
    c.add_argument("--batch-size", type=int, default=256, help="global batch size (split over processes)")
    c.add_argument("--lr", type=float, default=1e-3)
    c.add_argument("--weight-decay", type=float, default=0.1)
    c.add_argument("--warmup-steps", type=int, default=100)
    c.add_argument("--grad-clip", type=float, default=1.0)
    c.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--log-every", type=int, default=20)
    c.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    c.add_argument("--eval-task", default="fashion-mnist", help="lowbit eval task; '' to skip evaluation")
    c.add_argument("--eval-limit", type=int, default=2000, help="test samples per evaluation")
    c.add_argument("--ckpt-every", type=int, default=200)
    c.add_argument("--patch-dropout", type=float, default=0.0, help="FLIP: fraction of patch tokens dropped")
    c.add_argument("--captions", default="auto", choices=["auto", "captions", "templates"],
                   help="templates: class-name prompts for labelled data; auto: templates when captions only "
                        "restate the label")
    c.add_argument("--positives", default="diagonal", choices=["diagonal", "identical"],
                   help="identical: pairs with the same caption text are positives (UniCL), and templated data "
                        "draws one prompt per class per step")
    c.add_argument("--num-workers", type=int, default=2, help="data loader workers (shard directories only)")
    c.add_argument("--limit", type=int, help="use the first N samples of each dataset")
    c.add_argument("--export-fp16", metavar="DIR", help="also write the final model with float16 weights to DIR")
    c.add_argument("--no-progress", action="store_true")
    c.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def _add_data(sub: Any) -> None:
    p = sub.add_parser("data", help="prepare data (data shard)", description=__doc__)
    dsub = p.add_subparsers(dest="data_what", required=True, parser_class=type(p))
    s = dsub.add_parser("shard", help=(cmd_data_shard.__doc__ or "").splitlines()[0],
                        description=cmd_data_shard.__doc__)
    s.set_defaults(func=cmd_data_shard)
    s.add_argument("src", help="dataset name (fashion-mnist, shapes), folder or index file")
    s.add_argument("--out", required=True, help="output directory (written atomically)")
    s.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard")
    s.add_argument("--split", default="train")
    s.add_argument("--limit", type=int)
    s.add_argument("--format", default="jpg", choices=["jpg", "png", "webp"])
    s.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def register_cli(sub: Any) -> None:
    """Add ``train`` and ``data`` to ``lowbit``'s sub-command parser (``sub`` from ``add_subparsers``)."""
    _add_train(sub)
    _add_data(sub)


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (``python -m lowbit.cli.train``), same errors and exit codes as ``lowbit``."""
    return run_verbs(register_cli, __doc__, argv)


if __name__ == "__main__":
    exit_process(main())

