"""Hugging Face ``LlavaForConditionalGeneration`` checkpoints (a local directory) as lowbit LLaVA models.

The checkpoint is loaded by transformers, then taken apart into lowbit's three towers: its vision tower
(hidden states of ``vision_feature_layer``, CLS dropped for the "default" strategy), its
``multi_modal_projector`` (kept as is, so its weights are used unchanged) and its language model re-assembled
as a stand-alone causal LM (``AutoModelForCausalLM`` of ``text_config``, with the checkpoint's decoder and
``lm_head``), so generation, the KV cache and recipes work exactly as for any other causal LM.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.llava_model import LlavaConfig, LlavaModel, linear_widths
from lowbit.models.llava_vision import HFVisionTokens


def _read_config(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise LowbitError(f"cannot read {path / 'config.json'} ({exc}); accepted: a transformers Llava directory") \
            from None
    return raw


def _projector_mismatch(projector: nn.Module, vision_dim: int, text_dim: int) -> str | None:
    p_in, p_out = linear_widths(projector)
    if p_out != text_dim:
        return f"the projector outputs {p_out}-d tokens but the language model's hidden size is {text_dim}"
    if p_in is not None and p_in % vision_dim:
        return f"the projector takes {p_in}-d inputs but the vision tower gives {vision_dim}-d features"
    return None


def _projector_shapes_on_disk(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if "multi_modal_projector" in key and key.endswith("weight"):
                    shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def _check_projector_on_disk(path: Path, vision_dim: int, text_dim: int) -> None:
    shapes = _projector_shapes_on_disk(path)
    first = next((s for k, s in sorted(shapes.items()) if "linear_1" in k), None)
    last = next((s for k, s in sorted(shapes.items()) if "linear_2" in k), None)
    if last is not None and last[0] != text_dim:
        raise LowbitError(f"checkpoint {path} does not fit together: the projector outputs {last[0]}-d tokens but "
                          f"the language model's hidden size is {text_dim}; accepted: projector width == LM "
                          "hidden size")
    if first is not None and first[1] % vision_dim:
        raise LowbitError(f"checkpoint {path} does not fit together: the projector takes {first[1]}-d inputs but "
                          f"the vision tower gives {vision_dim}-d features; accepted: matching widths")


def _standalone_lm(llava: nn.Module, empty: bool = False) -> nn.Module:
    """The checkpoint's decoder + lm_head as an ``AutoModelForCausalLM`` (no copy of the weights); ``empty``:
    ``llava`` itself has no weights yet (a packed checkpoint's skeleton)."""
    from transformers import AutoModelForCausalLM

    text_config = llava.config.text_config
    with torch.device("meta"):  # the shell's own weights are replaced below; do not allocate them
        lm = AutoModelForCausalLM.from_config(text_config)
    setattr(lm, lm.base_model_prefix, llava.model.language_model)
    lm.lm_head = llava.lm_head
    if not empty and any(t.is_meta for t in [*lm.parameters(), *lm.buffers()]):
        raise LowbitError(f"cannot re-assemble the language model ({type(lm).__name__}) of this Llava checkpoint; "
                          "accepted: decoder-only text models with a `model` and `lm_head`")
    lm.generation_config = llava.generation_config
    return lm.eval()


class ProcessorPreprocess:
    """PIL images -> pixels through a transformers image processor (kept, so a checkpoint can save it)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, images: list[Any]) -> torch.Tensor:
        return self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]


def _preprocess(path: Path, image_size: int) -> Any:
    from lowbit.models.preprocess import images_to_tensor

    if (path / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        return ProcessorPreprocess(AutoImageProcessor.from_pretrained(str(path)))
    clip_mean, clip_std = (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)  # CLIP's normalisation
    return lambda images: images_to_tensor(images, image_size, clip_mean, clip_std)


def load_hf_llava(path: str, **options: Any) -> LlavaModel:
    """Load a transformers Llava directory (config.json + safetensors + tokenizer) as a ``LlavaModel``.

    ``options`` are ``LlavaConfig`` fields (``prune_ratio``, ``prune_layer``, ``system``, ``max_new_tokens``).

    Example:
        >>> model = load_hf_llava("checkpoints/llava-1.5-7b-hf")  # doctest: +SKIP
    """
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    root = Path(path)
    raw = _read_config(root)
    if raw.get("model_type") != "llava" or not isinstance(raw.get("vision_config"), dict):
        # refused before anything is allocated: a text-only config would otherwise build a default-sized Llava
        raise LowbitError(f"{str(path)!r} is a {raw.get('model_type')!r} config without a vision_config, not a "
                          "Llava model; accepted: a transformers Llava directory (model_type 'llava'); load a "
                          "text-only causal LM with lowbit.load(dir), or give it to llava.from_parts(vision, dir)")
    vision_dim = int(raw.get("vision_config", {}).get("hidden_size", 0)) or None
    text_dim = int(raw.get("text_config", {}).get("hidden_size", 0)) or None
    if vision_dim and text_dim:  # refuse parts that cannot fit before transformers fails deep inside torch
        _check_projector_on_disk(root, vision_dim, text_dim)
    try:
        llava = LlavaForConditionalGeneration.from_pretrained(str(root), dtype="float32")
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LowbitError(f"cannot load the Llava checkpoint {root}: {first[:300]}") from None
    cfg = llava.config
    config = LlavaConfig(image_size=int(cfg.vision_config.image_size), system=options.pop("system", None),
                         **{k: v for k, v in options.items() if k in ("prune_ratio", "prune_layer", "max_new_tokens",
                                                                    "kv_bits")})
    return assemble(llava, root, AutoTokenizer.from_pretrained(str(root)), config)


def assemble(llava: nn.Module, root: Path, tokenizer: Any, config: LlavaConfig, empty: bool = False) -> LlavaModel:
    """A ``LlavaForConditionalGeneration`` taken apart into a ``LlavaModel`` (``root``: where its image processor
    file may be); ``empty``: ``llava`` has no weights yet (a packed checkpoint's skeleton)."""
    cfg = llava.config
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        raise LowbitError(f"vision_feature_layer {layer!r} (several layers) is not supported; accepted: one int")
    vision = HFVisionTokens(llava.model.vision_tower, layer, cfg.vision_feature_select_strategy)
    projector = llava.model.multi_modal_projector
    problem = _projector_mismatch(projector, vision.out_dim, int(cfg.text_config.hidden_size))
    if problem:
        raise LowbitError(f"checkpoint {root} does not fit together: {problem}")
    model = LlavaModel(vision, projector, _standalone_lm(llava, empty), tokenizer,
                       _preprocess(root, config.image_size), config)
    model.hf_config = cfg  # the whole Llava config: what a packed checkpoint writes to rebuild this model
    return model.eval().requires_grad_(False)
