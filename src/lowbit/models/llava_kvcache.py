"""A quantized KV cache for transformers' ``generate``: keys and values stored at 8 or 4 bits.

During decoding the cache, not the weights, is what grows: for a LLaVA prompt it holds every visual token of
every layer. Here each cached key/value vector is quantized per token and head in groups along the head
dimension, asymmetric min/max (the per-token scheme of KIVI's values and of AKVQ-VL; Liu et al., 2024,
"KIVI"), 4-bit codes packed two to a byte, float16 scale and minimum per group. New tokens are quantized once,
when they enter the cache, and appended (no re-quantization of old tokens, so errors never compound); the
current step attends to its own keys/values in full precision, as in transformers' ``QuantizedCache``.

Error (stated, and tested): for Gaussian keys/values the relative RMS error of a dequantized entry is about
0.3% at 8 bits and 6% at 4 bits with groups of 32 (a b-bit uniform grid over the group's range).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import BaseQuantizedLayer, Cache

from lowbit.errors import LowbitError

KV_BITS = (8, 4)


def quantize_groups(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., d] -> (codes uint8 [..., d] or packed [..., d/2], scale [..., d/g], minimum [..., d/g])."""
    *lead, d = x.shape
    g = x.float().reshape(*lead, d // group, group)  # [..., G, g]
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).clamp(min=1e-8)
    codes = ((g - lo) / scale).round_().clamp_(0, 2**bits - 1).to(torch.uint8).reshape(*lead, d)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)  # [..., d/2]: low nibble = even channel
    return codes, scale.squeeze(-1).half(), lo.squeeze(-1).half()


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, bits: int, group: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``quantize_groups`` -> [..., d] in ``dtype``."""
    if bits == 4:
        codes = torch.stack([codes & 0xF, codes >> 4], dim=-1).flatten(-2)  # [..., d/2, 2] -> [..., d]
    *lead, d = codes.shape
    g = codes.float().reshape(*lead, d // group, group)  # [..., G, g]
    return (g * scale.float().unsqueeze(-1) + lo.float().unsqueeze(-1)).reshape(*lead, d).to(dtype)


class LowbitKVLayer(BaseQuantizedLayer):
    """One attention layer's cache: quantized keys/values [B, H, T, d] grown along T."""

    def __init__(self, bits: int = 8, group: int = 32) -> None:
        super().__init__()
        self.bits, self.group = bits, group
        self._parts: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {"k": [], "v": []}

    def _quantize(self, tensor: torch.Tensor, axis: int = -1) -> Any:
        return quantize_groups(tensor, self.bits, self.group)

    def _dequantize(self, q_tensor: Any) -> torch.Tensor:
        return dequantize_groups(*q_tensor, self.bits, self.group, self.dtype)

    def _cached(self, name: str) -> torch.Tensor | None:
        parts = self._parts[name]
        if not parts:
            return None
        return torch.cat([self._dequantize(p) for p in parts], dim=-2)  # [B, H, T_cached, d]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.dtype = key_states.dtype
        if key_states.shape[-1] % self.group:
            raise LowbitError(f"KV-cache quantization groups of {self.group} do not divide the head dimension "
                              f"{key_states.shape[-1]}; accepted: a group size dividing it")
        old_k, old_v = self._cached("k"), self._cached("v")
        keys = key_states if old_k is None else torch.cat([old_k, key_states], dim=-2)
        values = value_states if old_v is None else torch.cat([old_v, value_states], dim=-2)
        self._parts["k"].append(self._quantize(key_states.contiguous()))
        self._parts["v"].append(self._quantize(value_states.contiguous()))
        self.cumulative_length += key_states.shape[-2]
        return keys, values

    def reset(self) -> None:
        super().reset()
        self._parts = {"k": [], "v": []}

    def nbytes(self) -> int:
        return sum(t.nbytes for parts in self._parts.values() for p in parts for t in p)


def quantized_kv_cache(language_config: Any, bits: int, group: int = 32) -> Cache:
    """A transformers ``Cache`` whose every layer stores keys/values at ``bits`` (8 or 4)."""
    if bits not in KV_BITS:
        raise LowbitError(f"KV-cache bits must be one of {', '.join(map(str, KV_BITS))}; received {bits!r}")
    config = language_config.get_text_config(decoder=True) if hasattr(language_config, "get_text_config") \
        else language_config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    group = min(group, head_dim)
    return Cache(layers=[LowbitKVLayer(bits, group) for _ in range(config.num_hidden_layers)])
