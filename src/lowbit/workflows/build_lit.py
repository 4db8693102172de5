"""Build (train) the heads of the built-in ``lit-fashion`` model, deterministically and resumably.

Steps: (1) image-tower features of Fashion-MNIST train images, computed in chunks cached under
``$LOWBIT_HOME/features`` (a killed build resumes at the next missing chunk); (2) text-tower features of every
caption template x class name; (3) linear heads trained with a CLIP-style contrastive loss in which every
caption of the image's class is a positive (captions repeat across a batch, so the one-hot CLIP target would
punish correct matches); (4) heads saved as safetensors with the config, seed and metrics in the metadata.

Example:
    >>> from lowbit.workflows.build_lit import build_lit_heads
    >>> result = build_lit_heads("heads.safetensors", n_train=2000, n_test=1000)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from tqdm.auto import tqdm

from lowbit.io import atomic_path
from lowbit.models.lit import LitConfig, LitDualEncoder
from lowbit.paths import lowbit_home

FEATURE_CHUNK = 5000  # images per cached feature file: the unit of resumption


@dataclass(frozen=True)
class HeadTraining:
    """Hyper-parameters of head training; all of them go into the saved metadata."""

    seed: int = 0
    steps: int = 3000
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 1e-4


def _fashion_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    from lowbit.data.fashion_mnist import load_fashion_mnist_arrays

    return load_fashion_mnist_arrays(split)


def _fashion_images(split: str) -> Callable[[int, int], list[Image.Image]]:
    pixels, _ = _fashion_arrays(split)
    return lambda start, stop: [Image.fromarray(a) for a in pixels[start:stop]]


@torch.inference_mode()
def cached_features(
    key: str,
    n: int,
    images: Callable[[int, int], list[Image.Image]],
    model: LitDualEncoder,
    batch_size: int = 250,
    progress: bool = True,
) -> torch.Tensor:
    """Vision-tower features [n, 1280] of ``images(start, stop)``, cached in chunks under ``key``.

    The cache lives in ``$LOWBIT_HOME/features/<key>-effl0-<size>px``; a chunk is written atomically, so a
    killed build resumes at the first missing chunk.
    """
    from safetensors.torch import load_file, save_file

    cache = lowbit_home() / "features" / f"{key}-effl0-{model.config.image_size}px"
    cache.mkdir(parents=True, exist_ok=True)
    chunks = []
    bar = tqdm(total=n, desc=f"image features ({key})", unit="img", disable=not progress)
    for start in range(0, n, FEATURE_CHUNK):
        stop = min(start + FEATURE_CHUNK, n)
        path = cache / f"{start:06d}-{stop:06d}.safetensors"
        if path.exists():
            chunks.append(load_file(str(path))["features"])
            bar.update(stop - start)
            continue
        parts = []
        for b in range(start, stop, batch_size):
            batch = images(b, min(b + batch_size, stop))
            parts.append(model.vision(model.preprocess(batch)))
            bar.update(len(batch))
        feats = torch.cat(parts)
        with atomic_path(path) as tmp:
            save_file({"features": feats.contiguous()}, str(tmp))
        chunks.append(feats)
    bar.close()
    return torch.cat(chunks)


def multi_positive_clip_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, labels: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric CLIP loss where pairs with equal labels are all positives (uniform soft targets)."""
    logits = log_scale.exp() * image_emb @ text_emb.T  # [B, B]
    same = (labels[:, None] == labels[None, :]).float()  # [B, B]
    targets = same / same.sum(1, keepdim=True)
    loss_i2t = -(targets * logits.log_softmax(1)).sum(1).mean()
    loss_t2i = -(targets * logits.T.log_softmax(1)).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2


