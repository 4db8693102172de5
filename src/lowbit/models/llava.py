"""``llava``: a generative vision-language model = vision tower -> projector -> causal language model.

LLaVA (Liu et al., 2023, "Visual Instruction Tuning"; LLaVA-1.5's two-layer MLP projector) maps each visual
token of a vision tower into the language model's embedding space and lets the LM read them as part of the
prompt. Here the three parts are plain modules, named ``vision``, ``projector`` and ``language`` for
quantization recipes (``language=w4g64:gptq,vision=w8,projector=w8``):

- ``vision``: a ``VisualTokens`` adapter of any lowbit vision tower (``llava_vision``);
- ``projector``: ``Projector`` (standardise + linear or Linear-GELU-Linear), or HF Llava's own projector;
- ``language``: any Hugging Face causal LM (``AutoModelForCausalLM``), used through ``generate`` / its cache.

Three ways in: the built-ins ``llava-fashion-hd`` (the default) and ``llava-fashion`` (lit-fashion's
EfficientNet-Lite0 grid, 12x12 or 4x4 tokens, + a trained projector shipped in ``assets/NAME/`` +
SmolLM2-135M-Instruct, see ``llava_build``), a local Hugging Face
``LlavaForConditionalGeneration`` directory (``llava_hf``), or ``from_parts(vision, language)``.

The class also implements the ``DualEncoder`` interface so the shared quantization, calibration, footprint and
checkpoint code applies unchanged: ``encode_image`` runs an image+question prompt through all three towers
(the calibration path reaches every tower with image+question sequences) and returns the LM's mean final
hidden state; ``encode_text`` does the same for a text-only chat prompt.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.base import ModelFamily
from lowbit.models.llava_model import (  # noqa: F401  (re-exported: the family's public names)
    CALIBRATION_QUESTION,
    PROJECTOR_KINDS,
    LlavaConfig,
    LlavaModel,
    Projector,
    linear_widths,
)
from lowbit.models.preprocess import open_rgb  # noqa: F401  (re-exported)
from lowbit.models.spec import FamilySpec, register_family

# Built-in VLMs: the same tower, projector shape and LM; each ships its projector under assets/NAME/.
# The default, llava-fashion-hd, reads a 12x12 grid (192 px, output stride 16: 144 visual tokens), the regime
# of real LLaVA models where visual-token pruning pays (most of the prompt is visual tokens); llava-fashion
# reads the 4x4 grid at 128 px (16 tokens): 3x faster to the first token, but pruning saves little there.
DEFAULT_NAME = "llava-fashion-hd"
BUILTIN_NAMES = (DEFAULT_NAME, "llava-fashion")
ASSETS = Path(__file__).resolve().parent.parent / "assets"


# --- building ---------------------------------------------------------------------------------------------------
def _causal_lm(language: str | nn.Module) -> tuple[nn.Module, Any]:
    if not isinstance(language, str):
        raise LowbitError("from_parts(language=...) takes a name or directory; pass (model, tokenizer) via "
                          "LlavaModel(...) to use objects")
    from lowbit.models import smollm

    if language in (smollm.NAME, "smollm2"):
        return smollm.load_smollm2()
    from lowbit.models.causal_lm import is_causal_lm_path, load_causal_lm

    if not is_causal_lm_path(language):
        raise LowbitError(f"language model {language!r} is neither {smollm.NAME!r}, a directory with a transformers "
                          "*ForCausalLM config.json nor a .gguf file; accepted: one of those")
    lm = load_causal_lm(language)  # the causal-lm family: config checked before weights, GGUF dequantized
    return lm.language, lm.tokenizer


def from_parts(vision: str = "lit-fashion", language: str = "smollm2-135m-instruct",
               config: LlavaConfig = LlavaConfig(),
               projector_state: dict[str, torch.Tensor] | None = None) -> LlavaModel:
    """A LLaVA model from any lowbit vision tower and any HF causal LM, with a new (or given) projector.

    Example:
        >>> model = from_parts("lit-fashion", "smollm2-135m-instruct")  # untrained projector  # doctest: +SKIP
    """
    from lowbit.models.llava_vision import default_vision, vision_from_model

    config = config.validated()
    tower, preprocess = (default_vision(config.image_size, config.output_stride) if vision == "lit-fashion"
                         else vision_from_model(vision, image_size=config.image_size,
                                                output_stride=config.output_stride))
    lm, tokenizer = _causal_lm(language)
    projector = Projector(tower.out_dim, int(lm.config.hidden_size), config.projector)
    if projector_state is not None:
        load_projector_state(projector, projector_state)
    model = LlavaModel(tower, projector, lm, tokenizer, preprocess, config)
    model.eval().requires_grad_(False)
    model.source = {"family": "llava", "name": f"{vision}+{language}", "options": {}}
    return model


def load_projector_state(projector: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load projector weights, turning a shape mismatch into one clear error."""
    own = projector.state_dict()
    bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    missing = sorted(set(own) - set(state))
    if bad or missing:
        k = (bad or missing)[0]
        got = tuple(state[k].shape) if k in state else "missing"
        raise LowbitError(f"projector weights do not fit: {k} is {got}, the model needs {tuple(own[k].shape)}; "
                          "accepted: weights trained for this vision tower and language model")
    projector.load_state_dict({k: v.float() for k, v in state.items() if k in own})


