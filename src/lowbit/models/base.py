"""The interface every dual-encoder family implements, and the family registry.

A family adapts an upstream model (transformers, a packaged tower) to one shape:

- ``preprocess(images) -> pixels``  and ``tokenize(texts) -> token dict``
- ``encode_image(pixels) -> [B, D]``  and ``encode_text(tokens) -> [B, D]`` (L2-normalised by default)
- ``similarity(img, txt) -> [Bi, Bt]`` logits (scale, and bias for SigLIP)
- ``towers() -> {"vision": module, "text": module, "projector": module}`` for quantization recipes

Convenience methods ``embed_images``/``embed_texts`` batch lists of PIL images / strings with progress.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import nn

from lowbit.registry import Registry


class DualEncoder(nn.Module):
    """Base class of CLIP-style dual encoders. Subclasses fill in the abstract methods."""

    family: str = "?"

    def __init__(self) -> None:
        super().__init__()
        self.source: dict[str, Any] = {}  # how to rebuild this model: {"family": ..., "name": ..., ...}

    # --- to implement -------------------------------------------------------------------------------------
    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> pixel batch [B, 3, H, W] ready for ``encode_image``."""
        raise NotImplementedError

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Strings -> token tensors ready for ``encode_text``."""
        raise NotImplementedError

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings [B, D]."""
        raise NotImplementedError

    def text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Unnormalised text embeddings [B, D]."""
        raise NotImplementedError

    def towers(self) -> dict[str, nn.Module]:
        """Named towers (``vision``, ``text``, ``projector``) -> submodules, for quantization recipes."""
        raise NotImplementedError

    @property
    def logit_scale(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def logit_bias(self) -> torch.Tensor | None:
        return None

    # --- shared behaviour -----------------------------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        feats = self.image_features(pixels)
        return nn.functional.normalize(feats, dim=-1) if normalize else feats

    def encode_text(self, tokens: dict[str, torch.Tensor], normalize: bool = True) -> torch.Tensor:
        feats = self.text_features(tokens)
        return nn.functional.normalize(feats, dim=-1) if normalize else feats

    def similarity(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Logits [Bi, Bt] = scale * cos (+ bias): the model's own image-text score."""
        logits = self.logit_scale.exp() * image_emb @ text_emb.T
        bias = self.logit_bias
        return logits + bias if bias is not None else logits

    def forward(self, pixels: torch.Tensor, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.similarity(self.encode_image(pixels), self.encode_text(tokens))

    @torch.inference_mode()
    def embed_images(
        self, images: Sequence[Image.Image], batch_size: int = 64, progress: bool | str = False
    ) -> torch.Tensor:
        """Normalised embeddings [N, D] of PIL images, in batches (``progress`` = bar label or True)."""
        return _batched(lambda chunk: self.encode_image(self.preprocess(chunk)), images, batch_size, progress)

    @torch.inference_mode()
    def embed_texts(
        self, texts: Sequence[str], batch_size: int = 256, progress: bool | str = False
    ) -> torch.Tensor:
        """Normalised embeddings [N, D] of strings, in batches."""
        return _batched(lambda chunk: self.encode_text(self.tokenize(chunk)), texts, batch_size, progress)


def right_padded(rows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """Token id rows as one right-padded batch: ``input_ids`` (pad 0) and ``attention_mask`` [B, longest]."""
    longest = max((len(r) for r in rows), default=0)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _batched(fn: Callable[[Sequence[Any]], torch.Tensor], items: Sequence[Any], batch_size: int,
             progress: bool | str) -> torch.Tensor:
    from tqdm.auto import tqdm

    starts = range(0, len(items), batch_size)
    label = progress if isinstance(progress, str) else None
    bar = tqdm(starts, desc=label, unit="batch", disable=not progress, leave=False, delay=2)  # bars only for >2 s work
    return torch.cat([fn(items[s : s + batch_size]) for s in bar]) if len(items) else torch.empty(0)


@dataclass(frozen=True)
class ModelFamily:
    """A registered family: ``load(name_or_path, **options) -> DualEncoder`` plus what names it knows."""

    name: str
    load: Callable[..., DualEncoder]
    builtin_names: tuple[str, ...] = ()  # names this family resolves without a path (e.g. "lit-fashion")
    claims_path: Callable[[str], bool] = field(default=lambda path: False)  # does a local dir belong here?
    description: str = ""


FAMILIES: Registry[ModelFamily] = Registry("model family")