@dataclass
class CaptionedFeatures:
    """A training pool on cached tower features.

    ``images`` [P, 1280]; ``captions`` [Q, 384]; ``choices`` [P, T]: caption ids an image may be paired with
    (one is drawn per step); ``labels`` [P]: images with equal labels are mutual positives; ``weight`` [P]:
    sampling weight (balances the small shapes set against Fashion-MNIST).
    """

    images: torch.Tensor
    captions: torch.Tensor
    choices: torch.Tensor
    labels: torch.Tensor
    weight: torch.Tensor

    @staticmethod
    def concat(parts: list[CaptionedFeatures]) -> CaptionedFeatures:
        caption_offsets = np.cumsum([0] + [len(p.captions) for p in parts[:-1]])
        width = max(p.choices.shape[1] for p in parts)  # widen by cycling each part's choices
        label_offsets = np.cumsum([0] + [int(p.labels.max()) + 1 for p in parts[:-1]])
        return CaptionedFeatures(
            images=torch.cat([p.images for p in parts]),
            captions=torch.cat([p.captions for p in parts]),
            choices=torch.cat([p.choices[:, torch.arange(width) % p.choices.shape[1]] + int(o)
                               for p, o in zip(parts, caption_offsets, strict=True)]),
            labels=torch.cat([p.labels + int(o) for p, o in zip(parts, label_offsets, strict=True)]),
            weight=torch.cat([p.weight for p in parts]),
        )


def train_heads(model: LitDualEncoder, pool: CaptionedFeatures, hp: HeadTraining, progress: bool = True) -> list[float]:
    """Train ``model.projector`` and the temperature on a feature pool; returns the loss curve."""
    gen = torch.Generator().manual_seed(hp.seed)
    torch.manual_seed(hp.seed)
    image_norm, image_head, text_head = model.projector["image"], model.projector["image"].proj, model.projector["text"]
    image_norm.mean.copy_(pool.images.mean(0))  # standardised features train faster (and quantize better)
    image_norm.std.copy_(pool.images.std(0) + 1e-6)
    for head in (image_head, text_head):
        torch.nn.init.normal_(head.weight, std=head.in_features**-0.5, generator=gen)
        torch.nn.init.zeros_(head.bias)
    params = [image_head.weight, image_head.bias, text_head.weight, text_head.bias, model.log_scale]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp.lr, total_steps=hp.steps, pct_start=0.05)
    normed = (pool.images - image_norm.mean) / image_norm.std
    n_choices = pool.choices.shape[1]
    losses = []
    for _ in tqdm(range(hp.steps), desc="train heads", disable=not progress):
        idx = torch.multinomial(pool.weight, hp.batch_size, replacement=True, generator=gen)
        pick = torch.randint(0, n_choices, (hp.batch_size,), generator=gen)
        img = F.normalize(image_head(normed[idx]), dim=-1)
        txt = F.normalize(text_head(pool.captions[pool.choices[idx, pick]]), dim=-1)
        loss = multi_positive_clip_loss(img, txt, pool.labels[idx], model.log_scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.log_scale.clamp_(0, 4.6052)  # CLIP's cap: scale <= 100
        losses.append(loss.item())
    for p in params:
        p.requires_grad_(False)
    return losses


@torch.inference_mode()
def text_tower_features(model: LitDualEncoder, texts: list[str], batch_size: int = 256,
                        progress: bool = True) -> torch.Tensor:
    """Text-tower features [len(texts), 384], cached under ``$LOWBIT_HOME/features`` by a hash of the texts."""
    from safetensors.torch import load_file, save_file

    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    path = lowbit_home() / "features" / f"text-minilm-{digest}.safetensors"
    if path.exists():
        return load_file(str(path))["features"]
    chunks = range(0, len(texts), batch_size)
    bar = tqdm(chunks, desc="text features", unit="batch", disable=not progress or len(texts) <= batch_size)
    feats = torch.cat([model.text(**model.tokenize(texts[s : s + batch_size])) for s in bar])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"features": feats.contiguous()}, str(tmp))
    return feats


def fashion_pool(model: LitDualEncoder, split: str, n: int, progress: bool = True) -> CaptionedFeatures:
    """Fashion-MNIST images paired with every caption template of their class."""
    from lowbit.data.fashion_mnist import CLASSNAMES, TEMPLATES

    labels = torch.from_numpy(_fashion_arrays(split)[1][:n].astype(np.int64))
    n_t = len(TEMPLATES)
    captions = text_tower_features(model, [t.format(c) for c in CLASSNAMES for t in TEMPLATES], progress=progress)
    return CaptionedFeatures(
        images=cached_features(f"fashion-{split}", n, _fashion_images(split), model, progress=progress),
        captions=captions,  # [C*T, 384], class-major
        choices=labels[:, None] * n_t + torch.arange(n_t)[None, :],  # [n, T]
        labels=labels,
        weight=torch.ones(n),
    )


