"""``lit``: LiT-style dual encoder from packaged pretrained towers (Zhai et al., 2022, "LiT: Zero-Shot
Transfer with Locked-image text Tuning"), here with BOTH towers locked and only linear projection heads trained.

The built-in ``lit-fashion`` = EfficientNet-Lite0 (ImageNet) image tower + all-MiniLM-L6-v2 text tower, both
frozen, with heads trained contrastively on Fashion-MNIST train images and caption templates
(see ``lit_build.py`` and ``assets/lit-fashion/BUILD.md`` for the exact command, seed and log).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels.depthwise import tf_same_padding
from lowbit.models.base import DualEncoder, ModelFamily
from lowbit.models.preprocess import images_to_tensor
from lowbit.models.spec import FamilySpec, L2Normalize, SpatialMean, register_family
from lowbit.models.towers import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EfficientNetLite0Features,
    MeanPooledEncoder,
    minilm_dir,
)
from lowbit.registry import qualname

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_NAME = "lit-fashion"


@dataclass(frozen=True)
class LitConfig:
    """Shape of a LiT dual encoder; saved beside its heads."""

    image_size: int = 96
    embed_dim: int = 256
    max_text_tokens: int = 64

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


class StandardizedHead(nn.Module):
    """``proj((x - mean) / std)``: a linear head over standardised features.

    The standardisation stays a separate float op (buffers ``mean``/``std`` [D_in]) instead of being folded
    into ``proj``: folding multiplies weight columns by 1/std, which spreads their magnitudes over orders of
    magnitude and makes per-channel weight quantization of the head lose the small columns.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj((x - self.mean) / self.std)


class LitDualEncoder(DualEncoder):
    """Frozen EfficientNet-Lite0 + frozen MiniLM + linear heads.

    Towers: ``vision`` (EfficientNet-Lite0 trunk, [B,3,S,S] -> [B,1280]), ``text`` (BERT encoder + mean
    pooling, tokens -> [B,384]), ``projector`` (``image``: standardise + Linear 1280->D, ``text``: Linear 384->D).
    """

    family = "lit"

    def __init__(self, config: LitConfig = LitConfig(), pretrained_towers: bool = True,
                 text_dir: Path | None = None) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        text_dir = text_dir or minilm_dir()  # the text tower's config and tokenizer files
        self.config = config
        self.vision = EfficientNetLite0Features(pretrained=pretrained_towers)
        self.text = MeanPooledEncoder(text_dir, pretrained=pretrained_towers)
        self.projector = nn.ModuleDict(
            {
                "image": StandardizedHead(self.vision.out_dim, config.embed_dim),
                "text": nn.Linear(self.text.out_dim, config.embed_dim),
            }
        )
        self.log_scale = nn.Parameter(torch.tensor(2.6592))  # log(1/0.07), CLIP's initial temperature
        self.tokenizer = AutoTokenizer.from_pretrained(str(text_dir))

    # --- DualEncoder interface ---
    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return images_to_tensor(images, self.config.image_size, IMAGENET_MEAN, IMAGENET_STD)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.config.max_text_tokens, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projector["image"](self.vision(pixels))

    def text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.projector["text"](self.text(**tokens))

    def towers(self) -> dict[str, nn.Module]:
        return {"vision": self.vision, "text": self.text, "projector": self.projector}

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_scale

    # --- heads I/O ---
    def head_state(self) -> dict[str, torch.Tensor]:
        """The trained part: projector weights and the temperature."""
        state = {f"projector.{k}": v for k, v in self.projector.state_dict().items()}
        state["log_scale"] = self.log_scale.detach().reshape(1)
        return state

    def load_head_state(self, state: dict[str, torch.Tensor]) -> None:
        self.projector.load_state_dict({k.removeprefix("projector."): v for k, v in state.items() if k != "log_scale"})
        with torch.no_grad():
            self.log_scale.copy_(state["log_scale"].reshape(()))


def packaged_heads_path(name: str = DEFAULT_NAME) -> Path:
    return ASSETS / name / "heads.safetensors"


def load_lit(name: str = DEFAULT_NAME, heads: str | Path | None = None) -> LitDualEncoder:
    """Load the built-in LiT model: packaged towers + trained heads (packaged, or ``heads=`` a built file).

    Example:
        >>> model = load_lit("lit-fashion")  # doctest: +SKIP
    """
    from safetensors.torch import load_file

    path = Path(heads) if heads is not None else packaged_heads_path(name)
    if not path.exists():
        raise LowbitError(
            f"trained heads for {name!r} not found at {path}; build them with `lowbit build {name}`"
        )
    meta = _read_meta(path)
    config = LitConfig(**meta.get("config", {}))
    model = LitDualEncoder(config)
    model.load_head_state(load_file(str(path)))
    model.eval().requires_grad_(False)
    model.source = {"family": "lit", "name": name, "options": {} if heads is None else {"heads": str(path)}}
    return model


