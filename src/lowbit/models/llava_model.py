"""The generative VLM itself: ``LlavaConfig``, ``Projector`` and ``LlavaModel`` (vision -> projector -> LM).

How the built-in and Hugging Face models are assembled and registered as the ``llava`` family is
``lowbit.models.llava``; this module holds only the model, so loaders (``llava_hf``) and generation
(``llava_generate``) can import it without importing each other.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from PIL import Image
from torch import nn

from lowbit.errors import LowbitError, unknown_choice
from lowbit.models.base import DualEncoder, right_padded
from lowbit.models.llava_chat import prompt_ids, render
from lowbit.models.llava_vision import OUTPUT_STRIDES, Preprocess, VisualTokens
from lowbit.models.token_pruning import InLayerPrune, kept_count, prune_tokens

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
        self.kind = kind
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
        return right_padded(rows)

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
