"""A tiny dual encoder and image-text set for QAT tests (seconds on a CPU), registered as a model family
(``tiny-qat``) and a dataset (``tiny-qat-data``) so ``run_qat`` and ``lowbit.load`` can name them.

Also runnable as the torchrun worker of the DDP test: ``python qat_tiny.py OUT_DIR STEPS LR`` trains a binary
QAT of the tiny model (same data, seed and global batch on any number of processes).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from lowbit.data.base import DATASETS, ImageTextSet
from lowbit.models.base import FAMILIES, DualEncoder, ModelFamily


def dying_at(real: Callable[..., Any], step: int) -> Callable[..., Any]:
    """``lowbit.train.qat.qat_batches`` whose process "dies" (KeyboardInterrupt) when ``step`` asks for its batch:
    an interrupted run for the resume tests, with every checkpoint before ``step`` written."""

    def factory(*args: Any, **kwargs: Any) -> Callable[..., Any]:
        batches = real(*args, **kwargs)

        def gen(start: int, rank: int, world: int) -> Any:
            for at, batch in enumerate(batches(start, rank, world), start):
                if at == step:
                    raise KeyboardInterrupt("killed")
                yield batch

        return gen

    return factory


CLASSES = ["ring", "bar", "dot", "cross"]
TEMPLATES = ["a {}", "the {} picture"]
VOCAB = 40


class TinyDual(DualEncoder):
    """Vision: 3x3 conv -> 1x1 conv -> mean pool; text: embedding -> masked mean -> 2 linears; linear heads."""

    family = "tinyqat"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.vision = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 24, 1), nn.ReLU())
        self.embed = nn.Embedding(VOCAB, 16)
        self.text = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24))
        self.projector = nn.ModuleDict({"image": nn.Linear(24, 12), "text": nn.Linear(24, 12)})
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.source = {"family": "tinyqat", "name": "tiny-qat"}

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        arr = np.stack([np.asarray(im.convert("L"), dtype=np.float32) / 255.0 for im in images])
        return torch.from_numpy(arr).unsqueeze(1)  # [B, 1, 8, 8]

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        ids = [[(sum(map(ord, w)) % (VOCAB - 1)) + 1 for w in t.split()] for t in texts]
        n = max(len(i) for i in ids)
        input_ids = torch.tensor([i + [0] * (n - len(i)) for i in ids])
        return {"input_ids": input_ids, "attention_mask": (input_ids > 0).long()}

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projector["image"](self.vision(pixels).mean(dim=(2, 3)))

    def text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = tokens["attention_mask"].unsqueeze(-1).float()  # [B, T, 1]
        pooled = (self.embed(tokens["input_ids"]) * mask).sum(1) / mask.sum(1)  # [B, 16]
        return self.projector["text"](self.text(pooled))

    def towers(self) -> dict[str, nn.Module]:
        return {"vision": self.vision, "text": self.text, "projector": self.projector}

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_scale


def tiny_data(n: int = 32, seed: int = 0, captions: bool = False, **_: Any) -> ImageTextSet:
    """``n`` 8x8 images whose bright pattern depends on the class, with labels (and optionally captions)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        label = i % len(CLASSES)
        a = rng.uniform(0, 60, (8, 8))
        a[label * 2 : label * 2 + 2, :] += 180
        images.append(Image.fromarray(a.clip(0, 255).astype(np.uint8), "L"))
        labels.append(label)
    caps = [TEMPLATES[0].format(CLASSES[y]) for y in labels] if captions else None
    return ImageTextSet("tiny-qat-data", images, labels, list(CLASSES), caps, list(TEMPLATES))


def _load_tiny(name: str = "tiny-qat", **_: Any) -> TinyDual:
    return TinyDual().eval().requires_grad_(False)


if "tinyqat" not in FAMILIES:
    FAMILIES.register("tinyqat")(ModelFamily("tinyqat", _load_tiny, builtin_names=("tiny-qat",),
                                             description="tiny dual encoder for tests"))
if "tiny-qat-data" not in DATASETS:
    DATASETS.register("tiny-qat-data")(lambda split="train", limit=None: tiny_data(limit or 32))


def _worker(out_dir: str, steps: int, lr: float) -> None:
    """One run of binary QAT (torchrun or plain python), checkpoints in ``out_dir``."""
    from lowbit.quant.qat import prepare_qat
    from lowbit.train import distributed as D
    from lowbit.train.loop import TrainConfig
    from lowbit.train.qat import QATLoss, train_qat

    torch.set_num_threads(1)
    student, teacher = _load_tiny(), _load_tiny()
    prepare_qat(student, "vision=w1:binary,text=w1:pbllm,projector=w4")
    config = TrainConfig(steps=steps, lr=lr, weight_decay=0.0, warmup_steps=1, batch_size=8, ckpt_every=steps,
                         log_every=1, out_dir=out_dir, progress=False)
    train_qat(student, teacher, tiny_data(32), config, QATLoss(task_loss="clip", distill="both"))
    D.barrier()  # every rank is done before any leaves (the checkpoint is written by rank 0)


if __name__ == "__main__":
    from lowbit.cli.base import exit_process

    _worker(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
    exit_process(0)  # under torchrun: no interpreter teardown (a rank aborted in it in CI)
