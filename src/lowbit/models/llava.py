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

import copy
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from lowbit.errors import LowbitError, unknown_choice
from lowbit.models.base import FAMILIES, DualEncoder, ModelFamily
from lowbit.models.llava_chat import prompt_ids, render
from lowbit.models.llava_vision import OUTPUT_STRIDES, Preprocess, VisualTokens
from lowbit.models.token_pruning import InLayerPrune, kept_count, prune_tokens

# Built-in VLMs: the same tower, projector shape and LM; each ships its projector under assets/NAME/.
# The default, llava-fashion-hd, reads a 12x12 grid (192 px, output stride 16: 144 visual tokens), the regime
# of real LLaVA models where visual-token pruning pays (most of the prompt is visual tokens); llava-fashion
# reads the 4x4 grid at 128 px (16 tokens): 3x faster to the first token, but pruning saves little there.
DEFAULT_NAME = "llava-fashion-hd"
BUILTIN_NAMES = (DEFAULT_NAME, "llava-fashion")
ASSETS = Path(__file__).resolve().parent.parent / "assets"
PROJECTOR_KINDS = ("linear", "mlp2x_gelu")
CALIBRATION_QUESTION = "What is shown in the image?"  # the question encode_image pairs each image with


@dataclass(frozen=True)
class LlavaConfig:
    """How a LLaVA model prompts and prunes; saved beside the projector weights.

    ``prune_ratio``: share of visual tokens dropped (0 = keep all); ``prune_layer`` where: 0 before the LM,
    ranked by the tower's ``scores`` (see ``llava_vision``), or k >= 1 inside it after its first k layers,
    ranked by the attention they receive there (FastV, ``token_pruning``; runs on the lean decoding engine);
    ``system``: the system message of every prompt (None = the template's).
    """

    image_size: int = 128
    output_stride: int = 32  # of an EfficientNet tower's token grid: 16 or 8 = 4x or 16x the tokens (llava_vision)
    projector: str = "mlp2x_gelu"
    system: str | None = "Answer with a few words."
    prune_ratio: float = 0.0
    prune_layer: int = 0
    max_new_tokens: int = 16
    kv_bits: int | None = None  # KV cache stored at 8 or 4 bits during generation (None = float)
    extra: dict[str, Any] = field(default_factory=dict)

    def validated(self) -> LlavaConfig:
        if self.projector not in PROJECTOR_KINDS:
            raise unknown_choice("projector kind", self.projector, PROJECTOR_KINDS)
        if self.output_stride not in OUTPUT_STRIDES:
            raise LowbitError(f"output_stride must be one of {OUTPUT_STRIDES}; received {self.output_stride!r}")
        if self.kv_bits not in (None, 8, 4):
            raise LowbitError(f"kv_bits must be 8 or 4 (or None for a float cache); received {self.kv_bits!r}")
        if not 0.0 <= float(self.prune_ratio) < 1.0:
            raise LowbitError(f"prune_ratio must be in [0, 1); received {self.prune_ratio!r}; accepted: 0 (no "
                              "pruning) up to below 1 (keep at least one visual token)")
        if isinstance(self.prune_layer, bool) or not isinstance(self.prune_layer, int) or self.prune_layer < 0:
            raise LowbitError(f"prune_layer must be an integer >= 0; received {self.prune_layer!r}; accepted: 0 "
                              "(prune before the language model) or k >= 1 (after its first k layers, FastV)")
        return self


class Projector(nn.Module):
    """``(x - mean) / std`` then Linear (``linear``) or Linear-GELU-Linear (``mlp2x_gelu``, LLaVA-1.5).

    The standardisation is a float op on buffers set from training features, not folded into the first
    Linear: folding would scale weight columns by 1/std and hurt per-channel weight quantization.
    """

    def __init__(self, in_dim: int, out_dim: int, kind: str = "mlp2x_gelu") -> None:
        super().__init__()
        if kind not in PROJECTOR_KINDS:
            raise unknown_choice("projector kind", kind, PROJECTOR_KINDS)
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        if kind == "mlp2x_gelu":
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers((x - self.mean) / self.std)


