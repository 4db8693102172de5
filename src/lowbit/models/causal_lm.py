"""``causal-lm``: text-only transformers causal LMs (Llama, Qwen2, Qwen3, Mistral, Gemma 2/3, Phi-3) as lowbit models.

``lowbit.load`` takes an HF causal-LM directory (``config.json`` naming a ``*ForCausalLM`` architecture of one of
those families) or a ``.gguf`` file (transformers' GGUF loader, dequantized to float32). The config is read and
checked before any weight is allocated, so a config of another kind is one line, not a 20 GB allocation.

A ``CausalLM`` is one tower, ``language`` (the same name as a llava's LM, so one recipe serves both:
``language=w4g32:gptq``), plus its tokenizer. It implements the ``DualEncoder`` interface as the llava family
does, so recipes, calibration and packed checkpoints apply: ``tokenize`` / ``encode_text`` run texts through
the LM (mean final hidden state). Greedy or sampled answers (``chat``) run on the lean decode engine
(``lowbit.models.lean_decode``) for the architectures it supports (Llama, Mistral, Qwen2, Qwen3: same tokens as
``generate``), and on transformers' ``generate`` otherwise (Gemma 2/3: soft-capping, alternating sliding
windows, scaled embeddings; Phi-3: fused projections), saying so once per architecture.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.base import DualEncoder, ModelFamily, right_padded
from lowbit.models.hf_pretrained import pretrained_skeleton, save_pretrained_architecture
from lowbit.models.spec import FamilySpec, register_family

# config.model_type -> transformers class: the text-only causal LMs lowbit loads (and tests, tests/models).
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                 "phi3": "Phi3ForCausalLM"}
GGUF_SUFFIX = ".gguf"
DEFAULT_MAX_NEW_TOKENS = 64
_FALLBACK_NOTED: set[str] = set()  # model_types already told they run on transformers' generate


class LeanFallbackNote(UserWarning):
    """A causal LM decodes with transformers' ``generate`` because the lean engine does not run it."""


def read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise LowbitError(f"cannot read {str(path / 'config.json')!r} ({err}); expected a transformers "
                          "config") from None
    if not isinstance(config, dict):
        raise LowbitError(f"{str(path / 'config.json')!r} is not a JSON object; expected a transformers config")
    return config


def check_causal_lm_config(config: dict[str, Any], where: str) -> str:
    """The config's model_type if it is a text-only causal LM lowbit loads, else one LowbitError line."""
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type not in ARCHITECTURES or (architectures and not any(a.endswith("ForCausalLM") for a in architectures)):
        raise LowbitError(f"{where} is a {model_type!r} model ({', '.join(architectures) or 'no architectures'}), "
                          f"not a text-only causal LM lowbit loads; accepted model_types: {', '.join(ARCHITECTURES)}")
    return str(model_type)


