"""The Block-AP stage of ``lowbit qat --block-ap`` (EfficientQAT, arXiv:2407.11062): block-wise reconstruction
(``lowbit.quant.block_ap``) before the end-to-end phase, on calibration batches built from the training set.

Calibration: the first ``samples`` training images (preprocessed by the student) for the vision tower. For
the text tower, text that is NOT the zero-shot classifier's: the dataset's distinct captions of those images
minus the template x class-name prompts (Fashion-MNIST's train captions are such prompts), plus
``CALIBRATION_TEMPLATES`` x class names, templates disjoint from any dataset's evaluation prompts — so the
text tower is never reconstructed on the very prompts it is evaluated with.

The result (the whole student ``state_dict``: latent weights, steps, and any float parameters Block-AP
trained) is written atomically to ``OUT/block_ap.safetensors`` with a report ``OUT/block_ap.json``; a rerun
(resume) loads it instead of recomputing. Under torchrun rank 0 computes it and the others load it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lowbit.data.base import ImageTextSet
from lowbit.errors import LowbitError
from lowbit.io import atomic_path, write_json
from lowbit.models.base import DualEncoder
from lowbit.quant.block_ap import BlockAPConfig, block_ap_
from lowbit.train import distributed as D

STATE_FILE = "block_ap.safetensors"
# Text calibration templates for labelled datasets: product-photo phrasings none of lowbit's datasets uses as
# an evaluation prompt (block_ap_texts drops any that a dataset does use).
CALIBRATION_TEMPLATES: tuple[str, ...] = (
    "a {} on a plain background.", "a product picture of a {}.", "a catalogue image of a {}.",
    "a small picture showing a {}.", "a close-up of a {}.", "a {} for sale.", "a drawing of a {}.",
    "a dark picture of a {}.", "a cropped image of a {}.", "the {} in a shop window.", "my favourite {}.",
    "a {}, seen from the front.",
)
REPORT_FILE = "block_ap.json"


@dataclass
class BlockAPStage:
    """What ``lowbit qat --block-ap`` configures: calibration size and batches, plus the reconstruction
    hyper-parameters themselves (``block``: steps per block, learning rates, norm matching)."""

    samples: int = 512
    image_batch: int = 32
    text_batch: int = 16
    block: BlockAPConfig = field(default_factory=BlockAPConfig)

    def config(self, seed: int) -> BlockAPConfig:
        return replace(self.block, seed=seed)


def calibration_batches(model: DualEncoder, data: ImageTextSet, samples: int, image_batch: int,
                        text_batch: int) -> dict[str, list[Any]]:
    """``{"vision": [pixels [B,3,S,S], ...], "text": [tokens, ...]}`` from the first ``samples`` of ``data``."""
    n = min(samples, len(data))
    pixels = [model.preprocess(data.images[i : i + image_batch]) for i in range(0, n, image_batch)]
    texts = block_ap_texts(data, n)
    tokens = [model.tokenize(texts[i : i + text_batch]) for i in range(0, len(texts), text_batch)]
    return {"vision": pixels, "text": tokens}


def _prompts(templates: Sequence[str], classnames: Sequence[str]) -> list[str]:
    return [t.replace("{}", c, 1) for c in classnames for t in templates]


def block_ap_texts(data: ImageTextSet, n: int) -> list[str]:
    """Distinct text-tower calibration texts: captions of the first ``n`` samples and
    ``CALIBRATION_TEMPLATES`` x class names, never one of the dataset's zero-shot prompts."""
    classnames = data.classnames or []
    evaluated = set(_prompts(data.templates or [], classnames))
    texts = [t for t in dict.fromkeys([*(data.captions or [])[:n], *_prompts(CALIBRATION_TEMPLATES, classnames)])
             if t not in evaluated]
    if not texts:
        raise LowbitError(f"dataset {data.name!r} has no text to calibrate the text tower on (no captions that are "
                          "not zero-shot prompts, no class names); accepted: captions or class names")
    return texts


def run_block_ap_stage(student: DualEncoder, teacher: DualEncoder, data: ImageTextSet, stage: BlockAPStage,
                       out_dir: str | Path, seed: int, towers: tuple[str, ...] = ("vision", "text"),
                       progress: bool = True) -> dict[str, Any]:
    """Block-AP ``student`` in place (or load the saved result from ``out_dir``); returns the report dict."""
    from safetensors.torch import load_file, save_file

    out = Path(out_dir)
    state_path, report_path = out / STATE_FILE, out / REPORT_FILE
    computed = False
    if not state_path.is_file() and D.is_main():
        batches = calibration_batches(student, data, stage.samples, stage.image_batch, stage.text_batch)
        has_quant = {t: _has_qat_layers(student.towers().get(t)) for t in towers}
        calib = {t: batches[t] for t in towers if has_quant[t]}
        log = print if progress else None
        report = block_ap_(student, teacher, calib, stage.config(seed), log=log).to_dict()
        write_json(report_path, report)  # before the state file, whose presence means "done"
        state = {k: v.detach().contiguous().clone() for k, v in student.state_dict().items()}
        with atomic_path(state_path) as tmp:
            save_file(state, str(tmp))
        computed = True
    D.barrier()
    if not computed:
        student.load_state_dict(load_file(str(state_path)))
    return json.loads(report_path.read_text())


def _has_qat_layers(tower: torch.nn.Module | None) -> bool:
    from lowbit.quant.qat import QATLayer

    return tower is not None and any(isinstance(m, QATLayer) for m in tower.modules())