def shapes_pool(model: LitDualEncoder, split: str, n: int | None, weight: float,
                progress: bool = True) -> CaptionedFeatures:
    """Generated shapes images, each paired with its own (unique) compositional caption."""
    from lowbit.data.shapes import load_shapes

    data = load_shapes(split, limit=n)
    count = len(data)
    return CaptionedFeatures(
        images=cached_features(f"shapes-{split}-{count}", count, lambda a, b: data.images[a:b], model,
                               progress=progress),
        captions=text_tower_features(model, list(data.captions or []), progress=progress),
        choices=torch.arange(count)[:, None],
        labels=torch.arange(count),
        weight=torch.full((count,), weight),
    )


@torch.inference_mode()
def zeroshot_top1(model: LitDualEncoder, pool: CaptionedFeatures) -> float:
    """Prompt-ensembled zero-shot top-1 from cached features (build-time check; Fashion-MNIST pools)."""
    from lowbit.data.fashion_mnist import CLASSNAMES

    img = F.normalize(model.projector["image"](pool.images), dim=-1)
    txt = F.normalize(model.projector["text"](pool.captions), dim=-1)  # [C*T, D]
    classes = F.normalize(txt.view(len(CLASSNAMES), -1, txt.shape[-1]).mean(1), dim=-1)  # [C, D]
    return (img @ classes.T).argmax(1).eq(pool.labels).float().mean().item()


@torch.inference_mode()
def image_to_text_r1(model: LitDualEncoder, pool: CaptionedFeatures) -> float:
    """Image->caption Recall@1 from cached features (build-time check; shapes pools, unique captions)."""
    img = F.normalize(model.projector["image"](pool.images), dim=-1)
    txt = F.normalize(model.projector["text"](pool.captions), dim=-1)
    return (img @ txt.T).argmax(1).eq(pool.choices[:, 0]).float().mean().item()


def build_lit_heads(
    out: str | Path,
    n_train: int = 60000,
    n_test: int = 10000,
    n_shapes: int | None = None,
    shapes_weight: float = 4.0,
    config: LitConfig = LitConfig(),
    hp: HeadTraining = HeadTraining(),
    progress: bool = True,
) -> dict[str, Any]:
    """Train the ``lit-fashion`` heads on Fashion-MNIST train + shapes train; write them atomically to ``out``.

    ``shapes_weight`` is the sampling weight of a shapes image relative to a Fashion-MNIST image.
    Returns the build log (also stored in the file's metadata).
    """
    from safetensors.torch import save_file

    from lowbit.data.fashion_mnist import CLASSNAMES, TEMPLATES

    t0 = time.perf_counter()
    torch.manual_seed(hp.seed)
    model = LitDualEncoder(config).eval()
    fashion = fashion_pool(model, "train", n_train, progress)
    shapes = shapes_pool(model, "train", n_shapes, shapes_weight, progress)
    t_features = time.perf_counter() - t0
    losses = train_heads(model, CaptionedFeatures.concat([fashion, shapes]), hp, progress=progress)
    t_train = time.perf_counter() - t0 - t_features
    log = {
        "config": asdict(config),
        "training": asdict(hp),
        "n_train": n_train,
        "n_test": n_test,
        "n_shapes_train": len(shapes.labels),
        "shapes_weight": shapes_weight,
        "templates": list(TEMPLATES),
        "classnames": list(CLASSNAMES),
        "final_loss": float(np.mean(losses[-50:])),
        "loss_curve_every_100": [round(float(np.mean(losses[i : i + 100])), 4) for i in range(0, len(losses), 100)],
        "fashion_train_top1": zeroshot_top1(model, fashion),
        "fashion_test_top1": zeroshot_top1(model, fashion_pool(model, "test", n_test, progress)),
        "shapes_test_i2t_r1": image_to_text_r1(model, shapes_pool(model, "test", None, 1.0, progress)),
        "seconds_train_features": round(t_features, 1),
        "seconds_train_heads": round(t_train, 1),
        "seconds_total": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
    }
    state = {k: v.contiguous() for k, v in model.head_state().items()}
    with atomic_path(out) as tmp:
        save_file(state, str(tmp), metadata={"lowbit": json.dumps(log)})
    return log
