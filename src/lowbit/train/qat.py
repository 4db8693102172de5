"""QAT training pieces: fake-quantized student distilled from the frozen float teacher.

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

The whole run (load, prepare, Block-AP, train, fold, save) is ``lowbit.workflows.qat.run_qat``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.data.base import ImageTextSet
from lowbit.errors import LowbitError, unknown_choice
from lowbit.models.base import DualEncoder
from lowbit.train import distributed as D
from lowbit.train.loop import LossFn, TrainConfig, TrainState, train, unwrap
from lowbit.train.losses import clip_loss, embedding_cosine_loss, siglip_loss
from lowbit.train.sampling import BatchFactory, index_batches

DISTILL_MODES = ("kl", "cosine", "both", "none")
TASK_LOSSES = ("clip", "siglip", "none")
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


def qat_batches(student: DualEncoder, teacher: TeacherCache | None, data: ImageTextSet, global_batch: int,
                seed: int) -> BatchFactory:
    """Resumable batches of ``{"pixels", "tokens", "teacher_image", "teacher_text"}`` over ``data`` (without the
    teacher's embeddings when ``teacher`` is None: training without distillation)."""

    def collate(indices: np.ndarray, step: int) -> dict[str, Any]:
        idx = [int(i) for i in indices]
        captions = [sample_caption(data, i, step, seed) for i in idx]
        batch = {"pixels": student.preprocess([data.images[i] for i in idx]), "tokens": student.tokenize(captions)}
        if teacher is not None:
            batch["teacher_image"], batch["teacher_text"] = teacher.embed(idx, captions)
        return batch

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
        if weights.distill != "none":
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
