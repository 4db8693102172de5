"""Tiny stand-in dual encoders and datasets, so eval tests never touch real weights or real data.

- ``FakeEncoder``: random projection of 8x8 pixels; hashed bag-of-words text tower. Deterministic, fast,
  with parameters *and* a packed uint8 buffer so footprint accounting has something to count.
- ``LookupEncoder``: the test dictates every embedding. Image i carries its id in its top-left pixel;
  a text's embedding is looked up by exact string. Used for hand-computed metrics and oracles.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lowbit.data.base import ImageTextSet
from lowbit.models.base import DualEncoder

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 20)}


def _pixels(images: Sequence[Image.Image], size: int | None = None) -> torch.Tensor:
    arrays = []
    for img in images:
        img = img.convert("RGB")
        if size is not None:
            img = img.resize((size, size))
        arrays.append(np.asarray(img, dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class FakeEncoder(DualEncoder):
    """Random-projection image tower over 8x8 pixels; hashed bag-of-words text tower."""

    family = "fake"

    def __init__(self, dim: int = 16, size: int = 8, buckets: int = 64, seed: int = 0, name: str = "fake") -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.size, self.buckets = size, buckets
        self.proj = nn.Linear(3 * size * size, dim, bias=False)  # 192*16 fp32 = 12288 bytes
        self.words = nn.Embedding(buckets, dim)  # 64*16 fp32 = 4096 bytes
        self.scale = nn.Parameter(torch.tensor(math.log(100.0)))  # 4 bytes
        self.register_buffer("packed", torch.zeros(16, 8, dtype=torch.uint8))  # 128 bytes, like a qweight
        self.source = {"family": "fake", "name": name}

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return _pixels(images, self.size)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        # crc32, not hash(): Python's str hash is salted per process.
        ids = [[zlib.crc32(w.encode()) % self.buckets for w in t.lower().split()] or [0] for t in texts]
        width = max(len(i) for i in ids)
        tokens = torch.tensor([i + [0] * (width - len(i)) for i in ids])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids], dtype=torch.float32)
        return {"input_ids": tokens, "attention_mask": mask}

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels.flatten(1))

    def text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return (self.words(tokens["input_ids"]) * tokens["attention_mask"][..., None]).sum(1)

    def towers(self) -> dict[str, nn.Module]:
        return {"vision": self.proj, "text": self.words, "projector": nn.Identity()}

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.scale


def id_image(i: int) -> Image.Image:
    """A 4x4 image whose top-left pixel encodes ``i`` (red + 256 * green)."""
    return Image.new("RGB", (4, 4), (i % 256, i // 256, 0))


class LookupEncoder(DualEncoder):
    """Embeddings fixed by the test: ``id_image(i)`` -> ``image_vectors[i]``, text -> ``text_vectors[text]``."""

    family = "lookup"

    def __init__(self, image_vectors: Sequence[Sequence[float]], text_vectors: dict[str, Sequence[float]],
                 name: str = "lookup") -> None:
        super().__init__()
        self.register_buffer("image_table", torch.tensor(image_vectors, dtype=torch.float32))
        self.texts = list(text_vectors)
        self.register_buffer("text_table", torch.tensor([text_vectors[t] for t in self.texts], dtype=torch.float32))
        self.source = {"family": "lookup", "name": name}

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return _pixels(images)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return {"ids": torch.tensor([self.texts.index(t) for t in texts], dtype=torch.long)}

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        ids = (pixels[:, 0, 0, 0] * 255).round().long() + 256 * (pixels[:, 1, 0, 0] * 255).round().long()
        return self.image_table[ids]

    def text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.text_table[tokens["ids"]]

    def towers(self) -> dict[str, nn.Module]:
        return {"vision": nn.Identity(), "text": nn.Identity(), "projector": nn.Identity()}

    @property
    def logit_scale(self) -> torch.Tensor:
        return torch.tensor(math.log(100.0))


def colour_set(n: int = 12, labelled: bool = True, captioned: bool = True, name: str = "colours") -> ImageTextSet:
    """``n`` solid squares cycling through 4 colours, with colour labels and "a <colour> square" captions."""
    names = list(COLOURS)
    labels = [i % len(names) for i in range(n)]
    images = [Image.new("RGB", (16, 16), COLOURS[names[c]]) for c in labels]
    return ImageTextSet(
        name=name,
        images=images,
        labels=labels if labelled else None,
        classnames=names if labelled else None,
        captions=[f"a {names[c]} square" for c in labels] if captioned else None,
        templates=["a photo of a {} thing.", "a {} square"],
    )


@pytest.fixture
def fake_model() -> FakeEncoder:
    return FakeEncoder()


@pytest.fixture
def lookup() -> type[LookupEncoder]:
    return LookupEncoder


@pytest.fixture
def make_id_images() -> Callable[[int], list[Image.Image]]:
    return lambda n: [id_image(i) for i in range(n)]


@pytest.fixture
def toy_set() -> Callable[..., ImageTextSet]:
    return colour_set


@pytest.fixture
def oracle() -> Callable[[ImageTextSet], LookupEncoder]:
    """A perfect encoder for a labelled id-image set: image i and every prompt of its class share a one-hot."""

    def build(data: ImageTextSet) -> LookupEncoder:
        assert data.labels is not None and data.classnames is not None
        n_cls = len(data.classnames)
        eye = torch.eye(n_cls).tolist()
        texts = {t.replace("{}", c): eye[k] for k, c in enumerate(data.classnames) for t in data.templates}
        for caption, label in zip(data.captions or [], data.labels, strict=True):
            texts[caption] = eye[label]
        return LookupEncoder([eye[y] for y in data.labels], texts, name="oracle")

    return build


@pytest.fixture
def id_set(make_id_images: Callable[[int], list[Image.Image]]) -> Callable[..., ImageTextSet]:
    """A labelled, captioned set of id images: ``build(labels, classnames)``."""

    def build(labels: list[int], classnames: list[str], templates: list[str] | None = None) -> ImageTextSet:
        return ImageTextSet(
            name="ids",
            images=make_id_images(len(labels)),
            labels=labels,
            classnames=classnames,
            captions=[f"a {classnames[y]}" for y in labels],
            templates=templates or ["a photo of a {}."],
        )

    return build