def packaged_projector_path(name: str = DEFAULT_NAME) -> Path:
    return ASSETS / name / "projector.safetensors"


def read_projector_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("lowbit", "{}"))
    return load_file(str(path)), meta


def load_llava(name_or_path: str = DEFAULT_NAME, projector: str | os.PathLike[str] | None = None,
               prune_ratio: float | None = None, kv_bits: int | None = None,
               prune_layer: int | None = None) -> LlavaModel:
    """Load a built-in VLM (``llava-fashion-hd``, ``llava-fashion``) or a HF Llava directory; ``projector=`` a
    built file, ``prune_ratio=`` a share of visual tokens to drop, before the LM or (``prune_layer=k``) after
    its first k layers (FastV), ``kv_bits=`` 8 or 4 for a quantized KV cache.

    Example:
        >>> model = load_llava("llava-fashion-hd")  # doctest: +SKIP
        >>> model.chat("shoe.png", "What is this item?")  # doctest: +SKIP
        'sneaker'
    """
    options: dict[str, Any] = {}
    if prune_ratio is not None:
        options["prune_ratio"] = float(prune_ratio)
    if kv_bits is not None:
        options["kv_bits"] = int(kv_bits)
    if prune_layer is not None:
        options["prune_layer"] = prune_layer
    if name_or_path not in BUILTIN_NAMES:
        from lowbit.models.llava_hf import load_hf_llava

        model = load_hf_llava(name_or_path, **options)
        model.source = {"family": "llava", "name": str(name_or_path), "options": options}
        return model
    path = Path(projector) if projector is not None else packaged_projector_path(name_or_path)
    if not path.is_file():
        raise LowbitError(f"trained projector for {name_or_path!r} not found at {path}; build it with "
                          f"`lowbit build {name_or_path} --out {path}`")
    state, meta = read_projector_file(path)
    config = replace(LlavaConfig(**meta.get("config", {})), **options)
    model = from_parts(meta.get("vision", "lit-fashion"), meta.get("language", "smollm2-135m-instruct"), config, state)
    if projector is not None:
        options["projector"] = str(path)
    model.source = {"family": "llava", "name": name_or_path, "options": options}
    return model


# --- a self-contained packed checkpoint (lowbit.workflows.checkpoint) -----------------------------------------
LANGUAGE_DIR, HF_DIR = "language", "llava"  # inside the checkpoint's architecture directory


def _save_language(model: LlavaModel, out: Path) -> None:
    """The LM's generation config and the tokenizer (with its chat template) under ``out``."""
    model.language.generation_config.save_pretrained(out)
    model.tokenizer.save_pretrained(out)