def is_causal_lm_path(path: str) -> bool:
    """A ``.gguf`` file, or a directory whose config names a ``*ForCausalLM`` architecture (checked on load)."""
    p = Path(path)
    if p.is_file():
        return p.suffix.lower() == GGUF_SUFFIX
    if not (p / "config.json").is_file() or (p / "manifest.json").is_file():
        return False
    try:
        architectures = json.loads((p / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    return any(str(a).endswith("ForCausalLM") for a in architectures)


def _no_images() -> LowbitError:
    return LowbitError("a text-only language model takes no images; accepted: texts (calibration: a .txt file, chat "
                       "JSONL or captions)")


class DeferredTokenizer:
    """A tokenizer read from ``path`` when first used: a loaded packed checkpoint that only decodes token ids
    (the lean engine) never holds one (SmolLM2's fast tokenizer is ~45 MB resident)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path)


class CausalLM(DualEncoder):
    """A transformers causal LM and its tokenizer: one tower, ``language``."""

    family = "causal-lm"

    def __init__(self, language: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.language = language
        self.tokenizer = tokenizer  # or a DeferredTokenizer, read on first use
        self.register_buffer("_log_scale", torch.zeros(()), persistent=False)

    @property
    def tokenizer(self) -> Any:
        if isinstance(self._tokenizer, DeferredTokenizer):
            self._tokenizer = self._tokenizer.load()
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value: Any) -> None:
        self._tokenizer = value

    @property
    def context_window(self) -> int:
        cfg = self.language.config
        return int(getattr(cfg, "max_position_embeddings", None) or self.tokenizer.model_max_length)

    def towers(self) -> dict[str, nn.Module]:
        return {"language": self.language}

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        raise _no_images()

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Right-padded ids and attention mask of plain texts (the tokenizer's special tokens added)."""
        rows = [list(self.tokenizer(t)["input_ids"])[: self.context_window] for t in texts]
        return right_padded(rows)

    def text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.language(**tokens, output_hidden_states=True, logits_to_keep=1)
        hidden, m = out.hidden_states[-1], tokens["attention_mask"].unsqueeze(-1).to(out.hidden_states[-1].dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)  # [B, D]

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise _no_images()

    @property
    def logit_scale(self) -> torch.Tensor:
        return self._log_scale

    # --- generation --------------------------------------------------------------------------------------
    def prompt_ids(self, question: str | list[dict[str, str]], chat: bool = True) -> list[int]:
        """Token ids of a prompt: ``question`` (or messages) in the chat template when the tokenizer has one and
        ``chat``, else the plain text with the tokenizer's special tokens."""
        if chat and getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": question}] if isinstance(question, str) else question
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not isinstance(question, str):
            raise LowbitError("messages need a tokenizer with a chat template; accepted here: a plain string")
        return list(self.tokenizer(question)["input_ids"])

    def chat(self, question: str, **options: Any) -> str:
        """Answer ``question`` (see ``generate_text``)."""
        return generate_text(self, question, **options)


def stop_ids(model: CausalLM) -> list[int]:
    from lowbit.models.llava_generate import stop_token_ids

    return stop_token_ids(model.tokenizer, model.language)


def lean_unsupported(language: nn.Module, max_len: int) -> str | None:
    """Why the lean engine does not run ``language`` for ``max_len`` positions (None: it does)."""
    from lowbit.models.lean_decode import unsupported_reason

    return unsupported_reason(language, max_len)


def _note_fallback(model_type: str, reason: str) -> None:
    if model_type not in _FALLBACK_NOTED:
        _FALLBACK_NOTED.add(model_type)
        warnings.warn(f"{model_type} decodes with transformers' generate ({reason})", LeanFallbackNote, stacklevel=2)


@torch.inference_mode()
def generate_ids(model: CausalLM, input_ids: torch.Tensor, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, stop: Sequence[int] | None = None, lean: bool = True,
                 callback: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """New token ids [B, n] after ``input_ids`` [B, T] (rows of one length; stops kept, rows padded after them)
    on the lean engine where it runs the model, else transformers' ``generate`` (noted once per model_type)."""
    from lowbit.models.lean_decode import LeanDecoder, check_decoding

    check_decoding(max_new_tokens, do_sample, temperature, top_p)
    room = model.context_window - input_ids.shape[1]
    if room < 1:
        raise LowbitError(f"the prompt is {input_ids.shape[1]} tokens and fills the context window of "
                          f"{model.context_window}; accepted: a shorter prompt")
    max_new_tokens = min(max_new_tokens, room)
    stops = list(stop_ids(model) if stop is None else stop)
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else (stops or [0])[0]
    reason = "lean=False was asked for" if not lean else lean_unsupported(model.language,
                                                                           input_ids.shape[1] + max_new_tokens)
    if reason is None:
        return LeanDecoder(model.language).generate(
            input_ids, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, stop_ids=stops, pad_id=pad_id, callback=callback).tokens
    if lean:
        _note_fallback(str(model.language.config.model_type), reason)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "pad_token_id": pad_id,
                              "eos_token_id": stops or None, "attention_mask": torch.ones_like(input_ids)}
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
        if seed is not None:  # generate draws from the global generator: seeding it is the only way in
            torch.manual_seed(seed)
    else:  # greedy, whatever the checkpoint's generation_config says
        kwargs.update(temperature=None, top_p=None, top_k=None)
    out = model.language.generate(input_ids, **kwargs)
    new = out[:, input_ids.shape[1]:]
    if callback is not None:
        for step in new.T:
            callback(step)
    return new


def generate_text(model: CausalLM, question: str | list[dict[str, str]], max_new_tokens: int | None = None,
                  do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                  seed: int | None = None, stream: Callable[[str], None] | None = None, chat: bool = True,
                  lean: bool = True) -> str:
    """The model's answer to ``question`` (a string or chat messages), in its chat template when it has one.

    Example:
        >>> generate_text(lowbit.load("qwen3-dir"), "What is the capital of France?")  # doctest: +SKIP
    """
    if isinstance(question, str) and not question.strip():
        raise LowbitError("the question is empty; accepted: a non-empty string")
    stops = stop_ids(model)
    pieces: list[int] = []
    sent = [0]

    def emit(tokens: torch.Tensor) -> None:  # stream whole characters as they decode
        pieces.extend(int(t) for t in tokens.reshape(-1) if int(t) not in stops)
        text = model.tokenizer.decode(pieces, skip_special_tokens=True)
        if stream is not None and not text.endswith("\ufffd") and len(text) > sent[0]:
            stream(text[sent[0]:])
            sent[0] = len(text)

    ids = torch.tensor([model.prompt_ids(question, chat)], dtype=torch.long)
    new = generate_ids(model, ids, max_new_tokens or DEFAULT_MAX_NEW_TOKENS, do_sample, temperature, top_p, top_k,
                       seed, stops, lean, emit if stream is not None else None)
    row = new[0].tolist()
    row = row[: next((i for i, t in enumerate(row) if t in stops), len(row))]
    text = model.tokenizer.decode(row, skip_special_tokens=True)
    if stream is not None and len(text) > sent[0]:
        stream(text[sent[0]:])
    return text.strip()


# --- calibration text (lowbit.workflows.quantize) ---------------------------------------------------------------
def token_windows(model: CausalLM, items: Sequence[str | list[dict[str, str]]], n: int,
                  seq_len: int) -> list[torch.Tensor]:
    """Up to ``n`` token windows [T <= seq_len] of texts and conversations (rendered in the chat template): each
    item is tokenized and cut into consecutive windows, in order (a long text file gives many)."""
    windows: list[torch.Tensor] = []
    for item in items:
        if isinstance(item, str):
            ids = list(model.tokenizer(item)["input_ids"])
        else:
            ids = model.prompt_ids(item) if item[-1]["role"] == "user" else list(model.tokenizer(
                model.tokenizer.apply_chat_template(item, tokenize=False), add_special_tokens=False)["input_ids"])
        for start in range(0, len(ids), seq_len):
            if len(windows) == n:
                return windows
            if len(ids) - start >= 2:  # a lone trailing token carries no context
                windows.append(torch.tensor(ids[start:start + seq_len], dtype=torch.long))
    return windows


def chat_prefix_ids(model: CausalLM) -> list[int]:
    """The ids a user turn starts with in the model's chat template (system prompt included), or its BOS token;
    empty when it has neither."""
    tok = model.tokenizer
    if getattr(tok, "chat_template", None):
        marker = "\x00"
        text = tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
        return list(tok(text.partition(marker)[0], add_special_tokens=False)["input_ids"])
    return [tok.bos_token_id] if tok.bos_token_id is not None else []


@torch.inference_mode()
def self_generated_windows(model: CausalLM, n: int, seq_len: int, seed: int = 0,
                           batch: int = 16) -> list[torch.Tensor]:
    """Data-free calibration (LLM-QAT, Liu et al. 2023): ``n`` sequences of ``seq_len`` tokens sampled from the
    model itself, each opening a user turn of its chat template (or its BOS) followed by one random vocabulary
    token, then sampled (temperature 1) to the end without stopping. Deterministic for ``seed``."""
    prefix = chat_prefix_ids(model)
    vocab = int(model.language.get_input_embeddings().weight.shape[0])
    special = set(getattr(model.tokenizer, "all_special_ids", []) or [])
    choices = torch.tensor([i for i in range(vocab) if i not in special], dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    windows: list[torch.Tensor] = []
    for start in range(0, n, batch):
        rows = min(batch, n - start)
        first = choices[torch.randint(len(choices), (rows, 1), generator=generator)]  # [rows, 1]
        ids = torch.cat([torch.tensor([prefix] * rows, dtype=torch.long).reshape(rows, len(prefix)), first], dim=1)
        new_tokens = max(seq_len - ids.shape[1], 1)
        new = generate_ids(model, ids, new_tokens, do_sample=True, seed=seed * 1_000_003 + start, stop=[])
        windows += list(torch.cat([ids, new], dim=1))
    return windows


# --- loading ----------------------------------------------------------------------------------------------------
def _from_gguf(path: Path) -> tuple[nn.Module, Any]:
    """transformers' GGUF loader, dequantized to float32 (the quantizer it leaves on the model is dropped: the
    weights are plain floats, and it would make the model refuse to save)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.models.gguf_import import ARCHITECTURES as GGUF_ARCHITECTURES
    from lowbit.models.gguf_import import read_rope_scaling

    try:
        lm = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, OSError) as err:
        first = " ".join(str(err).split())[:300]
        raise LowbitError(f"cannot read {str(path)!r} with transformers' GGUF loader ({first}); accepted: a GGUF of "
                          f"the architectures {', '.join(ARCHITECTURES)}") from None
    lm.hf_quantizer = None
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    if lm.config.model_type in GGUF_ARCHITECTURES:
        read_rope_scaling(lm, path)  # transformers' GGUF loader leaves RoPE scaling out for these architectures
    check_causal_lm_config(lm.config.to_dict(), repr(str(path)))
    return lm, tokenizer


def load_causal_lm(name_or_path: str, packed: bool = True) -> CausalLM:
    """A text-only causal LM from an HF directory or a ``.gguf`` file, float32, eval mode.

    Quantized checkpoints run on lowbit's kernels: a GGUF file's Q8_0/Q4_0/Q4_1/TQ2_0 blocks are packed as they
    are (``lowbit.models.gguf_import``; ``packed=False`` keeps transformers' dequantized floats), and a directory
    whose config carries a GPTQ, AWQ or compressed-tensors ``quantization_config`` is read into packed layers
    (``lowbit.models.hf_quantized``).

    Example:
        >>> lm = load_causal_lm("models/Qwen3-0.6B")  # doctest: +SKIP
        >>> lm.chat("Name a colour.")  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.models.gguf_import import ARCHITECTURES as GGUF_PACKED
    from lowbit.models.gguf_import import pack_from_gguf
    from lowbit.models.hf_quantized import load_quantized_hf

    path = Path(name_or_path)
    imported: dict[str, Any] | None = None
    if path.is_file() and path.suffix.lower() == GGUF_SUFFIX:
        lm, tokenizer = _from_gguf(path)
        if packed and lm.config.model_type in GGUF_PACKED:
            imported = pack_from_gguf(lm, path)
    elif (path / "config.json").is_file() and "quantization_config" in read_config(path):
        check_causal_lm_config(read_config(path), repr(name_or_path))
        lm, imported = load_quantized_hf(path)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    elif (path / "config.json").is_file():
        check_causal_lm_config(read_config(path), repr(name_or_path))  # before any weight is allocated
        lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    else:
        raise LowbitError(f"{name_or_path!r} is neither a directory with a transformers config.json nor a "
                          f"{GGUF_SUFFIX} file; accepted: one of those")
    model = CausalLM(lm.eval(), tokenizer).eval().requires_grad_(False)
    model.source = {"family": "causal-lm", "name": str(name_or_path), "options": {} if packed else {"packed": False}}
    if imported is not None:
        model.lowbit_import = imported  # which layers hold the producer's integers, which stayed float
    return model


# --- a self-contained packed checkpoint (lowbit.workflows.checkpoint) -----------------------------------------
def save_causal_lm_architecture(model: CausalLM, out: Path) -> dict[str, Any]:
    return save_pretrained_architecture(model.language, out, tokenizer=model.tokenizer)


def causal_lm_skeleton(path: Path, record: dict[str, Any]) -> CausalLM:
    lm = pretrained_skeleton(path, record, tokenizer=False)
    return CausalLM(lm, DeferredTokenizer(path)).eval().requires_grad_(False)


SPEC = register_family(FamilySpec(
    name="causal-lm",
    description="text-only transformers causal LMs: Llama, Mistral, Qwen2, Qwen3, Gemma 2/3, Phi-3",
    families=(ModelFamily(
        name="causal-lm",
        load=load_causal_lm,
        claims_path=is_causal_lm_path,
        description="text-only causal LM: an HF *ForCausalLM directory or a .gguf file (dequantized)",
    ),),
    dual_encoder=CausalLM,
    towers=("language",),
    save_architecture=save_causal_lm_architecture,  # type: ignore[arg-type]
    skeleton=causal_lm_skeleton,  # type: ignore[arg-type]
))
