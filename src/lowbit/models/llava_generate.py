"""Answering with a LLaVA model: greedy or sampled decoding, by lowbit's lean engine or transformers' ``generate``.

The prompt goes in as embeddings (text embeddings with the projected visual tokens spliced in, see
``LlavaModel.prompt_embeddings``); the KV cache makes each new token cost one position, and the streamer gets
every token. Decoding stops at the tokenizer's end-of-turn / end-of-sequence tokens or after
``max_new_tokens``, and never runs past the LM's context window.

One question (B == 1) with a float KV cache runs on ``lowbit.models.lean_decode.LeanDecoder`` when it supports
the language model (Llama family): the same tokens as ``generate`` without its per-token overhead. Batches
(left padding), quantized KV caches (``kv_bits``), ``use_cache=False``, other LMs or ``lean=False`` use
``generate``. Visual-token pruning inside the LM (FastV, ``LlavaConfig.prune_layer``) needs the lean engine:
a batch is then answered one question at a time.
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
    from lowbit.models.llava_model import LlavaModel
    from lowbit.models.token_pruning import InLayerPrune

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


_STOP_CACHE = "_lowbit_stop_ids"  # tokenizer attribute: (key, ids) of the last stop_token_ids answer


def stop_token_ids(tokenizer: Any, language: Any) -> list[int]:
    """End-of-sequence ids of the generation config and tokenizer, plus ChatML's end-of-turn if present.

    Cached on the tokenizer (keyed by the ids it depends on and the vocabulary size): ``get_vocab()`` builds a
    dict of the whole vocabulary (49k entries for SmolLM2), which was most of the ~27 ms of Python in every
    answer's time to first token (benchmarks/results/vlm-ttft.json, profile_ms)."""
    ids: list[int] = []
    gen_eos = getattr(getattr(language, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        ids += value if isinstance(value, list) else [value] if value is not None else []
    key = (tuple(ids), len(tokenizer))
    hit = getattr(tokenizer, _STOP_CACHE, None)
    if hit is not None and hit[0] == key:
        return list(hit[1])
    end_turn = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    out = sorted({i for i in [*ids, end_turn] if i is not None})
    try:
        setattr(tokenizer, _STOP_CACHE, (key, tuple(out)))
    except AttributeError:  # a tokenizer object that takes no attributes: computed each time
        pass
    return out


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
    """Answer one question per image of ``pixels`` [B, 3, H, W] (left-padded batch; streaming needs B == 1).

    Pruning inside the LM (``config.prune_layer`` >= 1, FastV) answers one question at a time on the lean
    engine: each prompt prunes its own visual tokens.
    """
    decoding = decoding.validated()
    if stream is not None and len(questions) != 1:
        raise LowbitError(f"streaming answers one question at a time; received {len(questions)}")
    visual = model.visual_embeddings(pixels)  # [B, N', D]
    if model.prunes_inside_lm and len(questions) > 1:
        parts = [_answer(model, visual[i:i + 1], [q], decoding, stream, first_logprobs)
                 for i, q in enumerate(questions)]
        rows = [r for part_rows, _ in parts for r in part_rows]
        logits0 = torch.cat([lg for _, lg in parts]) if first_logprobs else None  # type: ignore[misc]
    else:
        rows, logits0 = _answer(model, visual, questions, decoding, stream, first_logprobs)
    texts = [model.tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows]
    logprobs = torch.log_softmax(logits0.float(), dim=-1) if logits0 is not None else None
    return Generation(texts, rows, logprobs)


def _answer(model: LlavaModel, visual: torch.Tensor, questions: Sequence[str], decoding: Decoding,
            stream: Callable[[str], None] | None, first_logprobs: bool,
            forced: bool = False) -> tuple[list[list[int]], torch.Tensor | None]:
    """New token ids per question (up to its first stop token) and the first step's logits [B, V] if asked;
    ``forced``: exactly ``decoding.max_new_tokens`` tokens, stop tokens ignored (what timing measures)."""
    embeds, mask = model.prompt_embeddings(visual, questions)  # [B, T, D], [B, T]
    room = model.context_window - embeds.shape[1]
    if room < 1:
        raise LowbitError(f"the prompt is {embeds.shape[1]} tokens and fills the language model's context window "
                          f"of {model.context_window}; accepted: a shorter question")
    tok = model.tokenizer
    stops = stop_token_ids(tok, model.language)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    if forced:
        stops = []
    kwargs: dict[str, Any] = {
        "max_new_tokens": min(decoding.max_new_tokens, room), "do_sample": decoding.do_sample,
        "use_cache": decoding.use_cache, "eos_token_id": stops or None, "pad_token_id": pad_id,
        "return_dict_in_generate": True, "output_logits": first_logprobs,
    }
    if forced:
        kwargs["min_new_tokens"] = kwargs["max_new_tokens"]
    if decoding.do_sample:
        kwargs.update(temperature=decoding.temperature, top_p=decoding.top_p, top_k=decoding.top_k)
    else:  # say "greedy" explicitly: a checkpoint's generation_config may default to sampling
        kwargs.update(temperature=None, top_p=None, top_k=None)
    kv_bits = decoding.kv_bits if decoding.kv_bits is not None else model.config.kv_bits
    if kv_bits and decoding.use_cache:
        from lowbit.models.llava_kvcache import quantized_kv_cache

        kwargs["cache"] = quantized_kv_cache(model.language.config, kv_bits)
    streamer = _CallbackStreamer(tok, stream, stops) if stream is not None else None
    prune = model.in_layer_prune(questions[0], visual.shape[1]) if len(questions) == 1 else None
    lean_reason = _lean_reason(model, decoding, kv_bits, mask, embeds.shape[1] + kwargs["max_new_tokens"])
    _check_fastv(model, prune, lean_reason)
    if lean_reason is None:
        sequences, logits0 = _lean(model, decoding, embeds, kwargs["max_new_tokens"], stops, kwargs["pad_token_id"],
                                   streamer, first_logprobs, prune)
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
    return rows, logits0


def _check_fastv(model: LlavaModel, prune: InLayerPrune | None, lean_reason: str | None) -> None:
    if prune is not None and lean_reason is not None:
        raise LowbitError(f"pruning inside the language model (prune_layer={model.config.prune_layer}) runs on "
                          f"the lean decoding engine, which cannot run here: {lean_reason}; accepted: "
                          "prune_layer=0 (prune before the language model)")


@torch.inference_mode()
def forced_tokens(model: LlavaModel, pixels: torch.Tensor, question: str, n: int) -> torch.Tensor:
    """Exactly ``n`` greedy new tokens [1, n] (stop tokens ignored) for one image [1, 3, H, W] and question, on
    the engine ``generate_batch`` picks (lean or transformers', with the config's pruning and KV bits): what
    time to first token (n = 1) and decode speed measure."""
    rows, _ = _answer(model, model.visual_embeddings(pixels), [question], Decoding(n), None, False, forced=True)
    return torch.tensor(rows, dtype=torch.long)


def _lean_reason(model: LlavaModel, decoding: Decoding, kv_bits: int | None, mask: torch.Tensor,
                 max_len: int) -> str | None:
    """Why these prompts do not run on the lean engine (None: they do)."""
    from lowbit.models.lean_decode import unsupported_reason

    if not (decoding.lean and decoding.use_cache):
        return "lean=False or use_cache=False was asked for"
    if kv_bits:
        return f"a {kv_bits}-bit KV cache (kv_bits) is transformers' cache"
    if mask.shape[0] != 1 or not bool(mask.all()):
        return "a batch of prompts (it answers one at a time)"
    return unsupported_reason(model.language, max_len)


def _lean(model: LlavaModel, decoding: Decoding, embeds: torch.Tensor, max_new_tokens: int, stops: list[int],
          pad_id: int, streamer: _CallbackStreamer | None, first_logprobs: bool,
          prune: InLayerPrune | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """New tokens [1, n] and (if asked) the first step's logits [1, V] from the lean engine."""
    from lowbit.models.lean_decode import LeanDecoder

    if streamer is not None:
        streamer.first = False  # no prompt-ids call to skip: the engine hands over new tokens only
    out = LeanDecoder(model.language).generate(
        inputs_embeds=embeds, max_new_tokens=max_new_tokens, do_sample=decoding.do_sample,
        temperature=decoding.temperature, top_k=decoding.top_k, top_p=decoding.top_p, seed=decoding.seed,
        stop_ids=stops, pad_id=pad_id, callback=None if streamer is None else streamer.put,
        return_logits=first_logprobs, prune=prune)
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
    from lowbit.models.preprocess import open_rgb

    if not question or not question.strip():
        raise LowbitError("the question is empty; accepted: a non-empty string")
    pixels = model.preprocess([open_rgb(image)])
    decoding = Decoding(max_new_tokens or model.config.max_new_tokens, do_sample, temperature, top_p, top_k, seed,
                        use_cache, kv_bits)
    return generate_batch(model, pixels, [question], decoding, stream=stream).texts[0]
