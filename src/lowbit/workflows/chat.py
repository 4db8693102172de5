"""One question to a generative model, loaded by name if need be: a llava about an image, or a text-only causal LM."""

from __future__ import annotations

from typing import Any

from lowbit.errors import LowbitError, check_options, keyword_parameters
from lowbit.models.causal_lm import CausalLM, generate_text
from lowbit.models.llava import LlavaModel
from lowbit.models.llava_generate import generate
from lowbit.workflows.load import load


def chat(model: Any, image: Any, question: str, **options: Any) -> str:
    """Answer ``question`` about ``image`` (a llava; ``options`` are ``llava_generate.generate``'s), or, for a
    text-only language model, ``question`` alone (``image`` None; options: ``causal_lm.generate_text``'s)."""
    loaded = load(model) if isinstance(model, str) else model
    if isinstance(loaded, CausalLM):
        if image is not None:
            raise LowbitError("this is a text-only language model; it takes no image; accepted: a question alone")
        check_options("chat", options, keyword_parameters(generate_text, skip=("model", "question")))
        return generate_text(loaded, question, **options)
    check_options("chat", options, keyword_parameters(generate, skip=("model", "image", "question")))
    if not isinstance(loaded, LlavaModel):
        kind = getattr(loaded, "family", type(loaded).__name__)
        raise LowbitError(f"chat needs a generative model; received a {kind!r} model; accepted: llava-fashion-hd, "
                          "llava-fashion, a Llava checkpoint directory, a causal-LM directory or .gguf file, or a "
                          "quantized one of those")
    if image is None:
        raise LowbitError("a llava model answers about an image; accepted: an image (--image FILE)")
    return generate(loaded, image, question, **options)
