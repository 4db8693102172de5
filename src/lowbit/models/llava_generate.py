"""Answering with a LLaVA model: greedy or sampled decoding, by lowbit's lean engine or transformers' ``generate``.

The prompt goes in as embeddings (text embeddings with the projected visual tokens spliced in, see
``LlavaModel.prompt_embeddings``); the KV cache makes each new token cost one position, and the streamer gets
every token. Decoding stops at the tokenizer's end-of-turn / end-of-sequence tokens or after
``max_new_tokens``, and never runs past the LM's context window.

One question (B == 1) with a float KV cache runs on ``lowbit.models.lean_decode.LeanDecoder`` when it supports
the language model (Llama family): the same tokens as ``generate`` without its per-token overhead. Batches
(left padding), quantized KV caches (``kv_bits``), ``use_cache=False``, other LMs or ``lean=False`` use
``generate``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from lowbit.errors import LowbitError

if TYPE_CHECKING:
    from lowbit.models.llava import LlavaModel

ImageLike = Image.Image | str | os.PathLike[str] | bytes


@dataclass(frozen=True)
class Decoding:
    """How to pick tokens: greedy (``do_sample=False``) or sampling with temperature / top-p / top-k."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    use_cache: bool = True
    kv_bits: int | None = None  # store the KV cache at 8 or 4 bits (None: the model's config, default float)
    lean: bool = True  # use the lean engine where it applies (see the module docstring)

    def validated(self) -> Decoding:
        from lowbit.models.lean_decode import check_decoding

        check_decoding(self.max_new_tokens, self.do_sample, self.temperature, self.top_p)
        return self


