"""Visual-token pruning: keep the highest-scoring share of the visual tokens, before or inside the LM.

Most visual tokens of a LLaVA prompt carry little the answer needs, and the LM's prefill cost grows with the
prompt length. Two places to drop them:

- **before the language model** (FasterVLM, Zhang et al., 2024: rank by the vision tower's [CLS] attention):
  ``prune_tokens`` drops a ``ratio`` of the tokens by a per-token score (``llava_vision`` supplies [CLS]
  attention for ViT towers, feature norm for CNN grids);
- **inside it, after layer k** (FastV, Chen et al., 2024, arXiv:2403.06764): the first k layers read every
  visual token; ``InLayerPrune`` says which span to prune there and ``attention_received`` ranks its tokens
  by the attention they get in layer k, so the LM itself decides what the question needs. The lean decoding
  engine (``lean_decode``) carries it out: later layers, and their KV cache, hold only the survivors, which
  keep their original positions (RoPE).

Both keep the survivors in their original order, so the LM still reads them in raster order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError


def kept_count(n_tokens: int, ratio: float) -> int:
    """How many of ``n_tokens`` survive pruning ``ratio`` (at least one).

    Example:
        >>> kept_count(16, 0.5), kept_count(16, 0.0), kept_count(9, 0.5)
        (8, 16, 5)
    """
    if not 0.0 <= ratio < 1.0:
        raise LowbitError(f"prune ratio must be in [0, 1); received {ratio!r}; accepted: 0 <= ratio < 1")
    return max(1, n_tokens - math.floor(n_tokens * ratio))


def prune_tokens(tokens: torch.Tensor, scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep the top-scoring tokens [B, N, C] -> [B, K, C], K = ``kept_count(N, ratio)``, order preserved.

    ``ratio == 0`` returns ``tokens`` itself (no copy, no reordering).
    """
    keep = kept_count(tokens.shape[1], float(ratio))
    if keep == tokens.shape[1]:
        return tokens
    idx = scores.topk(keep, dim=1).indices.sort(dim=1).values  # [B, K], ascending = original raster order
    return tokens.gather(1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))  # [B, K, C]


@dataclass(frozen=True)
class InLayerPrune:
    """FastV inside the LM: after ``layer`` decoder layers, keep ``keep`` of the ``count`` prompt positions
    starting at ``start`` (the visual tokens), ranked by ``attention_received`` in layer ``layer``."""

    layer: int
    start: int
    count: int
    keep: int

    def validated(self, n_layers: int, prompt_len: int) -> InLayerPrune:
        if not 1 <= self.layer < n_layers:
            raise LowbitError(f"prune_layer must be in [1, {n_layers - 1}] for this {n_layers}-layer language model; "
                              f"received {self.layer} (0 prunes before the language model)")
        if self.start < 0 or self.count < 1 or self.start + self.count >= prompt_len:
            raise LowbitError(f"the pruned span {self.start}..{self.start + self.count} must lie inside the "
                              f"{prompt_len}-token prompt with at least one token after it (the question)")
        if not 1 <= self.keep <= self.count:
            raise LowbitError(f"keep must be in [1, {self.count}]; received {self.keep}")
        return self

    def kept_positions(self, scores: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """Prompt positions that survive, ascending [B, T'] (T' = T - count + keep), from span scores [B, count]."""
        b = scores.shape[0]
        chosen = scores.topk(self.keep, dim=1).indices.sort(dim=1).values + self.start  # [B, keep]
        before = torch.arange(self.start).expand(b, -1)  # [B, start]
        after = torch.arange(self.start + self.count, prompt_len).expand(b, -1)  # [B, T - start - count]
        return torch.cat([before, chosen, after], dim=1)


def attention_received(q: torch.Tensor, k: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Mean attention each of the ``count`` positions from ``start`` receives [B, count].

    q [B, H, T, hd] and k [B, KV, T, hd] (after RoPE; KV divides H) are one prefill layer's queries and keys.
    The queries are the prompt tokens after the span (the question and the assistant cue): under the causal
    mask each of them sees every visual token, so the mean over them and over heads is not biased toward early
    positions, as FastV's mean over all queries is.
    """
    heads, kv_heads, t, hd = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    keys = k.repeat_interleave(heads // kv_heads, dim=1)  # [B, H, T, hd]
    after = q[:, :, start + count:]  # [B, H, Tq, hd]
    logits = after @ keys.transpose(-1, -2) / math.sqrt(hd)  # [B, H, Tq, T]
    query_pos = torch.arange(start + count, t).unsqueeze(1)  # [Tq, 1]
    logits = logits.masked_fill(torch.arange(t).unsqueeze(0) > query_pos, float("-inf"))  # causal
    probs = logits.float().softmax(-1)[..., start:start + count]  # [B, H, Tq, count]
    return probs.mean(dim=(1, 2))  # [B, count]
