"""``lowbit qat``: the whole quantization-aware training run, from a model name to a packed checkpoint.

Loads the model twice (student and frozen float teacher), ``prepare_qat`` with the recipe, optionally runs
Block-AP (``lowbit.train.block_ap_stage``), trains end to end with distillation (``lowbit.train.qat``), folds
into the PTQ packed format and saves.

Run directory ``OUT``: ``checkpoints/``, ``train_log.jsonl``, ``qat_run.json`` (the arguments; a rerun with
different ones is refused), ``summary.json``, and ``model/`` — the folded packed checkpoint
(``lowbit.load("OUT/model")``, ``lowbit eval OUT/model``), written by rank 0 after the last step.

Example:
    >>> summary = run_qat(QATArgs(model="lit-fashion", recipe="vision=w1.58,text=w1.58", out="runs/q",
    ...                           steps=300))  # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from lowbit.data.base import ImageTextSet
from lowbit.errors import LowbitError, check_options, dataclass_from_options, unknown_choice
from lowbit.io import check_output, prepare_run_dir, register_output_kind, run_dir_kind, write_json
from lowbit.models.base import DualEncoder
from lowbit.quant.defaults import DEFAULT_CALIB_SAMPLES
from lowbit.train import distributed as D
from lowbit.train.block_ap_stage import BlockAPStage, run_block_ap_stage
from lowbit.train.loop import TrainConfig, TrainState
from lowbit.train.qat import TRAIN_MODES, QATLoss, train_qat
from lowbit.workflows.run_record import check_run_record

MODEL_DIR = "model"  # the folded packed checkpoint inside the run directory
RUN_FILE = "qat_run.json"
_RUN_KEYS = ("model", "recipe", "data", "batch_size", "seed", "train_samples", "distill", "task_loss", "train",
             "block_ap")
register_output_kind(run_dir_kind("qat-run", RUN_FILE))


@dataclass
class QATArgs:
    """Everything ``run_qat`` (and the ``lowbit qat`` command) takes."""

    model: str
    recipe: str
    out: str
    data: str = "fashion-mnist"
    steps: int = 300
    batch_size: int = 32
    lr: float = 5e-5
    scale_lr: float = 1.0
    weight_decay: float = 0.0
    warmup_steps: int = 20
    grad_clip: float = 1.0
    seed: int = 0
    train_samples: int = 5000
    eval_every: int = 0
    eval_samples: int = 500
    ckpt_every: int = 50
    log_every: int = 10
    loss: QATLoss = field(default_factory=QATLoss)
    train: str = "all"
    block_ap: BlockAPStage | None = None
    progress: bool = True
    calib_samples: int = DEFAULT_CALIB_SAMPLES  # for QAT quantizers that start from calibration statistics
    overwrite: bool = False  # write into an existing directory that is not a QAT run (never the model's own)


def _check_run_dir(args: QATArgs) -> None:
    """Refuse to resume a run directory that holds a different run; record this one otherwise (rank 0)."""
    record = {k: (asdict(args)[k] if k not in ("distill", "task_loss") else getattr(args.loss, k)) for k in _RUN_KEYS}
    check_run_record(args.out, RUN_FILE, "qat", record, asdict(args))


def _eval_task(data: ImageTextSet) -> str:
    return "zeroshot" if data.labels is not None and data.classnames else "retrieval"


def run_qat(args: QATArgs) -> dict[str, Any]:
    """Load ``args.model`` twice (student, teacher), ``prepare_qat`` with ``args.recipe``, train, fold, save.

    Returns (and writes to ``OUT/summary.json`` on rank 0) the starting and final quantization totals, the
    last logged losses, every evaluation, and where the packed model is. Works unchanged under torchrun.

    Example:
        >>> run_qat(QATArgs(model="lit-fashion", recipe="*=w1:binary", out="runs/b"))  # doctest: +SKIP
    """
    from lowbit.data import resolve_dataset
    from lowbit.eval import evaluate
    from lowbit.quant.calibration import calibration_from_dataset
    from lowbit.quant.fake_quant import QAT_QUANTIZERS
    from lowbit.quant.qat import convert_qat, prepare_qat
    from lowbit.quant.recipe import load_recipe
    from lowbit.workflows.checkpoint import save_quantized
    from lowbit.workflows.load import load

    args.loss.validate()
    if args.train not in TRAIN_MODES:
        raise unknown_choice("QAT train mode", args.train, TRAIN_MODES)
    if args.steps < 0 or (args.steps == 0 and args.block_ap is None):
        raise LowbitError(f"QAT steps must be >= 1 (or 0 with Block-AP); received {args.steps}")
    recipe = load_recipe(args.recipe)
    t0 = time.perf_counter()
    D.init_distributed()
    check_output(args.out, "qat-run", overwrite=args.overwrite, sources=[args.model, args.data])
    D.barrier()  # every rank has judged the directory before any writes into it
    if D.is_main():
        prepare_run_dir(args.out, "qat-run", overwrite=args.overwrite, sources=[args.model, args.data])
    D.barrier()
    _check_run_dir(args)
    D.barrier()
    train_set = resolve_dataset(args.data, split="train", limit=args.train_samples)
    eval_set = resolve_dataset(args.data, split="test", limit=args.eval_samples) if args.eval_samples else None
    teacher, student = load(args.model), load(args.model)
    calibration = None
    if any(rule.spec is not None and QAT_QUANTIZERS.get(rule.method).needs_calibration for rule in recipe.rules):
        calibration = calibration_from_dataset(student, args.data, n_samples=args.calib_samples)
    start_report = prepare_qat(student, recipe, calibration=calibration)

    def eval_fn(encoder: DualEncoder, step: int) -> dict[str, Any]:
        result = evaluate(encoder, _eval_task(eval_set), data=eval_set, footprint=False, progress=False)
        return {k: v for k, v in result["metrics"].items() if isinstance(v, float)}

    block_ap: dict[str, Any] | None = None
    if args.block_ap is not None:
        block_ap = run_block_ap_stage(student, teacher, train_set, args.block_ap, args.out, args.seed,
                                      progress=args.progress)
        if eval_set is not None and D.is_main():
            with torch.no_grad():
                block_ap["eval"] = eval_fn(student, 0)
    config = TrainConfig(steps=max(args.steps, 1), lr=args.lr, weight_decay=args.weight_decay,
                         warmup_steps=args.warmup_steps, batch_size=args.batch_size, grad_clip=args.grad_clip,
                         seed=args.seed, log_every=args.log_every, eval_every=args.eval_every,
                         ckpt_every=args.ckpt_every, out_dir=args.out, progress=args.progress)
    if args.steps == 0:  # Block-AP only: nothing end to end
        state = TrainState(step=0)
    else:
        state = train_qat(student, teacher, train_set, config, args.loss,
                          eval_fn if eval_set is not None else None, scale_lr=args.scale_lr, train_mode=args.train)
    summary: dict[str, Any] = {
        "block_ap": block_ap,
        "model": str(Path(args.out) / MODEL_DIR), "source": args.model, "recipe": recipe.name, "steps": state.step,
        "resumed_from": state.resumed_from, "world_size": D.world_size(), "last": state.last,
        "evals": [h for h in state.history if "eval" in h], "start_totals": start_report.totals()["total"],
    }
    if D.is_main():
        report = convert_qat(student)
        save_quantized(student, report, recipe, Path(args.out) / MODEL_DIR,
                       extra={"qat": {"args": asdict(args), "steps": state.step, "last": state.last}})
        summary["totals"] = report.totals()["total"]
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        write_json(Path(args.out) / "summary.json", summary)
    D.barrier()
    return summary


_BLOCK_STAGE_FIELDS = ("samples", "image_batch", "text_batch")


def qat(model_name: str, recipe: str, out_dir: str | Path, loss: QATLoss | dict[str, Any] | None = None,
        block_ap: BlockAPStage | dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
    """``run_qat`` from plain options: ``loss`` a ``QATLoss`` or its fields (distill, task_loss, task_weight,
    temperature), ``block_ap`` a ``BlockAPStage`` or its fields plus ``BlockAPConfig``'s (steps, lr, scale_lr,
    float_lr, match_norms, tail); ``options`` the other ``QATArgs`` fields. Unknown names are refused."""
    from lowbit.quant.block_ap import BlockAPConfig

    fixed = {"model", "recipe", "out", "loss", "block_ap"}
    check_options("qat", options, [f.name for f in fields(QATArgs) if f.name not in fixed])
    if not isinstance(loss, QATLoss):
        loss = dataclass_from_options(QATLoss, "the QAT loss", loss or {})
    if block_ap is not None and not isinstance(block_ap, BlockAPStage):
        stage = {k: v for k, v in block_ap.items() if k in _BLOCK_STAGE_FIELDS}
        block = {k: v for k, v in block_ap.items() if k not in _BLOCK_STAGE_FIELDS}
        block_ap = BlockAPStage(**stage, block=dataclass_from_options(BlockAPConfig, "Block-AP", block))
    try:
        return run_qat(QATArgs(model=model_name, recipe=recipe, out=str(out_dir), loss=loss, block_ap=block_ap,
                               **options))
    finally:
        D.cleanup_distributed()
