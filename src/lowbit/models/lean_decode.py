"""A lean decoding loop for Hugging Face Llama-family causal LMs (nanoGPT / gpt-fast style).

transformers' ``generate`` spends ~8 ms of Python and small-tensor work per token on SmolLM2-135M (cache
objects, mask building, logits processors, output bookkeeping), more than lowbit's packed kernels take for the
whole token. ``LeanDecoder`` runs the same model with only what a decoder step needs:

* the HF model's own modules and weights, in place (no copy): whatever ``quantize_`` / ``lowbit.load`` put
  there runs, packed ``QuantLinear`` layers on the kernels included. q/k/v and gate/up siblings linked by
  ``lowbit.kernels.fusion`` are computed by one call of their group (``SharedInputGroup.outputs``);
* a preallocated KV cache [layers, B, kv_heads, max_len, head_dim] written in place;
* RoPE cos/sin precomputed once by the model's own rotary module (its ``rope_theta`` and scaling type);
* the RMSNorm and rotary formulas of transformers' Llama, op for op (so float results match it bit for bit
  where the same kernels run), ``F.scaled_dot_product_attention`` with GQA: causal for the prefill, plain for
  a one-token step over the filled prefix (float32 packed models: the kernels' ``prefill_attention`` /
  ``decode_attention`` over the KV cache instead, ~2x faster than SDPA on SmolLM2's 180-row prompts);
* prefill from ``input_ids`` or ``inputs_embeds`` (LLaVA), ``lm_head`` only at the last position (and the
  last layer's attention, o and MLP too: its other positions only fill the KV cache); optionally
  FastV (``token_pruning.InLayerPrune``): after layer k only the kept prompt positions go on, so each layer's
  KV cache fills from its own offset;
* greedy or sampled tokens (transformers' temperature / top-k / top-p warpers, a seeded generator), stop
  ids, a per-token callback.

Which architectures qualify is a registry keyed by ``config.model_type`` (``LEAN_ARCHITECTURES``): the entry
returns the attention window of the config (None: full causal attention), because Mistral and Qwen2 equal
Llama exactly as long as the whole sequence fits their sliding window. Prompts are not padded: a batch holds
rows of one length (LLaVA uses the engine for B == 1).

Example:
    >>> engine = LeanDecoder(lm)  # doctest: +SKIP
    >>> engine.generate(input_ids=ids, max_new_tokens=32).tokens  # doctest: +SKIP
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lowbit.errors import LowbitError
from lowbit.models.spec import LEAN_ARCHITECTURES
from lowbit.models.token_pruning import InLayerPrune, attention_received
from lowbit.registry import qualname

# LEAN_ARCHITECTURES: model_type -> attention window of a config (None: full causal attention), filled by the
# family specs' ``lean_decode`` (lowbit.models.hf_causal_lm: llama, mistral, qwen2, qwen3). Registered types have
# Llama's module layout (model.embed_tokens / layers[i].{input_layernorm, self_attn.{q,k,v,o}_proj,
# post_attention_layernorm, mlp.{gate,up,down}_proj, mlp.act_fn} / norm / rotary_emb, lm_head) and forward
# (Qwen3 adds a per-head RMSNorm of q and k: self_attn.{q,k}_norm).

# Activation modules computing exactly F.silu (the native step calls at::silu), by "module.QualName".
SILU_CLASSES = ("torch.nn.modules.activation.SiLU", "transformers.activations.SiLUActivation")

# RoPE types whose cos/sin depend only on the position (dynamic / longrope rescale with the sequence length).
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

# The KV buffers of the last engine that allocated some, kept for the next engine of the same shape once the
# first is gone (weakref dead: nothing reads them any more). LLaVA builds an engine per answer; fresh 20 MB
# buffers page-faulted on their first write, ~3 ms of a 1-thread time to first token.
_KV_SPARE: list[Any] = [None]  # (owner weakref, shape, dtype, k, v) or None
_KV_LOCK = threading.Lock()

Linear = Callable[[torch.Tensor], torch.Tensor]
Projections = Callable[[torch.Tensor], Sequence[torch.Tensor]]


def _rope_type(config: Any) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return str(params.get("rope_type", params.get("type", "default")))


def unsupported_reason(model: nn.Module, max_len: int | None = None) -> str | None:
    """Why ``LeanDecoder`` cannot run ``model`` (for ``max_len`` positions), or None when it can."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in LEAN_ARCHITECTURES:
        return (f"the lean decoder does not support model_type {model_type!r}; accepted: "
                f"{', '.join(LEAN_ARCHITECTURES.names())}")
    if _rope_type(config) not in STATIC_ROPE_TYPES:
        return (f"the lean decoder does not support rope_type {_rope_type(config)!r}; accepted: "
                f"{', '.join(STATIC_ROPE_TYPES)}")
    window = LEAN_ARCHITECTURES.get(model_type)(config)
    if window is not None and max_len is not None and max_len > window:
        return (f"{max_len} positions exceed the {model_type} sliding window of {window}; accepted: a prompt plus "
                f"new tokens of at most {window}")
    return None


