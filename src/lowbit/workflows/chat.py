"""One question about one image to a generative (llava) model, loaded by name if need be."""

from __future__ import annotations

from typing import Any

from lowbit.errors import LowbitError, check_options, keyword_parameters
from lowbit.models.llava import LlavaModel
from lowbit.models.llava_generate import generate
from lowbit.workflows.load import load


def chat(model: Any, image: Any, question: str, **options: Any) -> str:
    """Answer ``question`` about ``image``; ``options`` are ``lowbit.models.llava_generate.generate``'s."""
    check_options("chat", options, keyword_parameters(generate, skip=("model", "image", "question")))
    loaded = load(model) if isinstance(model, str) else model
    if not isinstance(loaded, LlavaModel):
        kind = getattr(loaded, "family", type(loaded).__name__)
        raise LowbitError(f"chat needs a generative model; received a {kind!r} model; accepted: llava-fashion-hd, "
                          "llava-fashion, a Llava checkpoint directory or a quantized llava model")
    return generate(loaded, image, question, **options)
