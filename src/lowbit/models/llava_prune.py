"""Visual-token pruning before the language model: keep the highest-scoring share of the visual tokens.

Most visual tokens of a LLaVA prompt carry little the answer needs, and the LM's prefill cost grows with the
prompt length (FastV, Chen et al., 2024; FasterVLM, Zhang et al., 2024: rank by [CLS] attention in the vision
tower and drop the rest before the LM). ``prune_tokens`` drops a ``ratio`` of the tokens by a per-token score
(``llava_vision`` supplies [CLS] attention for ViT towers, feature norm for CNN grids) and keeps the survivors
in their original order, so the LM still reads them in raster order.
"""

from __future__ import annotations

import math

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
