"""``lowbit qat``: quantization-aware training of both towers, distilled from the frozen float model.

The student is the model with fake-quantized layers (``lowbit.quant.qat.prepare_qat``: LSQ straight-through
estimators with learnable steps, Esser et al. 2020, arXiv:1902.08153); the teacher is the same model left in
float. Each step sees image–caption pairs (a dataset's captions, or a class-name template drawn per sample
and step) and minimises

    task_weight * contrastive(student)                    CLIP softmax (Radford et al. 2021) or SigLIP sigmoid
  + kl_weight   * KL(teacher || student similarity rows)  image->text and text->image, over the global batch
  + cos_weight  * (1 - cos(student emb, teacher emb))     image and text embeddings

(``--distill kl|cosine|both|none`` picks the distillation terms; Hinton et al. 2015 for KL distillation). The
loop is the shared one (``lowbit.train.loop.train``): warm-up + cosine schedule, AdamW, checkpoints every K
steps with exact resume, DDP under torchrun (gloo on CPU). Both models run in eval mode throughout (frozen
batch-norm statistics, no dropout): QAT adapts weights and steps, not normalisation statistics.

Run directory ``OUT``: ``checkpoints/``, ``train_log.jsonl``, ``qat_run.json`` (the arguments; a rerun with
different ones is refused), ``summary.json``, and ``model/`` — the folded packed checkpoint
(``lowbit.load("OUT/model")``, ``lowbit eval OUT/model``), written by rank 0 after the last step.

Example:
    >>> summary = run_qat(QATArgs(model="lit-fashion", recipe="vision=w1.58,text=w1.58", out="runs/q",
    ...                           steps=300))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.data.base import ImageTextSet
from lowbit.errors import LowbitError, unknown_choice
from lowbit.io import write_json
from lowbit.models.base import DualEncoder
from lowbit.train import distributed as D
from lowbit.train.block_ap_stage import BlockAPStage, run_block_ap_stage
from lowbit.train.loop import LossFn, TrainConfig, TrainState, train, unwrap
from lowbit.train.losses import clip_loss, embedding_cosine_loss, siglip_loss
from lowbit.train.sampling import BatchFactory, index_batches

DISTILL_MODES = ("kl", "cosine", "both", "none")
TASK_LOSSES = ("clip", "siglip", "none")
MODEL_DIR = "model"  # the folded packed checkpoint inside the run directory
RUN_FILE = "qat_run.json"
_RUN_KEYS = ("model", "recipe", "data", "batch_size", "seed", "train_samples", "distill", "task_loss", "train",
             "block_ap")
TRAIN_MODES = ("all", "scales")  # what the end-to-end phase trains: latent weights + steps, or steps only


@dataclass
class QATLoss:
    """Weights of the QAT objective (module docstring)."""

    distill: str = "both"
    task_loss: str = "clip"
    task_weight: float = 0.5
    kl_weight: float = 1.0
    cos_weight: float = 1.0
    temperature: float = 1.0

    def validate(self) -> None:
        if self.distill not in DISTILL_MODES:
            raise unknown_choice("distillation mode", self.distill, DISTILL_MODES)
        if self.task_loss not in TASK_LOSSES:
            raise unknown_choice("task loss", self.task_loss, TASK_LOSSES)
        if self.temperature <= 0:
            raise LowbitError(f"distillation temperature must be > 0; received {self.temperature}")
        if self.task_loss == "none" and self.distill == "none":
            raise LowbitError("QAT needs a loss: received task_loss='none' and distill='none'; accepted: either set")


class PairEncoder(nn.Module):
    """What DDP wraps: ``forward(pixels, tokens) -> (image emb [B, D], text emb [B, D])`` of a dual encoder.

    ``train()`` keeps the encoder itself in eval mode (frozen batch-norm statistics, no dropout).
    """

    def __init__(self, model: DualEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor, tokens: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode_image(pixels), self.model.encode_text(tokens)

    def train(self, mode: bool = True) -> PairEncoder:
        super().train(mode)
        self.model.eval()
        return self


# --- data -------------------------------------------------------------------------------------------------------
def sample_caption(data: ImageTextSet, index: int, step: int, seed: int) -> str:
    """The caption of sample ``index`` at ``step``: its own caption, else a template drawn from (seed, step,
    index) — the same on any number of processes and after a resume."""
    if data.captions:
        return data.captions[index]
    if data.labels is None or not data.classnames:
        raise LowbitError(f"dataset {data.name!r} has neither captions nor labels; QAT needs image-text pairs")
    templates = data.templates or ["{}"]
    t = int(np.random.default_rng([seed, step, index]).integers(len(templates)))
    return templates[t].replace("{}", data.classnames[data.labels[index]], 1)


class TeacherCache:
    """Teacher embeddings of the training set, computed on first use in FIXED chunks of ``chunk`` dataset
    indices (and, for templated captions, all template x class prompts at once), so every value is the same
    whatever batch first needed it: a resumed or data-parallel run sees bit-identical targets.
    """

    def __init__(self, teacher: DualEncoder, data: ImageTextSet, chunk: int = 64) -> None:
        self.teacher, self.data, self.chunk = teacher.eval(), data, chunk
        self.images: dict[int, torch.Tensor] = {}
        self.texts: dict[int, torch.Tensor] = {}  # by dataset index (datasets with captions)
        self.prompts: dict[str, torch.Tensor] = {}  # by prompt (templated datasets)

    @torch.no_grad()
    def _fill(self, index: int, store: dict[int, torch.Tensor], encode: Any) -> None:
        start = index - index % self.chunk
        stop = min(start + self.chunk, len(self.data))
        for i, row in zip(range(start, stop), encode(start, stop), strict=True):
            store[i] = row.clone()

    @torch.no_grad()
    def _fill_prompts(self) -> None:
        data = self.data
        prompts = list(dict.fromkeys(t.replace("{}", c, 1) for c in data.classnames or [] for t in data.templates))
        for s in range(0, len(prompts), self.chunk):
            part = prompts[s : s + self.chunk]
            self.prompts.update(zip(part, self.teacher.encode_text(self.teacher.tokenize(part)), strict=True))

    def embed(self, indices: list[int], captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher (image [B, D], text [B, D]) embeddings of samples ``indices`` paired with ``captions``."""
        t, data = self.teacher, self.data
        for i in indices:
            if i not in self.images:
                self._fill(i, self.images, lambda a, b: t.encode_image(t.preprocess(data.images[a:b])))
        if data.captions:
            for i in indices:
                if i not in self.texts:
                    self._fill(i, self.texts, lambda a, b: t.encode_text(t.tokenize(data.captions[a:b])))
            texts = [self.texts[i] for i in indices]
        else:
            if not self.prompts:
                self._fill_prompts()
            texts = [self.prompts[c] for c in captions]
        return torch.stack([self.images[i] for i in indices]), torch.stack(texts)