def linear_widths(module: nn.Module) -> tuple[int | None, int | None]:
    """(in_features of the first Linear, out_features of the last Linear) of ``module``."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        return None, None
    return linears[0].in_features, linears[-1].out_features


class LlavaModel(DualEncoder):
    """Vision tower + projector + causal LM, with the LM's tokenizer and the tower's preprocessing."""

    family = "llava"

    def __init__(self, vision: VisualTokens, projector: nn.Module, language: nn.Module, tokenizer: Any,
                 preprocess: Preprocess, config: LlavaConfig = LlavaConfig()) -> None:
        super().__init__()
        hidden = int(language.config.hidden_size)
        p_in, p_out = linear_widths(projector)
        if p_out != hidden:
            raise LowbitError(f"the projector outputs {p_out}-d tokens but the language model's hidden size is "
                              f"{hidden}; accepted: a projector whose last layer has out_features={hidden}")
        if p_in is not None and p_in != vision.out_dim:
            raise LowbitError(f"the projector takes {p_in}-d inputs but the vision tower gives {vision.out_dim}-d "
                              f"tokens; accepted: a projector whose first layer has in_features={vision.out_dim}")
        self.vision = vision
        self.projector = projector
        self.language = language
        self.tokenizer = tokenizer
        self._preprocess = preprocess
        self.config = config.validated()
        self.register_buffer("_log_scale", torch.zeros(()), persistent=False)

    # --- the LLaVA parts ------------------------------------------------------------------------------------
    @property
    def context_window(self) -> int:
        """Longest sequence (prompt + generated tokens) the LM's positions cover."""
        cfg = self.language.config
        return int(getattr(cfg, "max_position_embeddings", None) or self.tokenizer.model_max_length)

    def with_config(self, **changes: Any) -> LlavaModel:
        """The same model (weights shared, not copied) prompting/pruning/caching under changed config fields.

        Example:
            >>> pruned = model.with_config(prune_ratio=0.5)  # doctest: +SKIP
        """
        view = copy.copy(self)  # shallow: the submodule dict, parameters and tokenizer are shared
        view.__dict__["config"] = replace(self.config, **changes).validated()
        return view

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self._preprocess(list(images))

    def visual_embeddings(self, pixels: torch.Tensor, prune_ratio: float | None = None) -> torch.Tensor:
        """Pixels [B, 3, H, W] -> projected visual tokens [B, N', D] (N' < N when pruning before the LM)."""
        tokens, scores = self.vision(pixels)  # [B, N, C], [B, N]
        ratio = self.config.prune_ratio if prune_ratio is None else prune_ratio
        if self.config.prune_layer == 0:  # FastV (prune_layer >= 1) prunes inside the LM: see in_layer_prune
            tokens = prune_tokens(tokens, scores, ratio)  # [B, N', C]
        return self.projector(tokens)  # [B, N', D]

    @property
    def prunes_inside_lm(self) -> bool:
        """Does the config drop visual tokens inside the LM (FastV: ``prune_layer`` >= 1 and a ratio > 0)?"""
        return bool(self.config.prune_layer and self.config.prune_ratio)

    def in_layer_prune(self, question: str, n_visual: int) -> InLayerPrune | None:
        """The FastV step for one prompt of ``n_visual`` visual tokens (None: no pruning inside the LM)."""
        if not self.prunes_inside_lm:
            return None
        before, _ = self.prompt_ids(question)
        return InLayerPrune(self.config.prune_layer, len(before), n_visual,
                            kept_count(n_visual, self.config.prune_ratio))

    def embed_ids(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Token ids [T] or [B, T] -> the LM's input embeddings [..., T, D]."""
        t = torch.as_tensor(ids, dtype=torch.long)
        return self.language.get_input_embeddings()(t)

    def prompt_ids(self, question: str) -> tuple[list[int], list[int]]:
        """Token ids around the image for ``question`` (chat template, system message, assistant cue)."""
        return prompt_ids(self.tokenizer, question, self.config.system)

    def prompt_embeddings(self, visual: torch.Tensor, questions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt embeddings [B, T, D] and attention mask [B, T] for one image per question.

        Left padding keeps every prompt's last token at the same position, which batched generation needs.
        """
        if visual.shape[0] != len(questions):
            raise LowbitError(f"got {visual.shape[0]} images for {len(questions)} questions; accepted: one each")
        parts = []
        for v, q in zip(visual, questions, strict=True):
            pre, post = self.prompt_ids(q)
            parts.append(torch.cat([self.embed_ids(pre), v, self.embed_ids(post)]))  # [T_i, D]
        longest = max(p.shape[0] for p in parts)
        if longest > self.context_window:
            n_vis = visual.shape[1]
            raise LowbitError(f"the prompt is {longest} tokens ({n_vis} visual + {longest - n_vis} text) but the "
                              f"language model's context window is {self.context_window} tokens; accepted: a "
                              f"shorter question (at most {self.context_window - n_vis} text tokens)")
        embeds = visual.new_zeros(len(parts), longest, visual.shape[-1])
        mask = torch.zeros(len(parts), longest, dtype=torch.long)
        for i, p in enumerate(parts):
            embeds[i, longest - p.shape[0]:] = p
            mask[i, longest - p.shape[0]:] = 1
        return embeds, mask

    def answer_logits(self, pixels: torch.Tensor, questions: Sequence[str]) -> torch.Tensor:
        """Logits [B, V] of the first answer token for each image+question (one forward, no generation)."""
        embeds, mask = self.prompt_embeddings(self.visual_embeddings(pixels), questions)
        out = self.language(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=1)
        return out.logits[:, -1]

    # --- DualEncoder interface (quantization, calibration and footprint reuse it) ---------------------------
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Each text as a one-message chat prompt, right-padded ids and attention mask."""
        rows = [self.tokenizer(render(self.tokenizer, [{"role": "user", "content": t}], True),
                               add_special_tokens=False)["input_ids"] for t in texts]
        longest = max((len(r) for r in rows), default=0)
        ids = torch.zeros(len(rows), longest, dtype=torch.long)
        mask = torch.zeros(len(rows), longest, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def _mean_hidden(self, out: Any, mask: torch.Tensor) -> torch.Tensor:
        hidden = out.hidden_states[-1]  # [B, T, D]
        m = mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)  # [B, D]

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        embeds, mask = self.prompt_embeddings(self.visual_embeddings(pixels), [CALIBRATION_QUESTION] * len(pixels))
        out = self.language(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
        return self._mean_hidden(out, mask)

    def text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.language(**tokens, output_hidden_states=True, logits_to_keep=1)
        return self._mean_hidden(out, tokens["attention_mask"])

    def towers(self) -> dict[str, nn.Module]:
        return {"vision": self.vision, "projector": self.projector, "language": self.language}

    @property
    def logit_scale(self) -> torch.Tensor:
        return self._log_scale  # scale 1: "similarity" of a generative model is a plain cosine

    # --- generation (llava_generate) ------------------------------------------------------------------------
    def chat(self, image: Any, question: str, **options: Any) -> str:
        """Answer ``question`` about ``image`` (a PIL image or a path); see ``llava_generate.generate``."""
        from lowbit.models.llava_generate import generate

        return generate(self, image, question, **options)

    def projector_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous() for k, v in self.projector.state_dict().items()}


# --- images ---------------------------------------------------------------------------------------------------
def open_rgb(image: Image.Image | str | os.PathLike[str] | bytes) -> Image.Image:
    """A PIL image from an image, a path or raw bytes; anything undecodable is one clear LowbitError."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    what = f"{len(image)} bytes" if isinstance(image, bytes) else repr(str(image))
    try:
        src = io.BytesIO(image) if isinstance(image, bytes) else Path(image)
        with Image.open(src) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError:
        raise LowbitError(f"image {what} does not exist; accepted: a path to a PNG/JPEG/... file") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise LowbitError(f"cannot decode image {what} ({type(exc).__name__}); accepted: a readable PNG, JPEG, "
                          "BMP, GIF or WebP file") from None


# --- building ---------------------------------------------------------------------------------------------------
def _causal_lm(language: str | nn.Module) -> tuple[nn.Module, Any]:
    if not isinstance(language, str):
        raise LowbitError("from_parts(language=...) takes a name or directory; pass (model, tokenizer) via "
                          "LlavaModel(...) to use objects")
    from lowbit.models import smollm

    if language in (smollm.NAME, "smollm2"):
        return smollm.load_smollm2()
    if not (Path(language) / "config.json").is_file():
        raise LowbitError(f"language model {language!r} is neither {smollm.NAME!r} nor a directory with a "
                          "transformers config.json; accepted: one of those")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(language, dtype="float32").eval()
    return lm, AutoTokenizer.from_pretrained(language)


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
               prune_ratio: float | None = None, kv_bits: int | None = None, prune_layer: int | None = None,
               **_: Any) -> LlavaModel:
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


def is_hf_llava_dir(path: str) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "llava"
    except (OSError, ValueError):
        return False


FAMILIES.register("llava")(
    ModelFamily(
        name="llava",
        load=load_llava,
        builtin_names=BUILTIN_NAMES,
        claims_path=is_hf_llava_dir,
        description="LLaVA VLM: vision tower -> projector -> causal LM (built-in: EfficientNet-Lite0 + SmolLM2-135M)",
    )
)
