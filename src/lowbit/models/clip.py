"""``clip``: Hugging Face ``CLIPModel`` and ``SiglipModel`` checkpoints (Radford et al., 2021, "Learning
Transferable Visual Models From Natural Language Supervision"; Zhai et al., 2023, "Sigmoid Loss for Language
Image Pre-Training"), from a local directory or, when online, a hub id.

The model math is transformers'; this module maps it onto lowbit's DualEncoder interface and names the towers.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from lowbit.errors import LowbitError
from lowbit.limits import MAX_CONFIG_OVERSIZE, read_json
from lowbit.models.base import DualEncoder, ModelFamily
from lowbit.models.spec import FamilySpec, register_family

SUPPORTED_TYPES = ("clip", "siglip")


class HFDualEncoder(DualEncoder):
    """A transformers CLIPModel/SiglipModel behind the DualEncoder interface.

    Towers: ``vision`` = ``model.vision_model`` (for SigLIP without its pooling head), ``text`` =
    ``model.text_model`` (for SigLIP without its head), ``projector`` = the projections (CLIP:
    ``visual_projection``/``text_projection``; SigLIP: the attention-pooling head and the text head).
    """

    family = "clip"

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, max_text_tokens: int) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_text_tokens = max_text_tokens
        self.model_type: str = model.config.model_type

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        rgb = [img.convert("RGB") for img in images]
        return self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        # SigLIP was trained with max-length padding and no attention mask; CLIP with a mask.
        padding = "max_length" if self.model_type == "siglip" else True
        enc = self.tokenizer(
            list(texts), padding=padding, truncation=True, max_length=self.max_text_tokens, return_tensors="pt"
        )
        tokens = {"input_ids": enc["input_ids"]}
        if self.model_type != "siglip" and "attention_mask" in enc:
            tokens["attention_mask"] = enc["attention_mask"]
        return tokens

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model.get_image_features(pixel_values=pixels)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model.get_text_features(**tokens)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def towers(self) -> dict[str, nn.Module]:
        m = self.model
        if self.model_type == "siglip":
            vision = nn.ModuleDict({k: v for k, v in m.vision_model.named_children() if k != "head"})
            text = nn.ModuleDict({k: v for k, v in m.text_model.named_children() if k != "head"})
            heads = {"image": m.vision_model.head, "text": m.text_model.head}
            projector = nn.ModuleDict({k: v for k, v in heads.items() if v is not None})
            return {"vision": vision, "text": text, "projector": projector}
        projector = nn.ModuleDict({"image": m.visual_projection, "text": m.text_projection})
        return {"vision": m.vision_model, "text": m.text_model, "projector": projector}

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    @property
    def logit_bias(self) -> torch.Tensor | None:
        return getattr(self.model, "logit_bias", None)


def _model_type(path: Path) -> str | None:
    config = path / "config.json"
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return data.get("model_type") if isinstance(data, dict) else None


def _tower_params(cfg: dict[str, Any]) -> int:
    """Rough parameters of one transformer tower from its config: 12 H^2 per layer plus the embeddings."""
    def number(key: str, default: int) -> int:
        value = cfg.get(key, default)
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default

    hidden = number("hidden_size", 512)
    return number("num_hidden_layers", 12) * 12 * hidden * hidden + number("vocab_size", 0) * hidden


def check_config_size(path: Path) -> None:
    """Refuse a config describing a model far larger than its weight files (a 100,000-layer ``config.json``
    beside a small checkpoint would take minutes and gigabytes to build): the configured parameters at 2 bytes
    each may be at most ``MAX_CONFIG_OVERSIZE`` times the bytes of the weight files, plus 64 MB."""
    config = read_json(path / "config.json", "model config", "a transformers config.json")
    if not isinstance(config, dict):
        raise LowbitError(f"{str(path / 'config.json')!r} is not a JSON object; accepted: a transformers config")
    towers = [c for c in (config.get("text_config"), config.get("vision_config")) if isinstance(c, dict)] or [config]
    params = sum(_tower_params(c) for c in towers)
    weights = sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))
    if 2 * params > MAX_CONFIG_OVERSIZE * weights + 64 * 2**20:
        raise LowbitError(f"{str(path / 'config.json')!r} describes ~{params:,} parameters but the weight files hold "
                          f"{weights:,} bytes; accepted: a config matching its weights (at most "
                          f"{MAX_CONFIG_OVERSIZE}x their size)")


def is_hf_dual_encoder_dir(path: str) -> bool:
    """True for a local directory holding a transformers CLIP or SigLIP checkpoint."""
    return Path(path).is_dir() and _model_type(Path(path)) in SUPPORTED_TYPES


def load_clip(name_or_path: str, max_text_tokens: int | None = None) -> HFDualEncoder:
    """Load a CLIP/SigLIP checkpoint (local dir, or hub id when online) with its tokenizer and image processor.

    Example:
        >>> model = load_clip("/models/clip-vit-base-patch32")  # doctest: +SKIP
    """
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    local = Path(name_or_path).is_dir()
    if local:
        check_config_size(Path(name_or_path))  # before transformers builds what the config says
    if local and _model_type(Path(name_or_path)) not in SUPPORTED_TYPES:
        found = _model_type(Path(name_or_path))
        raise LowbitError(
            f"{name_or_path} holds a {found!r} checkpoint; the clip family accepts model_type "
            f"{' or '.join(SUPPORTED_TYPES)}"
        )
    try:
        model = AutoModel.from_pretrained(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        with warnings.catch_warnings():  # "requires torchvision, falling back to the PIL processor": fine here
            warnings.simplefilter("ignore")
            image_processor = AutoImageProcessor.from_pretrained(name_or_path)
    except OSError as exc:
        where = "directory" if local else "hub id (needs network access)"
        raise LowbitError(f"could not load CLIP/SigLIP {where} {name_or_path!r}: {exc}") from exc
    if model.config.model_type not in SUPPORTED_TYPES:
        raise LowbitError(f"{name_or_path!r} is a {model.config.model_type!r} model; accepted: {SUPPORTED_TYPES}")
    limit = max_text_tokens or model.config.text_config.max_position_embeddings
    wrapper = HFDualEncoder(model.eval(), tokenizer, image_processor, limit)
    wrapper.requires_grad_(False)
    wrapper.source = {"family": "clip", "name": str(name_or_path), "options": {}}
    return wrapper


# --- a self-contained packed checkpoint (lowbit.workflows.checkpoint) -----------------------------------------
MODEL_DIR = "model"  # config, tokenizer and image processor files, inside the checkpoint's architecture directory


def save_clip_architecture(model: HFDualEncoder, out: Path) -> dict[str, Any]:
    """Write the transformers config, tokenizer and image processor under ``out``."""
    model.model.config.save_pretrained(out / MODEL_DIR)
    model.tokenizer.save_pretrained(out / MODEL_DIR)
    model.image_processor.save_pretrained(out / MODEL_DIR)
    return {"model": MODEL_DIR, "max_text_tokens": model.max_text_tokens}


def clip_skeleton(path: Path, record: dict[str, Any]) -> HFDualEncoder:
    """The CLIP/SigLIP model of a checkpoint's architecture record, without weights."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

    root = path / record["model"]
    model = AutoModel.from_config(AutoConfig.from_pretrained(root), dtype=torch.float32)
    with warnings.catch_warnings():  # "requires torchvision, falling back to the PIL processor": fine here
        warnings.simplefilter("ignore")
        processor = AutoImageProcessor.from_pretrained(root)
    tokenizer = AutoTokenizer.from_pretrained(root)
    wrapper = HFDualEncoder(model.eval(), tokenizer, processor, int(record["max_text_tokens"]))
    return wrapper.requires_grad_(False)


SPEC = register_family(FamilySpec(
    name="clip",
    description="transformers CLIPModel / SiglipModel behind the DualEncoder interface",
    families=(ModelFamily(
        name="clip",
        load=load_clip,
        claims_path=is_hf_dual_encoder_dir,
        description="Hugging Face CLIPModel / SiglipModel (local directory or hub id)",
    ),),
    dual_encoder=HFDualEncoder,
    towers=("vision", "text", "projector"),
    save_architecture=save_clip_architecture,
    skeleton=clip_skeleton,
    quantizable_attention=("transformers.models.clip.modeling_clip.CLIPAttention",
                           "transformers.models.siglip.modeling_siglip.SiglipAttention"),
))