def _fused(members: Sequence[nn.Module]) -> Projections | None:
    """One call computing all ``members`` when they form one fused group, in order (lowbit.kernels.fusion)."""
    from lowbit.kernels.quant_linear import GROUP_ATTR

    if not all(getattr(m, "backend", None) == "cpu" for m in members):  # groups serve the kernels backend only
        return None
    links = [m.__dict__.get(GROUP_ATTR) for m in members]
    if any(link is None for link in links) or len({id(link[0]) for link in links}) != 1:  # type: ignore[index]
        return None
    group = links[0][0]  # type: ignore[index]
    if [link[1] for link in links] != list(range(len(group.members))):  # type: ignore[index]
        return None

    def run(x: torch.Tensor) -> Sequence[torch.Tensor]:
        outs = group.outputs(x)
        return outs if outs is not None else [m(x) for m in members]  # kernels unavailable: the layers' own path

    return run


def _linear(module: nn.Module) -> Linear:
    """A plain ``nn.Linear`` as ``F.linear`` on its own weight (no module dispatch); anything else as itself."""
    if type(module) is nn.Linear:
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    return module


def _head(module: nn.Module, ops: Any) -> Linear:
    """The lm_head's callable: a float32 ``nn.Linear`` on the kernels' ``gemv_f32`` for inputs of at most 4 rows
    (a decode step, a prefill's last row), where reading its weight is the whole cost (SmolLM2's 49152 x 576:
    3.4 ms against F.linear's 7.2 at 1 thread); anything else as ``_linear``."""
    linear = _linear(module)
    if ops is None or not hasattr(ops, "gemv_f32") or type(module) is not nn.Linear \
            or module.weight.dtype != torch.float32:
        return linear
    weight, bias = module.weight, module.bias

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and x.numel() <= 4 * x.shape[-1] and weight.is_contiguous():
            return ops.gemv_f32(x, weight, bias)
        return linear(x)

    return run


def _qk_norms(attention: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The weights of an attention's per-head q/k RMSNorms (Qwen3), or (None, None)."""
    q_norm, k_norm = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
    return (None, None) if q_norm is None or k_norm is None else (q_norm.weight, k_norm.weight)


def _projections(members: Sequence[nn.Module]) -> Projections:
    fused = _fused(members)
    if fused is not None:
        return fused
    linears = [_linear(m) for m in members]
    return lambda x: [f(x) for f in linears]


@dataclass
class _Layer:
    """One decoder layer's callables and norm parameters, bound once."""

    in_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: Projections
    o: Linear
    gate_up: Projections
    down: Linear
    act: Callable[[torch.Tensor], torch.Tensor]
    q_norm: torch.Tensor | None = None  # QK-norm weights [head_dim] (Qwen3), None without
    k_norm: torch.Tensor | None = None
    modules: tuple[nn.Module, ...] = ()  # q, k, v, o, gate, up, down (for the native step)


@dataclass
class LeanGeneration:
    """New tokens [B, n] (rows that stopped early are padded with ``pad_id``) and, if asked, each step's raw
    logits [B, V] (the prefill's first)."""

    tokens: torch.Tensor
    logits: list[torch.Tensor] | None = None


def check_decoding(max_new_tokens: int, do_sample: bool, temperature: float, top_p: float) -> None:
    """One clear error for settings no decoding loop accepts (shared with ``llava_generate.Decoding``)."""
    if max_new_tokens < 1:
        raise LowbitError(f"max_new_tokens must be >= 1; received {max_new_tokens}")
    if do_sample and not temperature > 0:
        raise LowbitError(f"temperature must be > 0 when sampling; received {temperature}")
    if not 0 < top_p <= 1:
        raise LowbitError(f"top_p must be in (0, 1]; received {top_p}")


def sampling_warpers(temperature: float, top_k: int, top_p: float) -> LogitsProcessorList:
    """transformers' own warpers in ``generate``'s order (temperature, top-k, top-p), so sampling here keeps
    the candidates transformers would."""
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


def _sample(logits: torch.Tensor, warpers: LogitsProcessorList, generator: torch.Generator | None) -> torch.Tensor:
    """Next tokens [B] from logits [B, V]: the warpers (they ignore the ids they are passed), then a draw."""
    scores = warpers(None, logits)  # type: ignore[arg-type]
    return torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]


