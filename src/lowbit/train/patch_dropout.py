"""FLIP-style random patch dropping for ViT towers (Li et al., 2023, "Scaling Language-Image Pre-training via
Masking").

During training a random ``drop`` fraction of the patch tokens of each image is removed right after the
embedding layer (patch projection + position embeddings), before the transformer: the encoder then runs on
fewer tokens, which cuts its cost roughly in proportion, and the masking acts as a regulariser. The class
token (CLIP) is always kept. In eval mode nothing is dropped, so the trained model is an ordinary ViT.

Implemented as a forward hook on the Hugging Face vision embeddings module (``vision_model.embeddings`` of
``CLIPModel`` / ``SiglipModel``), so transformers' model code and the saved checkpoint stay unchanged; the
hook is a training-time option and is not saved with the weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lowbit.errors import LowbitError


def drop_patches(tokens: torch.Tensor, drop: float, n_prefix: int = 0) -> torch.Tensor:
    """Keep the first ``n_prefix`` tokens and a random ``1 - drop`` share of the rest, per sample, in order.

    Example:
        >>> drop_patches(torch.zeros(2, 1 + 16, 8), 0.75, n_prefix=1).shape
        torch.Size([2, 5, 8])
    """
    b, t, d = tokens.shape
    n = t - n_prefix
    keep = max(1, math.ceil(n * (1.0 - drop)))
    if keep >= n:
        return tokens
    # Independent random subset per image: the lowest `keep` of uniform noise; sorted to keep spatial order.
    idx = torch.rand(b, n, device=tokens.device).argsort(dim=1)[:, :keep].sort(dim=1).values  # [B, keep]
    patches = tokens[:, n_prefix:].gather(1, idx[:, :, None].expand(b, keep, d))  # [B, keep, D]
    return torch.cat([tokens[:, :n_prefix], patches], dim=1)  # [B, n_prefix + keep, D]


def enable_patch_dropout(vision_model: nn.Module, drop: float) -> RemovableHandle:
    """Drop ``drop`` of the patch tokens of ``vision_model`` (an HF CLIP/SigLIP vision transformer) in training.

    Returns the hook handle; ``handle.remove()`` turns dropping off. A class token is detected by the
    ``class_embedding`` parameter CLIP's embeddings carry (SigLIP has none).

    Example:
        >>> handle = enable_patch_dropout(model.vision_model, 0.5)  # doctest: +SKIP
    """
    if not 0.0 <= drop < 1.0:
        raise LowbitError(f"patch dropout must be a fraction in [0, 1); received {drop!r}; accepted: e.g. 0.5")
    embeddings = getattr(vision_model, "embeddings", None)
    if embeddings is None:
        raise LowbitError(
            f"patch dropout needs a ViT tower with an .embeddings module; received {type(vision_model).__name__}; "
            "accepted: the vision_model of a transformers CLIPModel or SiglipModel"
        )
    n_prefix = 1 if hasattr(embeddings, "class_embedding") else 0

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return drop_patches(output, drop, n_prefix) if module.training and drop > 0 else output

    return embeddings.register_forward_hook(hook)
