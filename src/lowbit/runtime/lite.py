"""``LiteLM``: a packed lowbit checkpoint of a Llama-layout causal LM, run without torch.

The same C++ kernels and decoder as the torch engine (``lowbit.models.lean_decode``), driven through the native
library's C ABI (``lowbit.runtime.native``) from numpy + ctypes; the tokenizer is ``tokenizers`` and the chat
template is rendered with ``jinja2``. Importing and running it never imports torch, so a process holds the
weights (as kernel tiles), Python, numpy and the tokenizer -- not torch's ~220 MB.

What it runs (anything else is refused in one line naming what is accepted):

* a ``causal-lm`` checkpoint (``lowbit.save`` of a quantized HF causal LM) of ``model_type`` llama, mistral or
  qwen2 (Mistral / Qwen2 within their sliding window), SiLU MLP, RoPE of the default type (``rope_theta``);
* every q/k/v/o/gate/up/down projection packed (manifest kind ``linear``: symmetric or asymmetric codes of
  2, 3, 4 or 8 bits, per-channel or groups of a multiple of 32; or kind ``offset_linear``, the ``minmax`` grid
  and GGUF Q4_1's, codes with fp16 group minima; biases kept), no input scales or activation quantization;
* the token table packed (kind ``embedding``, 2..8 bits) or float, and a packed ``lm_head`` (tied to the table
  or its own).

Loading repacks each weight into the kernels' tiles through the C repack (q/k/v and gate/up fused into one call
each, as the torch engine fuses them), then drops the memory-mapped source pages, so the resident set is the
tiles, not tiles + source. Embedding lookups dequantize only the gathered rows.

Numbers (``tests/runtime/test_lite.py``): a one-token step is bit-equal to the torch engine's native step on the
same state (the same core code), and the prefill to the torch engine's prefill on the same RoPE tables (the same
ops on the same kernels: the panel GEMM for > 4 rows, the kernels' causal prefill attention). The tables here take
transformers' float32 angles and round their cos / sin once, where torch's float32 cos / sin may be one ulp off
(in ~5% of entries), so from a prompt alone the logits equal the torch engine's to float32 rounding.

Example:
    >>> lm = LiteLM.load("out/w4")  # doctest: +SKIP
    >>> lm.chat("What is a low-bit model?", max_new_tokens=32)  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.errors import LowbitError
from lowbit.runtime import native
from lowbit.runtime.checkpoint import SafeTensors, read_json

MODEL_TYPES = ("llama", "mistral", "qwen2")  # Llama's layout and forward (the window aside)
SLIDING = ("mistral", "qwen2")  # full causal attention only while the sequence fits config.sliding_window
WEIGHT_BITS = (2, 3, 4, 8)  # what the C repack reads and the kernels run (5/6 need widening, 1 a doubled scale)
EMBED_BITS = (2, 3, 4, 5, 6, 7, 8)
FAMILY = "causal-lm"
ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj")
SUPPORTED = ("a causal-lm lowbit checkpoint of a llama/mistral/qwen2 model whose projections are packed 'linear' "
             "modules (symmetric or asymmetric codes, 2/3/4/8 bits, per-channel or groups of a multiple of 32) with "
             "a packed lm_head (e.g. the recipe 'language@embedding=w8g32,language=w4g128')")


@dataclass(frozen=True)
class LiteConfig:
    """The geometry the engine needs, read from the checkpoint's ``config.json``."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    rope_theta: float
    window: int | None  # sliding window bounding the positions (Mistral / Qwen2), None for Llama

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> LiteConfig:
        """Validate an HF config: one line naming what is accepted when the engine cannot run it."""
        model_type = config.get("model_type")
        if model_type not in MODEL_TYPES:
            raise LowbitError(f"the lite runtime does not run model_type {model_type!r}; accepted: "
                              f"{', '.join(MODEL_TYPES)}")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise LowbitError(f"the lite runtime runs SiLU MLPs; this model's hidden_act is {act!r}")
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise LowbitError(f"the lite runtime implements the default RoPE only; this model's rope_type is "
                              f"{rope_type!r}")
        try:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            head_dim = int(config.get("head_dim") or hidden // heads)
            out = cls(model_type, hidden, int(config["num_hidden_layers"]), heads,
                      int(config.get("num_key_value_heads") or heads), head_dim, int(config["vocab_size"]),
                      float(config.get("rms_norm_eps", 1e-6)),
                      float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
                      int(config["sliding_window"]) if model_type in SLIDING and config.get("sliding_window")
                      else None)
        except (KeyError, TypeError, ValueError) as err:
            raise LowbitError(f"config.json lacks or garbles {err} (a Llama-layout config)") from None
        if min(out.hidden, out.layers, out.heads, out.kv_heads, out.head_dim, out.vocab) < 1 or \
                out.heads % out.kv_heads or out.head_dim % 2:
            raise LowbitError(f"config.json has an impossible geometry: {out}")
        return out


@dataclass
class _Stored:
    """One packed module's stored buffers (views of the map) and format, from the manifest."""

    keys: list[str]
    qweight: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None
    bias: np.ndarray | None
    bits: int
    group_size: int
    k: int  # input features
    offsets: np.ndarray | None = None  # offset storage's fp16 group minima [N, G] (w = q * s + m)


def _tile_rows(v: np.ndarray, n: int) -> np.ndarray:
    """Per-(row, group) values [N, G] -> [T, G, 8] (rows padded with zeros): lowbit_kernels.h's scale layout."""
    t = -(-n // native.TILE_ROWS)
    out = np.zeros((t * native.TILE_ROWS, v.shape[1]), dtype=v.dtype)
    out[:n] = v
    return np.ascontiguousarray(out.reshape(t, native.TILE_ROWS, v.shape[1]).transpose(0, 2, 1))


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def unpack_rows(qweight: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Codes [M, K] (uint8) of LSB-first bitstream rows [M, ceil(K*bits/8)] (docs/PACKED_FORMAT.md)."""
    if bits == 8:
        return qweight[:, :k]
    planes = np.unpackbits(qweight, axis=1, bitorder="little")[:, :k * bits].reshape(len(qweight), k, bits)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(-1, dtype=np.uint8)


class LiteLM:
    """A packed causal LM on the native core, one sequence at a time (``load`` builds it).

    State: ``k_cache`` / ``v_cache`` float32 [layers, 1, kv_heads, max_len, head_dim], ``cos`` / ``sin`` [max_len,
    head_dim] (sin with the rotate-half sign folded in), ``pos`` (the next position), ``fill`` (entries per layer).
    Not for concurrent callers.
    """

    def __init__(self, path: Path, config: LiteConfig, store: SafeTensors, manifest: dict[str, Any]) -> None:
        self.path = path
        self.config = config
        self._store = store
        self._manifest = manifest
        self._lib = native.library()
        self._keep: list[np.ndarray] = []  # every buffer a native handle points into
        self._weights: list[int] = []
        self._decoder: int | None = None
        self._finalizer = weakref.finalize(self, _free, self._lib, self._weights, [None])
        self._tokenizer: Any = None
        self.k_cache = self.v_cache = np.zeros((0,), np.float32)
        self.cos = self.sin = np.zeros((0, config.head_dim), np.float32)
        self.pos = 0
        self.fill = np.zeros(config.layers, dtype=np.int64)

    # -- loading ---------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, threads: int | None = None) -> LiteLM:
        """Read, check and repack the checkpoint directory ``path`` (``lowbit.save``'s layout); ``threads`` sets
        the native thread team (default: all cores, or ``OMP_NUM_THREADS``)."""
        path = Path(path)
        if not path.is_dir():
            raise LowbitError(f"{str(path)!r} is not a checkpoint directory")
        manifest = read_json(path / "manifest.json", "the checkpoint's manifest.json")
        if manifest.get("format") != "lowbit-packed" or manifest.get("format_version") != 2:
            raise LowbitError(f"{path}/manifest.json is not a lowbit packed checkpoint of format_version 2 (format "
                              f"{manifest.get('format')!r}, version {manifest.get('format_version')!r})")
        arch = manifest.get("architecture") or {}
        if arch.get("family") != FAMILY:
            raise LowbitError(f"the lite runtime runs {FAMILY} checkpoints; {path} holds family "
                              f"{arch.get('family')!r}")
        config = LiteConfig.from_dict(read_json(path / "architecture" / "config.json", "the model's config.json"))
        weights = path / "model.safetensors"
        if not weights.is_file():
            raise LowbitError(f"the checkpoint's weights are missing: {weights}")
        if threads is not None:
            native.set_threads(threads)
        lm = cls(path, config, SafeTensors(weights), manifest)
        lm._build()
        return lm

    def _prefix(self) -> str:
        for key, entry in self._manifest.get("modules", {}).items():
            name = entry.get("name", "") if isinstance(entry, dict) else ""
            if name and key.endswith(name) and name.startswith("model."):
                return key[:len(key) - len(name)]
        raise LowbitError(f"{self.path} has no packed decoder modules; the lite runtime runs {SUPPORTED}")

    def _key(self, key: str) -> str:
        """A tensor key, through the storage's tied aliases (a tied head is stored under the table's keys)."""
        tied = (self._manifest.get("storage") or {}).get("tied") or {}
        return tied.get(key, key)

    def _stored(self, name: str, kinds: tuple[str, ...] = ("linear",)) -> _Stored:
        entry = self._manifest.get("modules", {}).get(self._pre + name)
        if entry is None:
            raise LowbitError(f"module {name} is not packed; the lite runtime runs {SUPPORTED}")
        kind, bits = entry.get("kind"), entry.get("bits")
        if kind == "offset_linear" and "linear" in kinds:  # the kernels add the minima's term themselves
            kind = "linear"
            offset = True
        else:
            offset = False
        if kind not in kinds:
            raise LowbitError(f"module {name} is stored as kind {kind!r}; the lite runtime runs {SUPPORTED}")
        allowed = WEIGHT_BITS if kind == "linear" else EMBED_BITS
        if bits not in allowed or entry.get("has_input_scale") or entry.get("activations"):
            raise LowbitError(f"module {name} ({bits}-bit{', input scale' if entry.get('has_input_scale') else ''}"
                              f"{', quantized activations' if entry.get('activations') else ''}) is not a format "
                              f"the lite runtime runs; accepted: {kinds[0]} codes of {allowed} bits without input "
                              "scales or activation quantization")
        base = self._pre + name
        keys = [self._key(f"{base}.{b}") for b in ("qweight", "scales", "zeros", "bias", "offsets")]
        if keys[0] not in self._store or keys[1] not in self._store:
            raise LowbitError(f"the checkpoint lacks {base}.qweight / .scales")
        qweight, scales = self._store.get(keys[0]), self._store.get(keys[1])
        zeros = self._store.get(keys[2]) if keys[2] in self._store else None
        bias = self._store.float32(keys[3]) if keys[3] in self._store else None
        offsets = self._store.get(keys[4]) if offset and keys[4] in self._store else None
        if offset and (offsets is None or offsets.dtype != np.float16 or offsets.shape != scales.shape
                       or zeros is not None):
            raise LowbitError(f"module {name}: offset storage needs float16 .offsets shaped like its scales and no "
                              ".zeros")
        n, k = (int(d) for d in entry.get("shape", [0, 0])[:2])
        group = int(entry.get("group_size") or k)
        g = scales.shape[1] if scales.ndim == 2 else 0
        if qweight.dtype != np.uint8 or qweight.shape != (n, -(-k * bits // 8)) or scales.shape != (n, -(-k // group)) \
                or (zeros is not None and zeros.shape != scales.shape) or (g > 1 and group % native.BLOCK):
            raise LowbitError(f"module {name}: stored buffers do not match its {bits}-bit [{n}, {k}] group-{group} "
                              f"entry (the lite runtime runs groups of a multiple of {native.BLOCK} or per-channel)")
        return _Stored([kk for kk in keys if kk in self._store], qweight, scales, zeros, bias, int(bits), group, k,
                       offsets)

    def _prepare(self, parts: list[_Stored]) -> int:
        """One native prepared weight of ``parts`` stacked along N (a fused call), from the C repack; the source
        pages are released afterwards."""
        first = parts[0]
        if any((p.bits, p.group_size, p.zeros is None, p.offsets is None, p.k) !=
               (first.bits, first.group_size, first.zeros is None, first.offsets is None, first.k) for p in parts):
            raise LowbitError("fused projections (q/k/v, gate/up) must share one format; the lite runtime fuses "
                              "them as the torch engine does")
        bits = first.bits
        qweight = first.qweight if len(parts) == 1 else np.concatenate([p.qweight for p in parts])
        scales = np.concatenate([p.scales for p in parts]).astype(np.float16)
        zeros = None if first.zeros is None else np.concatenate([p.zeros for p in parts])
        n = qweight.shape[0]
        k_in = first.k
        cb = native.container_bits(bits)
        t, kb = -(-n // native.TILE_ROWS), -(-k_in // native.BLOCK)
        tiles = np.zeros((t, kb, native.BLOCK * cb), dtype=np.uint8)
        native.check(self._lib.lowbit_repack(qweight.ctypes.data, qweight.shape[1], bits, n, k_in, cb,
                                             tiles.ctypes.data))
        tiled = _tile_rows(scales, n)
        tzeros = None if zeros is None else _tile_rows(zeros, n)
        tmins = None if first.offsets is None else _tile_rows(np.concatenate([p.offsets for p in parts]), n)
        bias = None
        if any(p.bias is not None for p in parts):
            bias = np.concatenate([p.bias if p.bias is not None else np.zeros(p.qweight.shape[0], np.float32)
                                   for p in parts]).astype(np.float32)
        g = tiled.shape[1]
        group_blocks = kb if g == 1 else first.group_size // native.BLOCK
        zero_const = float(1 << (bits - 1)) if zeros is None and tmins is None else 1.0
        handle = self._lib.lowbit_weight_new(tiles.ctypes.data, tiles.size, tiled.ctypes.data, t, g, _ptr(tzeros),
                                             _ptr(bias), zero_const, cb, int(cb == 8), n, k_in, group_blocks,
                                             native.default_act_blocks(group_blocks, g == 1), _ptr(tmins))
        native.check(handle)
        self._weights.append(handle)
        self._keep += [a for a in (tiles, tiled, tzeros, bias, tmins) if a is not None]
        for p in parts:  # the tiles hold the codes now
            for key in p.keys:
                self._store.release(key)
        return handle

    def _build(self) -> None:
        c = self.config
        self._pre = self._prefix()
        stored = self._stored

        def norm(name: str) -> np.ndarray:
            key = f"{self._pre}{name}.weight"
            if key not in self._store:
                raise LowbitError(f"the checkpoint lacks {key}")
            w = self._store.float32(key)
            if w.shape != (c.hidden,):
                raise LowbitError(f"{key} has shape {list(w.shape)}; expected [{c.hidden}]")
            self._keep.append(w)
            return w

        handles: list[list[int]] = [[], [], [], []]
        in_norms, post_norms = [], []
        for i in range(c.layers):
            layer = f"model.layers.{i}."
            row = [self._prepare([stored(layer + p) for p in group])
                   for group in (ATTENTION, ("self_attn.o_proj",), MLP, ("mlp.down_proj",))]
            for bucket, h in zip(handles, row, strict=True):
                bucket.append(h)
            in_norms.append(norm(layer + "input_layernorm"))
            post_norms.append(norm(layer + "post_attention_layernorm"))
        final = norm("model.norm")
        self._table = _Table(self, self._pre + "model.embed_tokens")
        head = self._prepare([stored("lm_head")])
        arrays = [(ctypes.c_void_p * c.layers)(*b) for b in handles]
        norms = [(ctypes.c_void_p * c.layers)(*[w.ctypes.data for w in ws]) for ws in (in_norms, post_norms)]
        decoder = self._lib.lowbit_decoder_new(c.layers, *arrays, *norms, c.heads, c.kv_heads, c.head_dim, c.eps,
                                               final.ctypes.data, head)
        native.check(decoder)
        self._decoder = decoder
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _free, self._lib, self._weights, [decoder])

    # -- state -----------------------------------------------------------------------------------------------
    @property
    def max_len(self) -> int:
        """Positions the KV cache holds (set by ``reset``)."""
        return int(self.k_cache.shape[3]) if self.k_cache.ndim == 5 else 0

    def reset(self, max_len: int) -> None:
        """An empty KV cache for ``max_len`` positions (pages are touched only as they fill) and RoPE tables."""
        c = self.config
        if max_len < 1:
            raise LowbitError(f"max_len must be >= 1; received {max_len}")
        if c.window is not None and max_len > c.window:
            raise LowbitError(f"{max_len} positions exceed the {c.model_type} sliding window of {c.window}; "
                              f"accepted: a prompt plus new tokens of at most {c.window}")
        shape = (c.layers, 1, c.kv_heads, max_len, c.head_dim)
        if self.k_cache.shape != shape:
            self.k_cache = np.empty(shape, np.float32)
            self.v_cache = np.empty(shape, np.float32)
        if self.cos.shape[0] < max_len:
            self.cos, self.sin = rope_tables(c.rope_theta, c.head_dim, max_len)
        self.pos = 0
        self.fill[:] = 0

    # -- the network -----------------------------------------------------------------------------------------
    def embed(self, ids: Sequence[int]) -> np.ndarray:
        """Token rows float32 [M, hidden] (only these rows of the table are read and dequantized)."""
        return self._table.rows(self._ids(ids))

    def _ids(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise LowbitError(f"token ids must be a non-empty 1-D sequence of integers; received shape "
                              f"{list(arr.shape)} of {arr.dtype}")
        if int(arr.min()) < 0 or int(arr.max()) >= self.config.vocab:
            raise LowbitError(f"token ids must be in [0, {self.config.vocab}); received [{int(arr.min())}, "
                              f"{int(arr.max())}]")
        return arr.astype(np.int64)

    def prefill(self, ids: Sequence[int], max_len: int | None = None) -> np.ndarray:
        """Reset and run the prompt ``ids``; logits float32 [vocab] of its last position. ``max_len`` (default:
        the prompt + 256) sizes the KV cache."""
        h = self.embed(ids)
        m = h.shape[0]
        self.reset(max_len or m + 256)
        if m > self.max_len:
            raise LowbitError(f"a prompt of {m} tokens does not fit max_len {self.max_len}")
        logits = np.empty(self.config.vocab, np.float32)
        native.check(self._lib.lowbit_decoder_prefill(self._decoder, h.ctypes.data, m, logits.ctypes.data,
                                                      self.k_cache.ctypes.data, self.v_cache.ctypes.data,
                                                      self.max_len, self.cos.ctypes.data, self.sin.ctypes.data))
        self.pos = m
        self.fill[:] = m
        return logits

    def step(self, token: int) -> np.ndarray:
        """Append ``token`` at the next position; logits float32 [vocab] for the position after it."""
        if self.pos == 0:
            raise LowbitError("step() needs a prefill() first")
        if self.pos >= self.max_len:
            raise LowbitError(f"position {self.pos + 1} is past the {self.max_len} positions reset() made room for")
        h = self.embed([token])
        logits = np.empty(self.config.vocab, np.float32)
        native.check(self._lib.lowbit_decoder_step(self._decoder, h.ctypes.data, 1, logits.ctypes.data,
                                                   self.k_cache.ctypes.data, self.v_cache.ctypes.data, self.max_len,
                                                   self.fill.ctypes.data, self.cos.ctypes.data, self.sin.ctypes.data,
                                                   self.pos))
        self.fill += 1
        self.pos += 1
        return logits

    # -- the loop --------------------------------------------------------------------------------------------
    def stream(self, ids: Sequence[int], max_new_tokens: int = 32, *, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int | None = None, stop_ids: Sequence[int] = ()) -> Iterator[int]:
        """New tokens one by one: greedy (``temperature`` 0) or sampled at ``temperature`` from the ``top_k``
        most likely (0: all) within nucleus ``top_p`` (transformers' warper order), drawn from a generator seeded
        with ``seed``. Stops after ``max_new_tokens`` or after emitting one of ``stop_ids`` (yielded)."""
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        ids = self._ids(ids)
        logits = self.prefill(ids, max_len=len(ids) + max_new_tokens)
        rng = np.random.default_rng(seed)
        stops = {int(s) for s in stop_ids}
        for n in range(max_new_tokens):
            token = choose(logits, temperature, top_k, top_p, rng)
            yield token
            if token in stops or n + 1 == max_new_tokens:
                return
            logits = self.step(token)

    def generate(self, ids: Sequence[int], max_new_tokens: int = 32, **sampling: Any) -> list[int]:
        """``stream``'s tokens as a list."""
        return list(self.stream(ids, max_new_tokens, **sampling))

    # -- text ------------------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The checkpoint's ``tokenizers.Tokenizer`` (architecture/tokenizer.json), loaded on first use."""
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            path = self.path / "architecture" / "tokenizer.json"
            if not path.is_file():
                raise LowbitError(f"the checkpoint has no tokenizer: {path} is missing")
            self._tokenizer = Tokenizer.from_file(str(path))
        return self._tokenizer

    def _tokenizer_config(self) -> dict[str, Any]:
        path = self.path / "architecture" / "tokenizer_config.json"
        return read_json(path, "tokenizer_config.json") if path.is_file() else {}

    def stop_ids(self) -> list[int]:
        """End-of-sequence ids: generation_config / config ``eos_token_id`` and the tokenizer's eos token."""
        ids: set[int] = set()
        for name in ("generation_config.json", "config.json"):
            path = self.path / "architecture" / name
            eos = read_json(path, name).get("eos_token_id") if path.is_file() else None
            ids.update([eos] if isinstance(eos, int) else [e for e in eos or [] if isinstance(e, int)])
        token = _token_text(self._tokenizer_config().get("eos_token"))
        found = self.tokenizer.token_to_id(token) if token else None
        if found is not None:
            ids.add(found)
        return sorted(ids)

    def chat_ids(self, messages: str | list[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` (a user turn's text, or role/content dicts) through the chat template, with
        the generation prompt (as transformers' ``apply_chat_template``: no extra special tokens)."""
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        cfg = self._tokenizer_config()
        template_file = self.path / "architecture" / "chat_template.jinja"
        source = template_file.read_text() if template_file.is_file() else cfg.get("chat_template")
        if not isinstance(source, str):
            raise LowbitError(f"the checkpoint has no chat template ({template_file} or tokenizer_config.json)")

        def raise_exception(message: str) -> None:
            raise LowbitError(f"the chat template refused the messages: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = raise_exception
        text = env.from_string(source).render(messages=messages, add_generation_prompt=True,
                                              bos_token=_token_text(cfg.get("bos_token")) or "",
                                              eos_token=_token_text(cfg.get("eos_token")) or "")
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def chat(self, messages: str | list[dict[str, str]], max_new_tokens: int = 128,
             stream: Callable[[str], None] | None = None, **sampling: Any) -> str:
        """The reply to ``messages`` (``chat_ids``), stopping at end-of-sequence; special tokens dropped.
        ``stream`` receives the text as it grows, piece by piece; ``sampling``: ``stream``'s options."""
        out: list[int] = []
        shown = ""
        for token in self.stream(self.chat_ids(messages), max_new_tokens, stop_ids=self.stop_ids(), **sampling):
            out.append(token)
            if stream is not None:
                text = str(self.tokenizer.decode(out, skip_special_tokens=True))
                if text.startswith(shown) and len(text) > len(shown):  # a piece ends on a whole character
                    stream(text[len(shown):])
                    shown = text
        return str(self.tokenizer.decode(out, skip_special_tokens=True))


class _Table:
    """The token table: packed (kind ``embedding``; rows dequantized as gathered) or float."""

    def __init__(self, lm: LiteLM, base: str) -> None:
        entry = lm._manifest.get("modules", {}).get(base)
        self.packed: _Stored | None = None
        self.dim = lm.config.hidden
        if entry is not None:
            self.packed = lm._stored(base[len(lm._pre):], ("embedding",))
            if entry.get("shape", [0, 0])[:2] != [lm.config.vocab, self.dim]:
                raise LowbitError(f"{base}: shape {entry.get('shape')} does not match the config's vocab x hidden")
        elif f"{base}.weight" in lm._store:
            self.weight = lm._store.get(f"{base}.weight")
            if self.weight.shape != (lm.config.vocab, self.dim):
                raise LowbitError(f"{base}.weight has shape {list(self.weight.shape)}; expected "
                                  f"[{lm.config.vocab}, {self.dim}]")
        else:
            raise LowbitError(f"the checkpoint lacks the token table {base}")

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """float32 [M, D]: (q - z) * s in float32, as lowbit.kernels.formats.codes_to_values computes it."""
        p = self.packed
        if p is None:
            return np.ascontiguousarray(self.weight[ids], dtype=np.float32)
        codes = unpack_rows(p.qweight[ids], p.bits, self.dim).astype(np.float32)
        scales = np.repeat(p.scales[ids].astype(np.float32), p.group_size, axis=1)[:, :self.dim]
        if p.zeros is None:
            zero: Any = np.float32(1 << (p.bits - 1))
        else:
            zero = np.repeat(p.zeros[ids].astype(np.float32), p.group_size, axis=1)[:, :self.dim]
        return np.ascontiguousarray((codes - zero) * scales, dtype=np.float32)


def _free(lib: Any, weights: list[int], decoder: list[int | None]) -> None:
    """Release the native handles (the decoder first: it points at the weights)."""
    if decoder[0] is not None:
        lib.lowbit_decoder_free(decoder[0])
    for w in weights:
        lib.lowbit_weight_free(w)


def _token_text(token: Any) -> str | None:
    """A special token of tokenizer_config.json: a string or an AddedToken-style {"content": ...}."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def rope_tables(theta: float, head_dim: int, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin float32 [positions, head_dim] of the default RoPE as transformers' Llama computes it (inv_freq over
    the even dimensions and the angles position * inv_freq in float32, the two halves repeated), sin with
    rotate_half's sign folded in (-sin on the first half), as lowbit.models.lean_decode keeps it. The angles are
    torch's float32 values (at position ~200 their rounding moves cos by ~1e-6, which the model was trained with);
    their cos / sin are taken in float64 and rounded once (torch's float32 cos may be one ulp off that)."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32))
    angles = np.arange(positions, dtype=np.float32)[:, None] * inv_freq[None, :]  # float32 products, as torch
    emb = np.concatenate([angles, angles], axis=1).astype(np.float64)
    half = head_dim // 2
    sin = np.sin(emb)
    sin[:, :half] = -sin[:, :half]
    return np.cos(emb).astype(np.float32), np.ascontiguousarray(sin.astype(np.float32))


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """One clear error for settings no decoding loop accepts."""
    if max_new_tokens < 1:
        raise LowbitError(f"max_new_tokens must be >= 1; received {max_new_tokens}")
    if not temperature >= 0:
        raise LowbitError(f"temperature must be >= 0 (0: greedy); received {temperature}")
    if top_k < 0:
        raise LowbitError(f"top_k must be >= 0 (0: all tokens); received {top_k}")
    if not 0 < top_p <= 1:
        raise LowbitError(f"top_p must be in (0, 1]; received {top_p}")


def choose(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> int:
    """The next token: argmax at temperature 0, else a draw after temperature, top-k, then top-p."""
    if temperature == 0:
        return int(np.argmax(logits))
    scores = logits.astype(np.float64) / temperature
    if 0 < top_k < scores.size:
        kth = np.partition(scores, -top_k)[-top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        keep = np.cumsum(probs[order]) - probs[order] < top_p  # the smallest prefix reaching top_p (>= 1 token)
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))