def stop_token_ids(tokenizer: Any, language: Any) -> list[int]:
    """End-of-sequence ids of the generation config and tokenizer, plus ChatML's end-of-turn if present."""
    ids: list[int] = []
    gen_eos = getattr(getattr(language, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        ids += value if isinstance(value, list) else [value] if value is not None else []
    end_turn = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    return sorted({i for i in [*ids, end_turn] if i is not None})


class _CallbackStreamer:
    """transformers streamer protocol (``put``/``end``): decode the new tokens and hand text pieces to ``fn``.

    Text is emitted when it decodes cleanly (not ending in a partial UTF-8 character), so multi-token
    characters arrive whole.
    """

    def __init__(self, tokenizer: Any, fn: Callable[[str], None], stop_ids: Sequence[int]) -> None:
        self.tokenizer, self.fn, self.stop = tokenizer, fn, set(stop_ids)
        self.ids: list[int] = []
        self.sent = 0
        self.first = True

    def put(self, value: torch.Tensor) -> None:
        if self.first:  # generate() first passes the prompt ids (empty: the prompt is embeddings)
            self.first = False
            return
        self.ids += [int(t) for t in value.reshape(-1) if int(t) not in self.stop]
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        if len(text) > self.sent:
            self.fn(text[self.sent:])
            self.sent = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > self.sent:
            self.fn(text[self.sent:])
        self.sent = len(text)


@dataclass
class Generation:
    """Answers and, if asked for, the log-probabilities of each answer's first token [B, V]."""

    texts: list[str]
    token_ids: list[list[int]]
    first_logprobs: torch.Tensor | None = None


@torch.inference_mode()
def generate_batch(model: LlavaModel, pixels: torch.Tensor, questions: Sequence[str], decoding: Decoding = Decoding(),
                   stream: Callable[[str], None] | None = None, first_logprobs: bool = False) -> Generation:
    """Answer one question per image of ``pixels`` [B, 3, H, W] (left-padded batch; streaming needs B == 1)."""
    decoding = decoding.validated()
    if stream is not None and len(questions) != 1:
        raise LowbitError(f"streaming answers one question at a time; received {len(questions)}")
    embeds, mask = model.prompt_embeddings(model.visual_embeddings(pixels), questions)  # [B, T, D], [B, T]
    room = model.context_window - embeds.shape[1]
    if room < 1:
        raise LowbitError(f"the prompt is {embeds.shape[1]} tokens and fills the language model's context window "
                          f"of {model.context_window}; accepted: a shorter question")
    tok = model.tokenizer
    stops = stop_token_ids(tok, model.language)
    kwargs: dict[str, Any] = {
        "max_new_tokens": min(decoding.max_new_tokens, room), "do_sample": decoding.do_sample,
        "use_cache": decoding.use_cache, "eos_token_id": stops,
        "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else stops[0],
        "return_dict_in_generate": True, "output_logits": first_logprobs,
    }
    if decoding.do_sample:
        kwargs.update(temperature=decoding.temperature, top_p=decoding.top_p, top_k=decoding.top_k)
    else:  # say "greedy" explicitly: a checkpoint's generation_config may default to sampling
        kwargs.update(temperature=None, top_p=None, top_k=None)
    kv_bits = decoding.kv_bits if decoding.kv_bits is not None else model.config.kv_bits
    if kv_bits and decoding.use_cache:
        from lowbit.models.llava_kvcache import quantized_kv_cache

        kwargs["cache"] = quantized_kv_cache(model.language.config, kv_bits)
    streamer = _CallbackStreamer(tok, stream, stops) if stream is not None else None
    if _lean_applies(model, decoding, kv_bits, mask, embeds.shape[1] + kwargs["max_new_tokens"]):
        sequences, logits0 = _lean(model, decoding, embeds, kwargs["max_new_tokens"], stops, kwargs["pad_token_id"],
                                   streamer, first_logprobs)
    else:
        if streamer is not None:
            kwargs["streamer"] = streamer
        if decoding.seed is not None:
            torch.manual_seed(decoding.seed)
        out = model.language.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        # With inputs_embeds only, generate returns just the new tokens [B, new].
        sequences, logits0 = out.sequences, out.logits[0] if first_logprobs else None
    rows = []
    for seq in sequences.tolist():
        cut = next((i for i, t in enumerate(seq) if t in stops), len(seq))
        rows.append(seq[:cut])
    texts = [tok.decode(r, skip_special_tokens=True).strip() for r in rows]
    logprobs = torch.log_softmax(logits0.float(), dim=-1) if logits0 is not None else None
    return Generation(texts, rows, logprobs)


def _lean_applies(model: LlavaModel, decoding: Decoding, kv_bits: int | None, mask: torch.Tensor,
                  max_len: int) -> bool:
    from lowbit.models.lean_decode import unsupported_reason

    return (decoding.lean and decoding.use_cache and not kv_bits and mask.shape[0] == 1 and bool(mask.all())
            and unsupported_reason(model.language, max_len) is None)


def _lean(model: LlavaModel, decoding: Decoding, embeds: torch.Tensor, max_new_tokens: int, stops: list[int],
          pad_id: int, streamer: _CallbackStreamer | None,
          first_logprobs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """New tokens [1, n] and (if asked) the first step's logits [1, V] from the lean engine."""
    from lowbit.models.lean_decode import LeanDecoder

    if streamer is not None:
        streamer.first = False  # no prompt-ids call to skip: the engine hands over new tokens only
    out = LeanDecoder(model.language).generate(
        inputs_embeds=embeds, max_new_tokens=max_new_tokens, do_sample=decoding.do_sample,
        temperature=decoding.temperature, top_k=decoding.top_k, top_p=decoding.top_p, seed=decoding.seed,
        stop_ids=stops, pad_id=pad_id, callback=None if streamer is None else streamer.put,
        return_logits=first_logprobs)
    if streamer is not None:
        streamer.end()
    return out.tokens, out.logits[0] if out.logits is not None else None


def generate(model: LlavaModel, image: ImageLike, question: str, max_new_tokens: int | None = None,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | None = None, stream: Callable[[str], None] | None = None, use_cache: bool = True,
             kv_bits: int | None = None) -> str:
    """Answer ``question`` about ``image`` (PIL image, path or bytes); ``stream`` receives text as it comes.

    Example:
        >>> generate(model, "shoe.png", "What is this item?")  # doctest: +SKIP
        'sneaker'
        >>> generate(model, "shoe.png", "Describe it.", do_sample=True, seed=0, stream=print)  # doctest: +SKIP
    """
    from lowbit.models.llava import open_rgb

    if not question or not question.strip():
        raise LowbitError("the question is empty; accepted: a non-empty string")
    pixels = model.preprocess([open_rgb(image)])
    decoding = Decoding(max_new_tokens or model.config.max_new_tokens, do_sample, temperature, top_p, top_k, seed,
                        use_cache, kv_bits)
    return generate_batch(model, pixels, [question], decoding, stream=stream).texts[0]
