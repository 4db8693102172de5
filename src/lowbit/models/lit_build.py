"""Build (train) the heads of the built-in ``lit-fashion`` model, deterministically and resumably.

Steps: (1) image-tower features of Fashion-MNIST train images, computed in chunks cached under
``$LOWBIT_HOME/features`` (a killed build resumes at the next missing chunk); (2) text-tower features of every
caption template x class name; (3) linear heads trained with a CLIP-style contrastive loss in which every
caption of the image's class is a positive (captions repeat across a batch, so the one-hot CLIP target would
punish correct matches); (4) heads saved as safetensors with the config, seed and metrics in the metadata.

Example:
    >>> from lowbit.models.lit_build import build_lit_heads
    >>> result = build_lit_heads("heads.safetensors", n_train=2000, n_test=1000)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
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


@torch.inference_mode()
def image_tower_features(
    model: LitDualEncoder, split: str, n: int, batch_size: int = 250, progress: bool = True
) -> torch.Tensor:
    """Vision-tower features [n, 1280] of the first ``n`` images of a Fashion-MNIST split, chunk-cached."""
    from PIL import Image
    from safetensors.torch import load_file, save_file

    pixels, _ = _fashion_arrays(split)
    cache = lowbit_home() / "features" / f"fashion-{split}-effl0-{model.config.image_size}px"
    cache.mkdir(parents=True, exist_ok=True)
    chunks = []
    bar = tqdm(total=n, desc=f"image features ({split})", unit="img", disable=not progress)
    for start in range(0, n, FEATURE_CHUNK):
        stop = min(start + FEATURE_CHUNK, n)
        path = cache / f"{start:06d}-{stop:06d}.safetensors"
        if path.exists():
            chunks.append(load_file(str(path))["features"])
            bar.update(stop - start)
            continue
        parts = []
        for b in range(start, stop, batch_size):
            batch = [Image.fromarray(a) for a in pixels[b : min(b + batch_size, stop)]]
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


def train_heads(
    model: LitDualEncoder,
    image_feats: torch.Tensor,
    labels: torch.Tensor,
    caption_feats: torch.Tensor,
    hp: HeadTraining,
    progress: bool = True,
) -> list[float]:
    """Train ``model.projector`` and the temperature on cached features; returns the loss curve.

    ``caption_feats`` is [T, C, 384]: text-tower features of template t for class c.
    """
    gen = torch.Generator().manual_seed(hp.seed)
    torch.manual_seed(hp.seed)
    mean, std = image_feats.mean(0), image_feats.std(0) + 1e-6
    image_head, text_head = model.projector["image"], model.projector["text"]
    for head in (image_head, text_head):
        torch.nn.init.normal_(head.weight, std=head.in_features**-0.5, generator=gen)
        torch.nn.init.zeros_(head.bias)
    params = [image_head.weight, image_head.bias, text_head.weight, text_head.bias, model.log_scale]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp.lr, total_steps=hp.steps, pct_start=0.05)
    n_templates = caption_feats.shape[0]
    normed = (image_feats - mean) / std  # standardised features train faster; folded into the head below
    losses = []
    for _ in tqdm(range(hp.steps), desc="train heads", disable=not progress):
        idx = torch.randint(0, len(normed), (hp.batch_size,), generator=gen)
        tmpl = torch.randint(0, n_templates, (hp.batch_size,), generator=gen)
        y = labels[idx]
        img = F.normalize(image_head(normed[idx]), dim=-1)
        txt = F.normalize(text_head(caption_feats[tmpl, y]), dim=-1)
        loss = multi_positive_clip_loss(img, txt, y, model.log_scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.log_scale.clamp_(0, 4.6052)  # CLIP's cap: scale <= 100
        losses.append(loss.item())
    with torch.no_grad():  # fold the standardisation: W((f - m)/s) + b = (W/s) f + (b - W(m/s))
        image_head.bias -= image_head.weight @ (mean / std)
        image_head.weight /= std
    for p in params:
        p.requires_grad_(False)
    return losses


@torch.inference_mode()
def caption_features(model: LitDualEncoder, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """Text-tower features [T, C, 384] of every template x class name."""
    texts = [t.format(c) for t in templates for c in classnames]
    feats = model.text(**model.tokenize(texts))  # [T*C, 384]
    return feats.view(len(templates), len(classnames), -1)


@torch.inference_mode()
def zeroshot_top1_from_features(
    model: LitDualEncoder, image_feats: torch.Tensor, labels: torch.Tensor, caption_feats: torch.Tensor
) -> float:
    """Prompt-ensembled zero-shot top-1 computed from cached tower features (build-time check)."""
    img = F.normalize(model.projector["image"](image_feats), dim=-1)
    txt = F.normalize(model.projector["text"](caption_feats), dim=-1).mean(0)  # [C, D]
    txt = F.normalize(txt, dim=-1)
    return (img @ txt.T).argmax(1).eq(labels).float().mean().item()


def build_lit_heads(
    out: str | Path,
    n_train: int = 60000,
    n_test: int = 10000,
    config: LitConfig = LitConfig(),
    hp: HeadTraining = HeadTraining(),
    progress: bool = True,
) -> dict[str, Any]:
    """Train the ``lit-fashion`` heads and write them (atomically) to ``out``; returns the build log."""
    from safetensors.torch import save_file

    from lowbit.data.fashion_mnist import CLASSNAMES, TEMPLATES

    t0 = time.perf_counter()
    torch.manual_seed(hp.seed)
    model = LitDualEncoder(config).eval()
    train_feats = image_tower_features(model, "train", n_train, progress=progress)
    train_labels = torch.from_numpy(_fashion_arrays("train")[1][:n_train]).long()
    caps = caption_features(model, list(CLASSNAMES), list(TEMPLATES))
    t_features = time.perf_counter() - t0
    losses = train_heads(model, train_feats, train_labels, caps, hp, progress=progress)
    test_feats = image_tower_features(model, "test", n_test, progress=progress)
    test_labels = torch.from_numpy(_fashion_arrays("test")[1][:n_test]).long()
    log = {
        "config": asdict(config),
        "training": asdict(hp),
        "n_train": n_train,
        "n_test": n_test,
        "templates": list(TEMPLATES),
        "classnames": list(CLASSNAMES),
        "final_loss": float(np.mean(losses[-50:])),
        "test_top1_from_features": zeroshot_top1_from_features(model, test_feats, test_labels, caps),
        "train_top1_from_features": zeroshot_top1_from_features(model, train_feats, train_labels, caps),
        "seconds_features": round(t_features, 1),
        "seconds_total": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
    }
    state = {k: v.contiguous() for k, v in model.head_state().items()}
    with atomic_path(out) as tmp:
        save_file(state, str(tmp), metadata={"lowbit": json.dumps(log)})
    return log