def qat_batches(student: DualEncoder, teacher: TeacherCache, data: ImageTextSet, global_batch: int,
                seed: int) -> BatchFactory:
    """Resumable batches of ``{"pixels", "tokens", "teacher_image", "teacher_text"}`` over ``data``."""

    def collate(indices: np.ndarray, step: int) -> dict[str, Any]:
        idx = [int(i) for i in indices]
        captions = [sample_caption(data, i, step, seed) for i in idx]
        t_img, t_txt = teacher.embed(idx, captions)
        return {"pixels": student.preprocess([data.images[i] for i in idx]), "tokens": student.tokenize(captions),
                "teacher_image": t_img, "teacher_text": t_txt}

    return index_batches(len(data), global_batch, seed, collate)


# --- loss -------------------------------------------------------------------------------------------------------
def _row_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), log_target=True,
                    reduction="batchmean")


def gathered_kl(img: torch.Tensor, txt: torch.Tensor, t_img: torch.Tensor, t_txt: torch.Tensor,
                scale: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) over similarity rows, this rank's images vs ALL texts and texts vs all images.

    Rows are this rank's samples [B, W*B], so the mean over ranks is the one-process loss of the global
    batch (as ``losses.clip_loss``). Times T² (Hinton et al. 2015). ``scale`` multiplies cosines (exp of
    the model's logit scale).
    """
    all_txt, all_img = D.all_gather_with_grad(txt), D.all_gather_with_grad(img)
    all_t_txt, all_t_img = D.all_gather_with_grad(t_txt), D.all_gather_with_grad(t_img)
    s = scale / temperature
    i2t = _row_kl(s * img @ all_txt.T, s * t_img @ all_t_txt.T)  # [B, W*B] rows
    t2i = _row_kl(s * txt @ all_img.T, s * t_txt @ all_t_img.T)
    return 0.5 * (i2t + t2i) * temperature**2


def qat_loss_fn(weights: QATLoss) -> LossFn:
    """The loss_fn for ``lowbit.train.loop.train`` (model: a possibly DDP-wrapped ``PairEncoder``)."""
    weights.validate()

    def loss_fn(model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        img, txt = model(batch["pixels"], batch["tokens"])
        t_img, t_txt = batch["teacher_image"].to(img.dtype), batch["teacher_text"].to(txt.dtype)
        enc: DualEncoder = unwrap(model).model
        out: dict[str, torch.Tensor] = {}
        total = img.new_zeros(())
        if weights.task_loss == "clip":
            out["task"] = clip_loss(img, txt, enc.logit_scale)
        elif weights.task_loss == "siglip":
            bias = enc.logit_bias
            out["task"] = siglip_loss(img, txt, enc.logit_scale, bias if bias is not None else img.new_zeros(()))
        if "task" in out:
            total = total + weights.task_weight * out["task"]
        if weights.distill in ("kl", "both"):
            scale = enc.logit_scale.detach().exp()
            out["kl"] = gathered_kl(img, txt, t_img, t_txt, scale, weights.temperature)
            total = total + weights.kl_weight * out["kl"]
        if weights.distill in ("cosine", "both"):
            out["cos"] = 0.5 * (embedding_cosine_loss(img, t_img) + embedding_cosine_loss(txt, t_txt))
            total = total + weights.cos_weight * out["cos"]
        out["loss"] = total
        return out

    return loss_fn


# --- training ---------------------------------------------------------------------------------------------------
def qat_param_groups(student: nn.Module, weight_decay: float, scale_lr: float = 1.0,
                     train: str = "all") -> list[dict[str, Any]]:
    """AdamW groups: latent weights (with decay), quantizer steps/zero points (no decay, ``lr_scale``).

    ``train="scales"`` leaves the latent weights out (EfficientQAT's E2E-QP: only the steps train end to end).
    """
    from lowbit.quant.qat import qat_parameters

    if train not in TRAIN_MODES:
        raise unknown_choice("QAT train mode", train, TRAIN_MODES)
    params = qat_parameters(student)
    if not params["weights"]:
        raise LowbitError("nothing to train: the model has no QAT layers; does the recipe match any layer?")
    quant = {"params": params["quant"], "weight_decay": 0.0, "lr_scale": scale_lr}
    if train == "scales":
        for p in params["weights"]:
            p.requires_grad_(False)
        return [quant]
    return [{"params": params["weights"], "weight_decay": weight_decay}, quant]


def train_qat(
    student: DualEncoder,
    teacher: DualEncoder,
    data: ImageTextSet,
    config: TrainConfig,
    weights: QATLoss | None = None,
    eval_fn: Any = None,
    scale_lr: float = 1.0,
    train_mode: str = "all",
) -> TrainState:
    """Train a ``prepare_qat``-ed ``student`` against the float ``teacher`` on ``data`` with the shared loop.

    Resumes from ``config.out_dir`` when it holds a checkpoint. ``eval_fn(encoder, step) -> dict`` gets the
    student dual encoder (fake-quantized).

    Example:
        >>> prepare_qat(student, "vision=w1:binary"); state = train_qat(student, teacher, data, cfg)  # doctest: +SKIP
    """
    for p in teacher.parameters():
        p.requires_grad_(False)
    pair = PairEncoder(student)
    batches = qat_batches(student, TeacherCache(teacher, data), data, config.batch_size, config.seed)
    groups = qat_param_groups(student, config.weight_decay, scale_lr, train_mode)
    wrapped_eval = None if eval_fn is None else (lambda m, step: eval_fn(m.model, step))
    return train(pair, qat_loss_fn(weights or QATLoss()), batches, config, params=groups, eval_fn=wrapped_eval)


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


def _check_run_dir(args: QATArgs) -> None:
    """Refuse to resume a run directory that holds a different run; record this one otherwise (rank 0)."""
    record = {k: (asdict(args)[k] if k not in ("distill", "task_loss") else getattr(args.loss, k)) for k in _RUN_KEYS}
    path = Path(args.out) / RUN_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        diff = {k: (saved.get(k), v) for k, v in record.items() if saved.get(k) != v}
        if diff:
            listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise LowbitError(f"{args.out} holds a different QAT run ({listed}); accepted: the same arguments, "
                              "or a new --out directory")
    elif D.is_main():
        write_json(path, {**record, "args": asdict(args)})


def _eval_task(data: ImageTextSet) -> str:
    return "zeroshot" if data.labels is not None and data.classnames else "retrieval"


def run_qat(args: QATArgs) -> dict[str, Any]:
    """Load ``args.model`` twice (student, teacher), ``prepare_qat`` with ``args.recipe``, train, fold, save.

    Returns (and writes to ``OUT/summary.json`` on rank 0) the starting and final quantization totals, the
    last logged losses, every evaluation, and where the packed model is. Works unchanged under torchrun.

    Example:
        >>> run_qat(QATArgs(model="lit-fashion", recipe="*=w1:binary", out="runs/b"))  # doctest: +SKIP
    """
    from lowbit.api import evaluate, load
    from lowbit.checkpoint import save_quantized
    from lowbit.data import resolve_dataset
    from lowbit.quant.qat import convert_qat, prepare_qat
    from lowbit.quant.recipe import load_recipe

    args.loss.validate()
    if args.train not in TRAIN_MODES:
        raise unknown_choice("QAT train mode", args.train, TRAIN_MODES)
    if args.steps < 0 or (args.steps == 0 and args.block_ap is None):
        raise LowbitError(f"QAT steps must be >= 1 (or 0 with Block-AP); received {args.steps}")
    recipe = load_recipe(args.recipe)
    t0 = time.perf_counter()
    D.init_distributed()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    _check_run_dir(args)
    D.barrier()
    train_set = resolve_dataset(args.data, split="train", limit=args.train_samples)
    eval_set = resolve_dataset(args.data, split="test", limit=args.eval_samples) if args.eval_samples else None
    teacher, student = load(args.model), load(args.model)
    start_report = prepare_qat(student, recipe)

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


def summary_line(summary: dict[str, Any]) -> str:
    """One line for the terminal."""
    evals = summary.get("evals") or []
    last_eval = json.dumps({k: round(v, 4) for k, v in (evals[-1]["eval"] if evals else {}).items()})
    bits = (summary.get("totals") or summary.get("start_totals") or {}).get("bits_per_weight", 0.0)
    return (f"QAT {summary['steps']} steps on {summary['world_size']} process(es); eval {last_eval}; "
            f"{bits:.2f} bits/weight; model: {summary['model']}")
