"""Quantized attention matmuls: int8 (or narrower) QKᵀ and AV for transformers' attention modules.

An attention module of a class in ``QUANTIZABLE_ATTENTION`` (filled by the model families, e.g. HF CLIP's
``CLIPAttention`` by ``lowbit.models.clip``) that carries an ``AttnQuant`` child named ``lowbit_attn`` computes

    S = (Q_a(q) · Q_a(k)ᵀ) · scaling (+ mask),   P = softmax(S),   out = Q_p(P) · Q_a(v)

with q, k, v rounded to a symmetric ``bits``-bit grid with static per-tensor scales (calibrated once, stored as
the child's buffers ``q_scale``, ``k_scale``, ``v_scale``) and the probabilities P rounded either to the uniform
unsigned grid of step 1 / (2^pbits - 1) (``uniform``) or to powers of two 2^-c, c in 0 .. 2^pbits - 2, and 0
below (``log2``: RepQ-ViT arXiv:2212.08254's quantizer for post-softmax values, which are mostly tiny). The
products of integer codes are summed in float32, which equals the integer matmul (exact while the sums stay
below 2^24: head dims up to 1024 at 8 bits) times the two scales, up to float rounding of that last product; no
separate int8 attention kernel is used (the tensors are small next to the linears').

It works through transformers' attention dispatch: ``install()`` wraps the registered ``sdpa`` function once;
modules without ``lowbit_attn`` (every other model) go straight to the original. Masks come in sdpa's format
(boolean keep-masks or additive floats, or none with ``is_causal``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.registry import Registry

PROBS = ("uniform", "log2")
ATTN_CHILD = "lowbit_attn"
# "module.QualName" of attention classes whose forward calls transformers' attention dispatch with q, k, v.
QUANTIZABLE_ATTENTION: Registry[bool] = Registry("quantizable attention class")


@dataclass(frozen=True)
class AttnSpec:
    """q/k/v grid (``bits``, symmetric, static per tensor) and the probabilities' grid (``probs``, ``probs_bits``)."""

    bits: int = 8
    probs: str = "uniform"
    probs_bits: int = 8

    def __post_init__(self) -> None:
        for name in ("bits", "probs_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 8:
                raise LowbitError(f"attention {name} {v!r}; accepted: an integer in 2..8")
        if self.probs not in PROBS:
            raise LowbitError(f"attention probs {self.probs!r}; accepted: {', '.join(PROBS)}")

    def short(self) -> str:
        """``a8`` (uniform probabilities at the same bits), ``a4l`` (log2 probabilities), ``a8p4l`` ..."""
        p = "" if self.probs_bits == self.bits else f"p{self.probs_bits}"
        return f"a{self.bits}{p}{'l' if self.probs == 'log2' else ''}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def parse(cls, value: Any) -> AttnSpec | None:
        """A recipe's ``attention``: ``a16`` / None (float attention), a short form or a mapping."""
        if value is None or value == "a16":
            return None
        if isinstance(value, dict):
            unknown = sorted(map(str, set(value) - set(cls.__dataclass_fields__)))
            if unknown:
                raise LowbitError(f"attention: unknown key {unknown[0]!r}; accepted: bits, probs, probs_bits")
            return cls(**value)
        if not isinstance(value, str):
            raise LowbitError(f"attention {value!r}; accepted: a16, aBITS[pBITS][l] (a8, a4l) or a mapping")
        import re

        m = re.fullmatch(r"a([2-8])(?:p([2-8]))?(l?)", value)
        if m is None:
            raise LowbitError(f"attention {value[:40]!r}; accepted: a16 or aBITS[pBITS][l] with bits 2..8 (a8: int8 "
                              "q/k/v and probabilities; l: log2 probabilities)")
        bits = int(m.group(1))
        return cls(bits, "log2" if m.group(3) else "uniform", int(m.group(2) or bits))


class AttnQuant(nn.Module):
    """The static scales of one attention module's quantized matmuls (see the module docstring)."""

    def __init__(self, spec: AttnSpec) -> None:
        super().__init__()
        self.spec = spec
        for name in ("q_scale", "k_scale", "v_scale"):
            self.register_buffer(name, torch.zeros(1))
        self.calibrating = False  # record the ranges of q, k, v (float attention meanwhile)

    def extra_repr(self) -> str:
        return self.spec.short()

    def observe(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        with torch.no_grad():
            for name, t in (("q_scale", q), ("k_scale", k), ("v_scale", v)):
                top = t.detach().abs().amax().float() / ((1 << (self.spec.bits - 1)) - 1)
                buf = self._buffers[name]
                buf.copy_(torch.maximum(buf, top.reshape(1)))


def _codes(x: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """The integer codes of x on the symmetric grid of ``scale`` (lowbit.kernels.act_quant's rounding rule), as
    floats: the matmuls multiply codes, and the scales are applied once to their results."""
    return (x.float() * (1.0 / scale.reshape(()))).round_().clamp_(-qmax, qmax)


def quantize_probs(p: torch.Tensor, spec: AttnSpec) -> torch.Tensor:
    """Probabilities in [0, 1] on the ``uniform`` grid k / (2^pbits - 1) or the ``log2`` grid 2^-c (0 below)."""
    levels = (1 << spec.probs_bits) - 1
    if spec.probs == "uniform":
        return torch.round(p * levels) / levels
    c = torch.round(-torch.log2(p.clamp_min(1e-30)))
    return torch.where(c > levels - 1, torch.zeros_like(p), torch.exp2(-c.clamp_min(0)))


def quantized_attention(module: nn.Module, quant: AttnQuant, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None,
                        is_causal: bool) -> torch.Tensor:
    """[B, H, T, D] q/k/v -> [B, T, H, D], the attention of the module docstring."""
    spec = quant.spec
    qmax = (1 << (spec.bits - 1)) - 1
    if key.shape[1] != query.shape[1]:  # grouped-query attention: repeat the key/value heads
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    cq, ck = _codes(query, quant.q_scale, qmax), _codes(key, quant.k_scale, qmax)
    cv = _codes(value, quant.v_scale, qmax)
    scores = torch.matmul(cq, ck.transpose(-1, -2)).mul_(quant.q_scale * quant.k_scale * scaling)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    elif is_causal:
        t, s = scores.shape[-2:]
        keep = torch.ones(t, s, dtype=torch.bool, device=scores.device).tril(s - t)
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if spec.probs == "uniform":  # integer codes again: the step 1 / (2^pbits - 1) joins v's scale
        levels = (1 << spec.probs_bits) - 1
        out = torch.matmul(probs.mul_(levels).round_(), cv).mul_(quant.v_scale / levels)
    else:
        out = torch.matmul(quantize_probs(probs, spec), cv).mul_(quant.v_scale)
    return out.to(query.dtype).transpose(1, 2).contiguous()


_installed: dict[str, Any] = {}


def install() -> None:
    """Wrap transformers' ``sdpa`` attention once so modules carrying ``lowbit_attn`` take the quantized path."""
    if _installed:
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def sdpa_or_quantized(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        quant = module._modules.get(ATTN_CHILD) if isinstance(module, nn.Module) else None
        if quant is not None and quant.calibrating:  # record the ranges; float attention meanwhile
            quant.observe(query, key, value)
            quant = None
        if quant is None:
            return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                            is_causal=is_causal, **kwargs)
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(causal) and attention_mask is None and query.shape[2] > 1
        return quantized_attention(module, quant, query, key, value, attention_mask, scaling, causal), None

    ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa_or_quantized
    _installed["sdpa"] = original


def is_quantizable(module: nn.Module) -> bool:
    """Is ``module``'s class (or a base of it) in ``QUANTIZABLE_ATTENTION``?"""
    return QUANTIZABLE_ATTENTION.for_class(type(module)) is not None


def attach(module: nn.Module, spec: AttnSpec) -> AttnQuant:
    """Give ``module`` (an attention of a ``QUANTIZABLE_ATTENTION`` class running sdpa) zero-filled scales."""
    config = getattr(module, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl != "sdpa":
        raise LowbitError(f"{type(module).__name__} runs attention {impl!r}; quantized attention matmuls take the "
                          "'sdpa' path (load the model with attn_implementation='sdpa')")
    install()
    quant = AttnQuant(spec)
    quant.to(next((b.device for b in module.buffers()), torch.device("cpu")))
    module.add_module(ATTN_CHILD, quant)
    return quant


def attention_modules(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every quantizable attention module under ``root``."""
    return [(name, m) for name, m in root.named_modules() if is_quantizable(m)]
