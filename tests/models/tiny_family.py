"""``tiny-family``: a whole model family in one file plus one ``register_family`` call (the proof of the spec).

A tiny random-initialised dual encoder with every kind of module lowbit has architecture knowledge about:

- vision: a conv tower of TF-"same" padding convs (``SameConv``: pads itself in ``forward``, so calibration,
  pointwise swapping, static padding and the depthwise kernel must be told), a clamp activation
  (``Clamp6``, fused into the kernel write-out), inverted-residual blocks (Block-AP's chain), mean pooling
  into the image head (the vision embedding tail);
- text: token embeddings, pre-norm transformer layers whose attention projects q/k/v from one input and whose
  MLP computes gate/up from one input (one kernel call once packed), masked mean pooling;
- loaded from a directory (``config.json`` + ``model.safetensors``) as ``tiny-family:<dir>``.

Nothing here is known to ``lowbit`` outside ``SPEC``.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from lowbit.kernels.depthwise import tf_same_padding
from lowbit.models.base import DualEncoder, ModelFamily
from lowbit.models.preprocess import images_to_tensor
from lowbit.models.spec import FamilySpec, L2Normalize, SpatialMean, register_family
from lowbit.registry import qualname

FAMILY = "tiny-family"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


@dataclass(frozen=True)
class TinyConfig:
    image_size: int = 32
    channels: int = 32
    vision_blocks: int = 2
    vocab: int = 97
    dim: int = 64
    text_layers: int = 2
    heads: int = 2
    embed_dim: int = 32
    max_tokens: int = 12


class SameConv(nn.Conv2d):
    """A conv padding TensorFlow "same" itself in ``forward`` (like EfficientNet's dynamic same-padding convs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(same_pad(self, x))


def same_pad(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``SameConv``'s input padding (also what calibration applies before unfolding its patches)."""
    top, bottom = tf_same_padding(x.shape[-2], conv.kernel_size[0], conv.stride[0], conv.dilation[0])
    left, right = tf_same_padding(x.shape[-1], conv.kernel_size[1], conv.stride[1], conv.dilation[1])
    return nn.functional.pad(x, [left, right, top, bottom])


class Clamp6(nn.Module):
    """min(max(x, 0), 6), not a torch activation class: only the spec tells the kernels it is a clamp."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0.0, 6.0)


class InvertedResidual(nn.Module):
    """1x1 expand -> clamp -> 3x3 depthwise -> clamp -> 1x1 project, plus the input."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.expand, self.act1 = SameConv(c, 2 * c, 1), Clamp6()
        self.depthwise, self.act2 = SameConv(2 * c, 2 * c, 3, groups=2 * c), Clamp6()
        self.project = SameConv(2 * c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.act2(self.depthwise(self.act1(self.expand(x)))))


class ConvTower(nn.Module):
    """[B, 3, S, S] -> stride-2 stem -> inverted residual blocks -> mean pooled [B, C]."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.stem, self.act = SameConv(3, cfg.channels, 3, stride=2), Clamp6()
        self.blocks = nn.ModuleList(InvertedResidual(cfg.channels) for _ in range(cfg.vision_blocks))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem(pixels))
        for block in self.blocks:
            x = block(x)
        return x.mean(dim=(2, 3))


class Attention(nn.Module):
    """Multi-head self-attention; q/k/v all read the same ``x`` (the spec lets them share one kernel call)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # [B, H, T, D/H]

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        keep = mask[:, None, None, :].bool()  # [B, 1, 1, T]: padding keys are never attended to
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, d))


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up read the same ``x``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(dim, 2 * dim), nn.Linear(dim, 2 * dim)
        self.down_proj = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class TextLayer(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), GatedMLP(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class TextTower(nn.Module):
    """token ids [B, T] + mask -> layers -> masked mean [B, D]."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.layers = nn.ModuleList(TextLayer(cfg.dim, cfg.heads) for _ in range(cfg.text_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, attention_mask)
        m = attention_mask[..., None].to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class TinyFamilyModel(DualEncoder):
    """Towers ``vision`` (ConvTower), ``text`` (TextTower), ``projector`` (``image`` / ``text`` linear heads)."""

    family = FAMILY

    def __init__(self, cfg: TinyConfig = TinyConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision, self.text = ConvTower(cfg), TextTower(cfg)
        self.projector = nn.ModuleDict({"image": nn.Linear(cfg.channels, cfg.embed_dim),
                                        "text": nn.Linear(cfg.dim, cfg.embed_dim)})
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return images_to_tensor(images, self.cfg.image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        # a hashed word vocabulary: no tokenizer files to ship with the family
        rows = [[1 + zlib.crc32(w.encode()) % (self.cfg.vocab - 1) for w in t.lower().split()][: self.cfg.max_tokens]
                for t in texts]
        width = max(1, *(len(r) for r in rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projector["image"](self.vision(pixels))

    def text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.projector["text"](self.text(**tokens))

    def towers(self) -> dict[str, nn.Module]:
        return {"vision": self.vision, "text": self.text, "projector": self.projector}

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_scale


def write_tiny_family(path: Path, seed: int = 0, cfg: TinyConfig = TinyConfig()) -> Path:
    """A random-initialised checkpoint directory of the family."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = TinyFamilyModel(cfg)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(asdict(cfg)))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / WEIGHTS_FILE))
    return path


def load_tiny_family(path: str) -> TinyFamilyModel:
    """The checkpoint directory ``path`` in eval mode."""
    from safetensors.torch import load_file

    cfg = TinyConfig(**json.loads((Path(path) / CONFIG_FILE).read_text()))
    model = TinyFamilyModel(cfg)
    model.load_state_dict(load_file(str(Path(path) / WEIGHTS_FILE)))
    model.eval().requires_grad_(False)
    model.source = {"family": FAMILY, "name": f"{FAMILY}:{path}", "options": {}}
    return model


def _vision_tail(model: DualEncoder) -> nn.Module:
    return nn.Sequential(SpatialMean(), model.towers()["projector"]["image"], L2Normalize())


SPEC = register_family(FamilySpec(
    name=FAMILY,
    description="a tiny conv + transformer dual encoder defined in the test tree",
    families=(ModelFamily(name=FAMILY, load=load_tiny_family, description="tiny test family (a directory)"),),
    dual_encoder=TinyFamilyModel,
    towers=("vision", "text", "projector"),
    block_chains={qualname(ConvTower): lambda tower: list(tower.blocks),
                  qualname(TextTower): lambda tower: list(tower.layers)},
    embedding_tails={"vision": _vision_tail},  # text: masked mean pooling needs the mask, so no tail
    input_padding={qualname(SameConv): same_pad},
    pointwise_convs={qualname(SameConv): "zero padding at 1x1 stride 1"},
    same_padding_convs={qualname(SameConv): "F.pad of TF 'same' padding, then an unpadded conv"},
    clamp_activations={qualname(Clamp6): lambda m: (0.0, 6.0)},
    shared_input_children={qualname(Attention): (("q_proj", "k_proj", "v_proj"),),
                           qualname(GatedMLP): (("gate_proj", "up_proj"),)},
))
