"""Vision towers of a LLaVA model: any lowbit vision tower, turned into a sequence of visual tokens.

A LLaVA model feeds the language model one embedding per image *patch*, not one per image (Liu et al., 2023,
"Visual Instruction Tuning"). Each adapter here returns ``[B, N, C]`` patch features and, for pruning, one
importance score per token ``[B, N]``:

- ``EfficientNetGrid``: the final spatial feature map of EfficientNet-Lite0 (stride 32), one token per cell in
  raster order; 128 px input -> a 4x4 grid of 1280-d tokens. Score: the L2 norm of the cell's feature
  (a CNN has no attention; activation magnitude is the usual saliency proxy). ``output_stride`` 16 or 8 makes
  the grid denser without new weights (DeepLab's atrous trick, Chen et al., 2017): the last stride-2 stage(s)
  run at stride 1 and every later depthwise conv is dilated to keep its receptive field, so 256 px at
  output stride 16 gives 16x16 = 256 tokens of the same 1280-d features.
- ``HFVisionTokens``: a transformers ViT tower (CLIP/SigLIP vision model), hidden states of one layer, the CLS
  token dropped by LLaVA's "default" strategy. Score: the attention the CLS token pays to each patch in that
  layer when the tower has a CLS token (the [CLS]-attention ranking of FasterVLM), else the feature norm.

``VISION_ADAPTERS`` maps a lowbit family name to a function that takes a loaded model of that family and
returns ``(tower, preprocess)``, so ``vision="lit-fashion"`` or ``vision="<clip dir>"`` both work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.preprocess import images_to_tensor
from lowbit.models.towers import IMAGENET_MEAN, IMAGENET_STD
from lowbit.registry import Registry

Preprocess = Callable[[Sequence[Image.Image]], torch.Tensor]


class VisualTokens(nn.Module):
    """Base of the adapters: ``forward(pixels) -> (tokens [B, N, C], scores [B, N])``; ``out_dim`` = C."""

    out_dim: int


OUTPUT_STRIDES = (32, 16, 8)


def dilate_to_output_stride(net: nn.Module, output_stride: int) -> None:
    """Make an EfficientNet's last feature map ``32 / output_stride`` times denser, in place.

    Walking the blocks in order with the running stride (the stem is stride 2): a stride-2 depthwise conv that
    would take the running stride past ``output_stride`` runs at stride 1 instead, and from then on every
    depthwise conv is dilated by the stride given up so far (the skipped block keeps the previous dilation).
    """
    if output_stride not in OUTPUT_STRIDES:
        raise LowbitError(f"output_stride must be one of {OUTPUT_STRIDES}; received {output_stride!r}")
    stride, dilation = 2, 1
    for block in net._blocks:
        conv = block._depthwise_conv
        step = int(conv.stride[0])
        if step == 2 and stride * 2 > output_stride:
            conv.stride = (1, 1)
            conv.dilation = (dilation, dilation)
            dilation *= 2
            continue
        stride *= step
        conv.dilation = (dilation, dilation)


class EfficientNetGrid(VisualTokens):
    """EfficientNet(-Lite) trunk -> its last feature map as raster-ordered tokens ``[B, h*w, 1280]``."""

    def __init__(self, net: nn.Module, out_dim: int = 1280, output_stride: int = 32) -> None:
        super().__init__()
        self.net = net
        self.out_dim = out_dim
        self.output_stride = int(output_stride)
        if self.output_stride != 32:
            dilate_to_output_stride(net, self.output_stride)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.net.extract_features(pixels)  # [B, C, h, w]
        tokens = fmap.flatten(2).transpose(1, 2)  # [B, h*w, C]
        return tokens, tokens.norm(dim=-1)


class HFVisionTokens(VisualTokens):
    """A transformers vision model -> hidden states of ``feature_layer`` (CLS dropped for "default")."""

    def __init__(self, vision_model: nn.Module, feature_layer: int = -2, strategy: str = "default") -> None:
        super().__init__()
        self.vision_model = vision_model
        self.feature_layer = feature_layer
        self.strategy = strategy
        self.out_dim = int(vision_model.config.hidden_size)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.vision_model(pixel_values=pixels, output_hidden_states=True)
        hidden = out.hidden_states[self.feature_layer]  # [B, 1 + N, C] with CLS first (CLIP), [B, N, C] (SigLIP)
        if self.strategy == "default":
            cls, tokens = hidden[:, :1], hidden[:, 1:]  # [B, 1, C], [B, N, C]
            # Scaled dot product of CLS with each patch: the CLS row of a single-head attention map in this
            # layer's space. Cheap (no eager attention re-run) and ranks patches the way [CLS] attention does.
            scores = torch.softmax((tokens @ cls.transpose(1, 2)).squeeze(-1) / tokens.shape[-1] ** 0.5, dim=-1)
            return tokens, scores
        return hidden, hidden.norm(dim=-1)


VISION_ADAPTERS: Registry[Callable[[Any], tuple[VisualTokens, Preprocess]]] = Registry("llava vision tower family")


def efficientnet_preprocess(image_size: int) -> Preprocess:
    """PIL images -> ImageNet-normalised pixels at ``image_size`` (what EfficientNet-Lite0 was trained on)."""

    def run(images: Sequence[Image.Image]) -> torch.Tensor:
        return images_to_tensor(images, image_size, IMAGENET_MEAN, IMAGENET_STD)

    return run


def lit_vision(model: Any, image_size: int = 128, output_stride: int = 32) -> tuple[VisualTokens, Preprocess]:
    """The EfficientNet-Lite0 trunk of a ``lit`` dual encoder as a visual-token grid."""
    return (EfficientNetGrid(model.vision.net, model.vision.out_dim, output_stride),
            efficientnet_preprocess(image_size))


def hf_vision(model: Any, output_stride: int = 32, **_: Any) -> tuple[VisualTokens, Preprocess]:
    """The vision transformer of a CLIP/SigLIP dual encoder, with that model's own preprocessing."""
    if output_stride != 32:
        raise LowbitError(f"output_stride={output_stride} applies to CNN towers; a ViT's grid is its patch grid; "
                          "accepted: 32 (the default) for this tower")
    vision = model.model.vision_model
    strategy = "default" if model.model_type == "clip" else "full"  # SigLIP has no CLS token
    return HFVisionTokens(vision, feature_layer=-2, strategy=strategy), model.preprocess


VISION_ADAPTERS.register("lit")(lit_vision)
VISION_ADAPTERS.register("clip")(hf_vision)
VISION_ADAPTERS.register("vit")(hf_vision)


def default_vision(image_size: int = 128, output_stride: int = 32) -> tuple[VisualTokens, Preprocess]:
    """lit-fashion's vision tower (ImageNet EfficientNet-Lite0) without loading its text tower."""
    from lowbit.models.towers import EfficientNetLite0Features

    trunk = EfficientNetLite0Features(pretrained=True)
    return EfficientNetGrid(trunk.net, trunk.out_dim, output_stride), efficientnet_preprocess(image_size)


def vision_from_model(name_or_path: str, **options: Any) -> tuple[VisualTokens, Preprocess]:
    """The vision tower of any lowbit model (built-in name or directory), as visual tokens."""
    from lowbit.models.loading import load_model

    model = load_model(name_or_path)
    return VISION_ADAPTERS.get(model.source.get("family", type(model).__name__))(model, **options)