# --- a self-contained packed checkpoint (lowbit.workflows.checkpoint) -----------------------------------------
TEXT_DIR = "text"  # the text tower's config.json and tokenizer files, inside the checkpoint's architecture dir


def save_lit_architecture(model: LitDualEncoder, out: Path) -> dict[str, Any]:
    """Write the text tower's config and tokenizer under ``out``; the record holds the ``LitConfig``.

    The vision tower needs no file: EfficientNet-Lite0's architecture is ``efficientnet_lite_pytorch`` code.
    """
    model.text.encoder.config.save_pretrained(out / TEXT_DIR)
    model.tokenizer.save_pretrained(out / TEXT_DIR)
    return {"config": asdict(model.config), "vision": "efficientnet-lite0", "text": TEXT_DIR}


def lit_skeleton(path: Path, record: dict[str, Any]) -> LitDualEncoder:
    """The LiT model of a checkpoint's architecture record, without pretrained weights."""
    model = LitDualEncoder(LitConfig(**record["config"]), pretrained_towers=False, text_dir=path / record["text"])
    return model.eval().requires_grad_(False)


def _read_meta(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("lowbit", "{}"))


# --- what lowbit knows about the LiT towers (also the llava family's EfficientNet vision tower) ----------------
_EFFICIENTNET_UTILS = "efficientnet_lite_pytorch.utils"


class EfficientNetHead(nn.Module):
    """The head conv + BN + activation of an EfficientNet, as the last block of its Block-AP chain."""

    assembled = True  # a view built for Block-AP, never called by the network's own forward

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn, self.act = net._conv_head, net._bn1, net._swish

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def _efficientnet_blocks(tower: nn.Module) -> list[nn.Module]:
    return [*tower.net._blocks, EfficientNetHead(tower.net)]


def _dynamic_same_pad(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Conv2dDynamicSamePadding's own ``F.pad``: TF "same" padding for this input size."""
    top, bottom = tf_same_padding(x.shape[-2], conv.kernel_size[0], conv.stride[0], conv.dilation[0])
    left, right = tf_same_padding(x.shape[-1], conv.kernel_size[1], conv.stride[1], conv.dilation[1])
    return nn.functional.pad(x, [left, right, top, bottom])


def _vision_tail(model: DualEncoder) -> nn.Module:
    # EfficientNetLite0Features pools the head's feature map; the image head standardises + projects.
    return nn.Sequential(SpatialMean(), model.towers()["projector"]["image"], L2Normalize())


SPEC = register_family(FamilySpec(
    name="lit",
    description="LiT dual encoder over EfficientNet-Lite0 (efficientnet-lite-pytorch) and a BERT encoder",
    families=(ModelFamily(
        name="lit",
        load=load_lit,
        builtin_names=(DEFAULT_NAME,),
        description="LiT dual encoder: frozen EfficientNet-Lite0 + MiniLM towers, trained linear heads",
    ),),
    dual_encoder=LitDualEncoder,
    towers=("vision", "text", "projector"),
    calibration_data=lambda model: "fashion-mnist",  # its heads were trained on Fashion-MNIST: its own domain
    save_architecture=save_lit_architecture,
    skeleton=lit_skeleton,
    block_chains={
        qualname(EfficientNetLite0Features): _efficientnet_blocks,  # MBConv blocks, then the head
        qualname(MeanPooledEncoder): lambda tower: list(tower.encoder.encoder.layer),
    },
    embedding_tails={"vision": _vision_tail},
    quantizable_attention=("transformers.models.bert.modeling_bert.BertSelfAttention",),  # the MiniLM text tower
    input_padding={
        f"{_EFFICIENTNET_UTILS}.Conv2dDynamicSamePadding": _dynamic_same_pad,
        f"{_EFFICIENTNET_UTILS}.Conv2dStaticSamePadding": lambda conv, x: conv.static_padding(x),
    },
    pointwise_convs={
        f"{_EFFICIENTNET_UTILS}.Conv2dDynamicSamePadding": "TF 'same' padding is zero for a 1x1 stride-1 kernel",
        f"{_EFFICIENTNET_UTILS}.Conv2dStaticSamePadding": "static 'same' padding is Identity for a 1x1 stride-1 kernel",
    },
    same_padding_convs={
        f"{_EFFICIENTNET_UTILS}.Conv2dDynamicSamePadding":
            "efficientnet-lite-pytorch: pads (k-1)*d at stride 1 with F.pad, then conv2d with padding 0",
    },
))
