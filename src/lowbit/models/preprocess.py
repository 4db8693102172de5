"""Image preprocessing without torchvision: PIL -> resized, normalised float tensor."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from lowbit.limits import decode_image


def images_to_tensor(
    images: Sequence[Image.Image],
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> torch.Tensor:
    """Resize each image to ``size`` x ``size`` RGB and normalise -> float32 [B, 3, size, size].

    Images are squashed to a square (no crop): the datasets lowbit ships are already square, and cropping
    would cut off parts of generated shapes that captions talk about.
    """
    arrays = [
        np.asarray(img.convert("RGB").resize((size, size), resample), dtype=np.float32) for img in images
    ]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).div_(255.0)  # [B, H, W, 3] -> [B, 3, H, W]
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (batch - mean_t) / std_t


def open_rgb(image: Image.Image | str | os.PathLike[str] | bytes) -> Image.Image:
    """A PIL image from an image, a path or raw bytes; anything undecodable is one clear LowbitError."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return decode_image(image).convert("RGB")  # bounded: regular files, no bombs, aspect, downscaled
