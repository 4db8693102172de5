"""Contrastive and distillation losses for dual encoders, correct across data-parallel processes.

- ``clip_loss``: symmetric softmax cross-entropy over the image-text similarity matrix with a learnable
  temperature (Radford et al., 2021, "Learning Transferable Visual Models From Natural Language Supervision").
- ``siglip_loss``: pairwise sigmoid loss with learnable temperature and bias (Zhai et al., 2023, "Sigmoid Loss
  for Language Image Pre-Training"), normalised by the number of images as in the paper.
- Both take optional ``text_ids``: pairs whose captions are the same text count as positives (soft targets
  spread over them for CLIP, label +1 for SigLIP) instead of as negatives. Without ids, a batch with repeated
  captions (class-name prompts) teaches the model to tell identical texts apart, which is impossible; with
  ids the loss is the image-text-label contrastive loss of UniCL (Yang et al., 2022, "Unified Contrastive
  Learning in Image-Text-Label Space"), and it equals the standard loss when all captions differ.
- ``distill_kl_loss``: KL divergence between teacher and student similarity distributions at a temperature
  (Hinton et al., 2015, "Distilling the Knowledge in a Neural Network"), both directions, times T².
- ``embedding_cosine_loss``: 1 - cos between student and teacher embeddings.

Distributed: each rank holds ``B`` local pairs. The other ranks' features are all-gathered *with* gradients
(``distributed.all_gather_with_grad``, open_clip's ``gather_with_grad``), and each rank scores only its local
rows against all ``W*B`` columns ("local loss"), positives at column ``rank*B + i``. The local loss is the mean
over local rows, so the mean over ranks equals the one-process loss on the concatenated batch, and DDP's
gradient averaging then reproduces the one-process gradient. SigLIP uses the same plain all-gather instead of
the paper's chunked neighbour exchange: identical numbers, ``W*B`` text features in memory at once (fine at
the batch sizes a CPU trains with).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from lowbit.train import distributed as D

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the learned temperature at 100 to keep training stable


def _gathered(image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """All ranks' image and text features [W*B, D] and the column offset of this rank's positives."""
    return D.all_gather_with_grad(image), D.all_gather_with_grad(text), D.rank() * image.shape[0]


def _positives(text_ids: torch.Tensor | None, n_local: int, offset: int, n_all: int,
               device: torch.device) -> torch.Tensor:
    """Bool [B, W*B]: local row i is positive with global column j (diagonal, or the same caption id)."""
    if text_ids is None:
        pos = torch.zeros(n_local, n_all, dtype=torch.bool, device=device)
        rows = torch.arange(n_local, device=device)
        pos[rows, rows + offset] = True
        return pos
    return text_ids[:, None] == D.all_gather(text_ids)[None, :]


def clip_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, clamp: bool = True,
    text_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE on L2-normalised features [B, D]; ``logit_scale`` is log(1/temperature).

    ``text_ids`` [B] (int64): ids of the caption texts; equal ids are positives (see the module docstring).

    Example:
        >>> img = F.normalize(torch.randn(4, 8), dim=-1); txt = F.normalize(torch.randn(4, 8), dim=-1)
        >>> clip_loss(img, txt, torch.tensor(math.log(10.0))).shape
        torch.Size([])
    """
    scale = (logit_scale.clamp(max=MAX_LOGIT_SCALE) if clamp else logit_scale).exp()
    all_img, all_txt, offset = _gathered(image_emb, text_emb)
    logits_per_image = scale * image_emb @ all_txt.T  # [B, W*B]: local images vs every text
    logits_per_text = scale * text_emb @ all_img.T  # [B, W*B]: local texts vs every image
    if text_ids is None:
        labels = torch.arange(image_emb.shape[0], device=image_emb.device) + offset
        return 0.5 * (F.cross_entropy(logits_per_image.float(), labels)
                      + F.cross_entropy(logits_per_text.float(), labels))
    pos = _positives(text_ids, image_emb.shape[0], offset, all_txt.shape[0], image_emb.device).float()
    targets = pos / pos.sum(dim=1, keepdim=True)  # [B, W*B]: uniform over the row's positives
    # The positive set is symmetric in image and text (same caption id), so one target matrix serves both.
    return 0.5 * (F.cross_entropy(logits_per_image.float(), targets)
                  + F.cross_entropy(logits_per_text.float(), targets))


def siglip_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
    text_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """SigLIP: -sum log sigmoid(z_ij * (t x_i.y_j + b)) / n_images, z = +1 on the diagonal, -1 elsewhere.

    ``logit_scale`` is log t. Every image is scored against every text of the global batch. With
    ``text_ids``, z = +1 wherever the caption ids are equal.

    Example:
        >>> img = F.normalize(torch.randn(4, 8), dim=-1); txt = F.normalize(torch.randn(4, 8), dim=-1)
        >>> float(siglip_loss(img, txt, torch.tensor(math.log(10.0)), torch.tensor(-10.0))) > 0
        True
    """
    _, all_txt, offset = _gathered(image_emb, text_emb)
    logits = (logit_scale.exp() * image_emb @ all_txt.T + logit_bias).float()  # [B, W*B]
    pos = _positives(text_ids, image_emb.shape[0], offset, all_txt.shape[0], logits.device)
    signs = pos.to(logits.dtype) * 2 - 1  # +1 positive, -1 negative
    return -F.logsigmoid(signs * logits).sum() / image_emb.shape[0]


def distill_kl_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(teacher || student) of the softmaxed similarity rows and columns [Bi, Bt], averaged, times T².

    The T² keeps gradient size independent of the temperature (Hinton et al., 2015). Pass logits from the
    same batch for both models (e.g. ``scale * img @ txt.T``); the teacher's are detached here.

    Example:
        >>> s = torch.randn(4, 4); distill_kl_loss(s, s).abs().item() < 1e-6
        True
    """
    return 0.5 * (token_kl_loss(student_logits, teacher_logits, temperature)  # image -> text rows
                  + token_kl_loss(student_logits.T, teacher_logits.T, temperature))  # text -> image columns


def token_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over rows [N, V] of KL(teacher || student) of next-token distributions at temperature T, times T².

    Answer distillation of a language model: one row per predicted token (Hinton et al., 2015); the teacher's
    logits are detached here.

    Example:
        >>> s = torch.randn(3, 7); token_kl_loss(s, s).abs().item() < 1e-6
        True
    """
    t = temperature
    student = F.log_softmax(student_logits.float() / t, dim=-1)
    teacher = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * t * t


def embedding_cosine_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(student_i, teacher_i) over rows [B, D]; the teacher is detached.

    Example:
        >>> x = torch.randn(3, 5); float(embedding_cosine_loss(x, 2 * x)) < 1e-6
        True
    """
    return (1.0 - F.cosine_similarity(student_emb.float(), teacher_emb.detach().float(), dim=-1)).mean()
