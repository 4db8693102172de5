"""``lowbit train clip`` from plain options: a CLIP/SigLIP dual encoder pre-trained from scratch, on one
process or under torchrun (``lowbit.train.clip_train``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowbit.errors import dataclass_from_options
from lowbit.train.clip_train import ClipTrainArgs
from lowbit.train.clip_train import train_clip as run_train_clip
from lowbit.train.distributed import cleanup_distributed


def train_clip(data: str, out: str | Path, **options: Any) -> dict[str, Any]:
    """Train as ``ClipTrainArgs`` says (unknown fields refused); leaves the process group at the end."""
    args = dataclass_from_options(ClipTrainArgs, "train clip", {"data": data, "out": str(out), **options})
    try:
        return run_train_clip(args)
    finally:
        cleanup_distributed()
