"""The shape evaluation functions return: JSON-ready metrics plus the tensors fidelity needs, kept aside.

A ``Result`` is a plain ``dict`` of metrics (so ``json.dumps(result)`` just works) with one extra attribute,
``outputs``, holding the embeddings and predictions. The tensors never reach the JSON because ``json`` only
serialises the dict items, never attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Outputs:
    """What a model produced on one dataset, for comparing two models sample by sample.

    - ``image_embeddings`` [N, D]: normalised, one row per image.
    - ``text_embeddings`` [T, D]: normalised; class embeddings (zero-shot) or unique-caption embeddings
      (retrieval).
    - ``predictions`` [N]: the top-1 class (zero-shot) or top-1 unique caption (retrieval) per image.
    - ``kind``: ``"zeroshot"`` or ``"retrieval"``, i.e. what a prediction means.
    """

    image_embeddings: torch.Tensor
    text_embeddings: torch.Tensor
    predictions: torch.Tensor
    kind: str


class Result(dict[str, Any]):
    """Metrics dict with the run's ``Outputs`` attached as ``.outputs`` (not part of the JSON).

    Example:
        >>> r = Result({"top1": 1.0}, outputs=None)
        >>> r["top1"], r.outputs
        (1.0, None)
    """

    def __init__(self, metrics: dict[str, Any], outputs: Outputs | None) -> None:
        super().__init__(metrics)
        self.outputs = outputs


def headline(metrics: dict[str, Any]) -> tuple[str, float] | None:
    """The one accuracy number a run is ranked by: top-1 if classified, else mean of the two R@1s.

    Example:
        >>> headline({"top1": 0.9, "i2t_r1": 0.5, "t2i_r1": 0.7})
        ('top1', 0.9)
        >>> headline({"i2t_r1": 0.5, "t2i_r1": 0.7})
        ('mean_r1', 0.6)
    """
    if metrics.get("top1") is not None:
        return "top1", float(metrics["top1"])
    if metrics.get("i2t_r1") is not None and metrics.get("t2i_r1") is not None:
        return "mean_r1", (float(metrics["i2t_r1"]) + float(metrics["t2i_r1"])) / 2
    return None


NO_PREDICTION = -1  # the prediction of a sample whose scores are not all finite: agrees with nothing


def pessimistic_scores(scores: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """``scores`` with every non-finite entry made to lose: -inf where it is the sample's own (true) score,
    +inf where it is a competitor's. Ranks computed as "how many others score at least as high" then count a
    NaN/Inf score as a miss, never a hit (NaN compares false to everything, which counted it a hit before)."""
    lose = torch.where(own, torch.tensor(-torch.inf), torch.tensor(torch.inf))
    return torch.where(torch.isfinite(scores), scores, lose)


def finite_argmax(scores: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax, ``NO_PREDICTION`` for a row holding NaN/Inf (argmax would pick the first NaN)."""
    ok = torch.isfinite(scores).all(dim=1)
    return torch.where(ok, scores.nan_to_num(-torch.inf).argmax(dim=1), torch.full_like(ok, NO_PREDICTION,
                                                                                          dtype=torch.long))
