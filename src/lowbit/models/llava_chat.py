"""Chat formatting for LLaVA models: the language model's own chat template, with the image spliced in.

The prompt is rendered by the tokenizer's chat template with a placeholder where the image goes; the text is
split at the placeholder and the two halves tokenized separately, so the visual embeddings can be inserted
between them without the tokenizer ever seeing an image token (any causal LM works, with or without an
``<image>`` token in its vocabulary). Tokenizers without a chat template get LLaVA-1.5's plain format.

For training, ``encode_conversation`` renders growing prefixes of a multi-turn conversation and tokenizes
each new piece on its own, marking the assistant pieces: the loss is computed on answer tokens only
(plus the end-of-turn token that closes each answer, so the model learns to stop).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lowbit.errors import LowbitError

IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, image, padding), as in transformers
# LLaVA-1.5's conversation format, for tokenizers that ship no chat template.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'USER: ' + m['content'] + '\n' }}"
    "{% else %}{{ 'ASSISTANT: ' + m['content'] + eos_token + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _messages(system: str | None, turns: Sequence[tuple[str, str | None]]) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    for i, (question, answer) in enumerate(turns):
        content = f"{IMAGE_PLACEHOLDER}\n{question}" if i == 0 else question
        msgs.append({"role": "user", "content": content})
        if answer is not None:
            msgs.append({"role": "assistant", "content": answer})
    return msgs


def render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The chat template applied to ``messages`` as text (LLaVA-1.5 format when the tokenizer has none)."""
    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_TEMPLATE
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         chat_template=template)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def prompt_ids(tokenizer: Any, question: str, system: str | None) -> tuple[list[int], list[int]]:
    """Token ids before and after the image for a one-question chat prompt ending with the assistant cue."""
    text = render(tokenizer, _messages(system, [(question, None)]), add_generation_prompt=True)
    pre, found, post = text.partition(IMAGE_PLACEHOLDER)
    if not found:
        raise LowbitError("the chat template dropped the image placeholder; accepted: a template that keeps the "
                          "user message text")
    return _ids(tokenizer, pre), _ids(tokenizer, post)


@dataclass
class EncodedConversation:
    """One training sequence: ``pre`` ids, the image, then ``post`` ids with ``labels`` (IGNORE_INDEX = no loss)."""

    pre: list[int]
    post: list[int]
    labels: list[int]


def encode_conversation(tokenizer: Any, turns: Sequence[tuple[str, str]], system: str | None) -> EncodedConversation:
    """Tokenize a multi-turn image conversation; labels keep only the answer tokens.

    Example:
        >>> enc = encode_conversation(tok, [("What is it?", "a bag"), ("Is it a shoe?", "no")], None)  # doctest: +SKIP
        >>> [t for t, l in zip(enc.post, enc.labels) if l != -100]  # doctest: +SKIP
    """
    if not turns:
        raise LowbitError("a training conversation needs at least one (question, answer) turn; received none")
    pre, post = prompt_ids(tokenizer, turns[0][0], system)
    labels = [IGNORE_INDEX] * len(post)
    asked = render(tokenizer, _messages(system, [(turns[0][0], None)]), add_generation_prompt=True)
    done = asked
    for i in range(len(turns)):
        if i > 0:  # the next question: prompt tokens
            asked = render(tokenizer, _messages(system, [*turns[:i], (turns[i][0], None)]), add_generation_prompt=True)
            piece = _ids(tokenizer, _suffix(asked, done))
            post += piece
            labels += [IGNORE_INDEX] * len(piece)
        done = render(tokenizer, _messages(system, turns[: i + 1]), add_generation_prompt=False)
        answer = _ids(tokenizer, _suffix(done, asked))
        post += answer
        labels += answer
    return EncodedConversation(pre, post, labels)


def _suffix(text: str, prefix: str) -> str:
    if not text.startswith(prefix):
        raise LowbitError("the chat template is not prefix-stable (a longer conversation re-renders earlier "
                          "turns differently); accepted: templates like ChatML or LLaVA's")
    return text[len(prefix):]