class LeanDecoder:
    """Prefill + one-token steps of a Llama-family HF causal LM ``model`` over its own modules.

    The layers' callables are bound at construction: build the engine after quantizing or loading weights.
    ``native`` (default): one-token steps of a float32 model whose layer projections all run on the packed
    kernels go through the kernels' ``DecoderStack`` (``_native_stack``): the same ops from C++, one call per
    token; False keeps every step in Python.
    """

    def __init__(self, model: nn.Module, native: bool = True) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise LowbitError(reason)
        config = model.config
        base = model.model
        self.model = model
        self.embed = base.embed_tokens
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.window = LEAN_ARCHITECTURES.get(config.model_type)(config)
        self.eps = float(config.rms_norm_eps)
        self.norm = base.norm.weight
        self.rotary = base.rotary_emb
        self.layers = [
            _Layer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                   _projections([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
                   _linear(layer.self_attn.o_proj),
                   _projections([layer.mlp.gate_proj, layer.mlp.up_proj]), _linear(layer.mlp.down_proj),
                   layer.mlp.act_fn, *_qk_norms(layer.self_attn),
                   (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                    layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj))
            for layer in base.layers[:config.num_hidden_layers]
        ]
        self.native = native
        self._ops = _decode_ops(model)  # the kernels' decode ops (float32 rows), or None: torch's ops
        self.lm_head = _head(model.lm_head, self._ops)
        # the prefill's attention (and RoPE + cache writes) on the kernels (float32 packed models) instead of torch's
        self._prefill_kernel = self._ops is not None and hasattr(self._ops, "prefill_attention")
        self._silu = [qualname(type(layer.act)) in SILU_CLASSES for layer in self.layers]
        self._stack: Any = None  # the kernels' DecoderStack for one-token steps (bound by reset), or None
        self._stack_key: list[int] = []  # ids of the prepared calls it holds
        self.pos = 0  # the next token's position (RoPE)
        self.fill = [0] * len(self.layers)  # filled KV-cache entries per layer (fewer after FastV pruning)
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self._rope_len = 0  # positions self.cos / self.sin cover (set by reset)

    # -- state ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def reset(self, batch: int, max_len: int) -> None:
        """Empty KV cache for ``batch`` rows of up to ``max_len`` positions; cos/sin for those positions."""
        reason = unsupported_reason(self.model, max_len)
        if reason is not None:
            raise LowbitError(reason)
        dtype = self.norm.dtype
        shape = (len(self.layers), batch, self.kv_heads, max_len, self.head_dim)
        if self.k_cache is None or self.k_cache.shape != shape or self.k_cache.dtype != dtype:
            self.k_cache, self.v_cache = _kv_buffers(self, shape, dtype)
        if self._rope_len < max_len:
            # The model's rotary module: same formula, theta and scaling as its forward. [max_len, head_dim] each
            cos, sin = self.rotary(self.k_cache, torch.arange(max_len).unsqueeze(0))
            half = self.head_dim // 2
            self.cos, self.sin = cos[0], torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)  # see _rope
            self._rope_len = max_len
        self.pos = 0
        self.fill = [0] * len(self.layers)
        self._stack = _native_stack(self) if self.native else None

    # -- the network ---------------------------------------------------------------------------------------
    def _rms(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # LlamaRMSNorm (weight * x / sqrt(mean(x^2) + eps)) as one fused op: the kernels' (what the native step
        # runs) on a packed float32 model, else torch's, equal to LlamaRMSNorm bit for bit in float32
        # (tests/models/test_lean_decode.py compares logits with transformers').
        if self._ops is not None and h.dtype == torch.float32 and weight.dtype == torch.float32:
            return self._ops.rms_norm(h, weight, self.eps)
        if h.dtype != torch.float32:  # half-precision models: LlamaRMSNorm's float32 inside, op for op
            x = h.to(torch.float32)
            return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(h.dtype)
        return F.rms_norm(h, weight.shape, weight, self.eps)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # transformers' x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x2, x1) = cat(x2, x1) * [-1, 1]:
        # the sign lives in ``sin`` (exact) and the half swap is one flip. x [B, heads, T, hd]
        b, n, t, hd = x.shape
        swapped = x.reshape(b, n, t, 2, hd // 2).flip(-2).view(b, n, t, hd)
        return x * cos + swapped * sin

    def _forward(self, h: torch.Tensor, prune: InLayerPrune | None = None) -> torch.Tensor:
        """Hidden states [B, T, D] at positions pos.. pos+T -> final-norm hidden state of the last one [B, D].

        ``prune`` (prefill only): FastV, after ``prune.layer`` layers only the kept positions go on; each
        layer's KV cache fills from its own offset (``self.fill``), so later layers hold fewer entries.
        """
        b, t, _ = h.shape
        start, positions = self.pos, t  # positions advanced (pruned tokens keep theirs)
        assert self.k_cache is not None and self.v_cache is not None, "reset() first"
        if self.fill[0] + t > self.k_cache.shape[3]:  # layer 0 never prunes: it holds the most entries
            raise LowbitError(f"position {start + t} is past the {self.k_cache.shape[3]} positions reset() made "
                              "room for")
        if t > 1 and start > 0:
            raise LowbitError("a multi-token forward must start at position 0 (prefill); decode one token at a time")
        cos, sin = self.cos[start:start + t], self.sin[start:start + t]  # [T, hd], broadcast over [B, heads, T, hd]
        causal = t > 1
        scores: torch.Tensor | None = None
        last_layer = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if prune is not None and i == prune.layer:
                assert scores is not None
                keep = prune.kept_positions(scores, t)  # [B, T'] ascending prompt positions
                h = h.gather(1, keep.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # [B, T', D]
                cos, sin = self.cos[keep].unsqueeze(1), self.sin[keep].unsqueeze(1)  # [B, 1, T', hd]: own positions
                t = keep.shape[1]
            x = self._rms(h, layer.in_norm)
            q, k, v = layer.qkv(x)
            kc, vc = self.k_cache[i], self.v_cache[i]  # [B, KV, max_len, hd]
            fill = self.fill[i]
            if self._prefill_kernel and layer.q_norm is None and cos.dim() == 2 and q.dtype == torch.float32:
                # the kernels' RoPE of every row, k and v written into the cache in the same pass: q [B, H, T, hd]
                q = self._ops.rope_cache(q, k, v, cos, sin, kc, vc, fill, self.heads)
                k = kc[:, :, fill:fill + t]  # (read by FastV's attention scores)
            else:
                q, k = q.view(b, t, self.heads, self.head_dim), k.view(b, t, self.kv_heads, self.head_dim)
                if layer.q_norm is not None:  # Qwen3's QK-norm: an RMSNorm over each head's vector, before RoPE
                    q, k = self._rms(q, layer.q_norm), self._rms(k, layer.k_norm)  # type: ignore[arg-type]
                q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, hd], [B, KV, T, hd]
                v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
                q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
                kc[:, :, fill:fill + t] = k
                vc[:, :, fill:fill + t] = v
            self.fill[i] = fill + t
            trimmed = causal and i == last_layer and (prune is None or prune.layer - 1 != i)
            if trimmed:
                # The prefill's last layer: every position's k, v go into the cache (later tokens read them),
                # but only the last position's output is read (the next token's logits), so its query alone
                # attends (to all positions: no mask) and o / the MLP run on one row instead of T.
                q, h, t = q[:, :, -1:], h[:, -1:], 1
            if causal and self._ops is not None and q.dtype == torch.float32 and self._prefill_kernel:
                # the kernels' causal attention over the cache's filled prefix (the trimmed last query row sees
                # all of it): [B, T, H * hd], o's input without a transpose copy
                flat = self._ops.prefill_attention(q, kc, vc, self.fill[i])
            else:
                if not causal and self._ops is not None and q.dtype == torch.float32:
                    attn = self._ops.decode_attention(q, kc, vc, fill + t)  # one token: the native step's attention
                else:
                    if not causal:  # one new token: attend to the filled prefix of the cache
                        k, v = kc[:, :, :fill + t], vc[:, :, :fill + t]
                    # (a prefill starts at 0: its own k, v are the whole prefix; SDPA is ~3x faster on them than
                    # on the strided cache slice)
                    attn = F.scaled_dot_product_attention(q, k, v, is_causal=causal and not trimmed,
                                                          enable_gqa=self.heads != self.kv_heads)  # [B, H, T, hd]
                flat = attn.transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
            if prune is not None and i == prune.layer - 1:
                scores = attention_received(q, k, prune.start, prune.count)  # [B, count]
            h = h + layer.o(flat)
            x = self._rms(h, layer.post_norm)
            gate, up = layer.gate_up(x)
            if self._ops is not None and self._silu[i] and gate.dtype == torch.float32:
                h = h + layer.down(self._ops.silu_mul(gate, up))
            else:
                h = h + layer.down(layer.act(gate) * up)
        self.pos = start + positions
        return self._rms(h[:, -1], self.norm)

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                max_len: int | None = None, prune: InLayerPrune | None = None) -> torch.Tensor:
        """Reset and run the prompt (ids [B, T] or embeddings [B, T, D]); logits [B, V] of its last position.

        ``max_len`` (default: the prompt length + 256) sizes the KV cache; ``prune`` drops visual tokens after
        a layer (FastV, ``token_pruning.InLayerPrune``); the positions of later tokens are not renumbered.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise LowbitError("give exactly one of input_ids [B, T] or inputs_embeds [B, T, D]")
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if prune is not None:
            prune = prune.validated(len(self.layers), h.shape[1])
            if prune.keep == prune.count:
                prune = None  # nothing dropped: the plain prefill, bit for bit
        self.reset(h.shape[0], max_len or h.shape[1] + 256)
        if prune is None and self._stack is not None and h.shape[0] == 1 and h.shape[1] > 1 \
                and h.dtype == torch.float32 and hasattr(self._stack, "prefill"):
            # the same ops from C++ in one call (Decoder::prefill), on the stack's own buffers: no tensor per op
            out = self._stack.prefill(h, self.k_cache, self.v_cache, self.cos, self.sin)
            self.pos, self.fill = h.shape[1], [h.shape[1]] * len(self.layers)
            return self._stack_logits(out)
        return self.lm_head(self._forward(h, prune))

    def _stack_logits(self, out: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] from a DecoderStack call: its own when it ran the packed head, else the final norm and
        the lm_head of its last hidden state [B, 1, D] here."""
        return out if self._stack.has_head else self.lm_head(self._rms(out[:, -1], self.norm))

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (ids [B]) at the next position; logits [B, V] for the position after it."""
        h = self.embed(tokens[:, None])
        if self._stack is None or h.dtype != torch.float32:
            return self.lm_head(self._forward(h))
        assert self.k_cache is not None and self.v_cache is not None, "reset() first"
        if max(self.fill) + 1 > self.k_cache.shape[3]:
            raise LowbitError(f"position {self.pos + 1} is past the {self.k_cache.shape[3]} positions reset() made "
                              "room for")
        out = self._stack.step(h, self.k_cache, self.v_cache, self.fill, self.cos, self.sin, self.pos)
        self.fill = [f + 1 for f in self.fill]
        self.pos += 1
        return self._stack_logits(out)

    # -- the loop ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None, *,
                 max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop_ids: Sequence[int] = (), pad_id: int = 0,
                 callback: Callable[[torch.Tensor], None] | None = None,
                 return_logits: bool = False, prune: InLayerPrune | None = None) -> LeanGeneration:
        """Up to ``max_new_tokens`` new tokens per row; a row stops after emitting one of ``stop_ids`` (kept).

        ``callback`` receives each step's tokens [B] as they are chosen (streaming). Sampling draws from a
        generator seeded with ``seed`` (the global RNG when None). ``prune``: FastV inside the prefill (``prefill``).
        """
        check_decoding(max_new_tokens, do_sample, temperature, top_p)
        prompt = (input_ids if input_ids is not None else inputs_embeds).shape[1]  # type: ignore[union-attr]
        logits = self.prefill(input_ids, inputs_embeds, max_len=prompt + max_new_tokens, prune=prune)
        generator = None
        warpers = sampling_warpers(temperature, top_k, top_p) if do_sample else None
        if do_sample and seed is not None:
            generator = torch.Generator().manual_seed(seed)
        stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long)
        batch = logits.shape[0]
        out = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long)
        done = torch.zeros(batch, dtype=torch.bool)
        kept: list[torch.Tensor] | None = [] if return_logits else None
        n = 0
        while True:
            if kept is not None:
                kept.append(logits.float())
            tokens = _sample(logits.float(), warpers, generator) if warpers is not None else logits.argmax(-1)
            if batch > 1:
                tokens = tokens.masked_fill(done, pad_id)
            out[:, n] = tokens
            n += 1
            if callback is not None:
                callback(tokens)
            if stops.numel():
                done |= torch.isin(tokens, stops)
                if bool(done.all()):
                    break
            if n == max_new_tokens:
                break
            logits = self.step(tokens)
        return LeanGeneration(out[:, :n], kept)


def _kv_buffers(engine: LeanDecoder, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty K and V caches of ``shape``: the spare ones of a dead engine when they fit, else new (see _KV_SPARE)."""
    with _KV_LOCK:
        spare = _KV_SPARE[0]
        if spare is not None and spare[0]() is None and spare[1] == shape and spare[2] == dtype:
            k, v = spare[3], spare[4]
        else:
            k, v = torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
        _KV_SPARE[0] = (weakref.ref(engine), shape, dtype, k, v)
    return k, v


def _decode_ops(model: nn.Module) -> Any:
    """The kernels' small decode ops (RMSNorm, one-token attention, silu * up: what the native step runs, so the
    Python loop and it agree bit for bit) for a model with packed layers, or None (float models keep torch's ops
    and never build the kernels for them)."""
    from lowbit.kernels import fast
    from lowbit.kernels.quant_linear import QuantLinear

    if not any(isinstance(m, QuantLinear) for m in model.modules()):
        return None
    ext = fast.extension()
    return ext if ext is not None and hasattr(ext, "decode_attention") else None


def _native_stack(engine: LeanDecoder) -> Any:
    """The kernels' ``DecoderStack`` over ``engine``'s layers, or None unless every layer qualifies: a float32
    model, SiLU MLPs, no QK-norm, q/k/v and gate/up each one fused packed group and o/down plain packed linears,
    all on the ``cpu`` backend with the kernels available (the conditions under which ``_forward`` runs exactly
    these kernel calls and ops)."""
    from lowbit.kernels import fast
    from lowbit.kernels.quant_linear import GROUP_ATTR, QuantLinear

    ext = fast.extension()
    if ext is None or not hasattr(ext, "DecoderStack") or engine.norm.dtype != torch.float32:
        return None

    def plain(m: nn.Module) -> Any:  # a packed linear computing alone on the kernels: its prepared call
        ok = (isinstance(m, QuantLinear) and type(m)._matmul is QuantLinear._matmul and m.backend == "cpu"
              and not m.weight_shape[2:] and m.input_scale is None and m.output_clamp is None
              and getattr(m, "act_spec", None) is None and GROUP_ATTR not in m.__dict__)
        return fast.prepared(m).call if ok else None

    def fused(members: tuple[nn.Module, ...]) -> Any:  # one fused group in member order: its prepared call
        links = [m.__dict__.get(GROUP_ATTR) for m in members]
        if any(link is None for link in links) or len({id(link[0]) for link in links}) != 1:
            return None
        group = links[0][0]  # type: ignore[index]
        if list(group.members) != list(members) or any(getattr(m, "backend", None) != "cpu" for m in members):
            return None
        handle = group._handle()
        return None if handle is None else handle.call

    calls: list[list[Any]] = [[], [], [], []]
    for layer in engine.layers:
        if layer.q_norm is not None or qualname(type(layer.act)) not in SILU_CLASSES or len(layer.modules) != 7:
            return None
        q, k, v, o, gate, up, down = layer.modules
        row = [fused((q, k, v)), plain(o), fused((gate, up)), plain(down)]
        if any(c is None for c in row):
            return None
        for bucket, c in zip(calls, row, strict=True):
            bucket.append(c)
    key = [id(c) for bucket in calls for c in bucket]
    head = plain(engine.model.lm_head)  # a plain packed lm_head runs in the same call (else Python runs it)
    key.append(id(head))
    if engine._stack is not None and engine._stack_key == key:  # the same prepared weights: keep the stack
        return engine._stack
    engine._stack_key = key
    return ext.DecoderStack([layer.in_norm.contiguous() for layer in engine.layers],
                            [layer.post_norm.contiguous() for layer in engine.layers], *calls,
                            heads=engine.heads, kv_heads=engine.kv_heads, head_dim=engine.head_dim, eps=engine.eps,
                            norm=engine.norm, head=head)


def lean_generate(model: nn.Module, input_ids: torch.Tensor | None = None,
                  inputs_embeds: torch.Tensor | None = None, **options: Any) -> LeanGeneration:
    """``LeanDecoder(model).generate(...)`` (one engine per call: it binds the model's current modules)."""
    return LeanDecoder(model).generate(input_ids, inputs_embeds, **options)