def save_llava_architecture(model: LlavaModel, out: Path) -> dict[str, Any] | None:
    """Write what rebuilds ``model`` without weights under ``out``; the record holds the ``LlavaConfig``.

    A HF Llava model: its whole Llava config (+ image processor) in ``llava/``. A built-in style model
    (EfficientNet-Lite0 grid + ``Projector``): the LM's config in ``language/``, the grid and projector shapes
    in the record. Any other assembly (``from_parts`` with another tower) returns None: not self-contained.
    """
    from lowbit.models.llava_vision import EfficientNetGrid

    record: dict[str, Any] = {"config": asdict(model.config)}
    hf_config = getattr(model, "hf_config", None)
    if hf_config is not None:
        hf_config.save_pretrained(out / HF_DIR)
        _save_language(model, out / HF_DIR)
        processor = getattr(model._preprocess, "processor", None)
        if processor is not None:
            processor.save_pretrained(out / HF_DIR)
        return {**record, "kind": "hf-llava", "dir": HF_DIR}
    if not (isinstance(model.vision, EfficientNetGrid) and isinstance(model.projector, Projector)):
        return None
    model.language.config.save_pretrained(out / LANGUAGE_DIR)
    _save_language(model, out / LANGUAGE_DIR)
    return {**record, "kind": "efficientnet-grid", "language": LANGUAGE_DIR,
            "vision": {"out_dim": model.vision.out_dim, "output_stride": model.vision.output_stride},
            "projector": {"kind": model.projector.kind, "in_dim": int(model.projector.mean.numel())}}


def llava_skeleton(path: Path, record: dict[str, Any]) -> LlavaModel:
    """The LLaVA model of a checkpoint's architecture record, without weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    config = LlavaConfig(**record["config"]).validated()
    if record["kind"] == "hf-llava":
        from transformers import LlavaForConditionalGeneration

        from lowbit.models.llava_hf import assemble

        root = path / record["dir"]
        llava = LlavaForConditionalGeneration._from_config(AutoConfig.from_pretrained(root), dtype=torch.float32)
        llava.generation_config = GenerationConfig.from_pretrained(root)
        return assemble(llava, root, AutoTokenizer.from_pretrained(root), config, empty=True)
    if record["kind"] != "efficientnet-grid":
        raise LowbitError(f"unknown llava architecture kind {record['kind']!r}; accepted: hf-llava, efficientnet-grid")
    from lowbit.models.llava_vision import EfficientNetGrid, efficientnet_preprocess
    from lowbit.models.towers import EfficientNetLite0Features

    vision = EfficientNetGrid(EfficientNetLite0Features(pretrained=False).net, int(record["vision"]["out_dim"]),
                              int(record["vision"]["output_stride"]))
    lm_dir = path / record["language"]
    lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(lm_dir), dtype=torch.float32)
    lm.generation_config = GenerationConfig.from_pretrained(lm_dir)
    projector = Projector(int(record["projector"]["in_dim"]), int(lm.config.hidden_size), record["projector"]["kind"])
    model = LlavaModel(vision, projector, lm.eval(), AutoTokenizer.from_pretrained(lm_dir),
                       efficientnet_preprocess(config.image_size), config)
    return model.eval().requires_grad_(False)


def is_hf_llava_dir(path: str) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "llava"
    except (OSError, ValueError):
        return False


# The language model's knowledge (fused q/k/v and gate/up, the lean decode engine) is its own spec's
# (lowbit.models.hf_causal_lm); the EfficientNet vision tower's is the lit spec's.
SPEC = register_family(FamilySpec(
    name="llava",
    description="LLaVA VLM: a lowbit vision tower -> projector -> a transformers causal LM",
    families=(ModelFamily(
        name="llava",
        load=load_llava,
        builtin_names=BUILTIN_NAMES,
        claims_path=is_hf_llava_dir,
        description="LLaVA VLM: vision tower -> projector -> causal LM (built-in: EfficientNet-Lite0 + SmolLM2-135M)",
    ),),
    dual_encoder=LlavaModel,
    towers=("vision", "projector", "language"),
    # the built-ins' projectors were trained on Fashion-MNIST questions; any other llava takes the default
    calibration_data=lambda model: "fashion-mnist" if model.source.get("name") in BUILTIN_NAMES else None,
    save_architecture=save_llava_architecture,
    skeleton=llava_skeleton,
))
