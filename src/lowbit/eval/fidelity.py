"""How closely a compressed model tracks its reference, sample by sample.

Accuracy alone hides drift: two models can both score 80% while disagreeing on a fifth of the images.
Fidelity compares the two runs on the same data directly:

- ``agreement``: share of images whose top-1 prediction (class, or retrieved caption) is the same.
- ``image_cosine`` / ``text_cosine``: mean cosine between corresponding embeddings. None when the two models
  embed into different dimensions (e.g. a distilled student), where only agreement is meaningful.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from lowbit.data.base import ImageTextSet
from lowbit.errors import LowbitError
from lowbit.eval.results import NO_PREDICTION, Outputs, Result, headline
from lowbit.models.base import DualEncoder


def _outputs(x: Outputs | Result) -> Outputs:
    out = x if isinstance(x, Outputs) else getattr(x, "outputs", None)
    if not isinstance(out, Outputs):
        raise LowbitError(
            f"fidelity needs model outputs; received {type(x).__name__} without them; "
            "accepted: the Result of zeroshot_classify/retrieve or its .outputs"
        )
    return out


def _mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    if a.shape[-1] != b.shape[-1]:
        return None
    cosine = F.cosine_similarity(a.float(), b.float(), dim=-1)
    return float(cosine.nan_to_num(0.0, 0.0, 0.0).mean())  # a non-finite embedding agrees with nothing


def fidelity(reference_outputs: Outputs | Result, candidate_outputs: Outputs | Result) -> dict[str, Any]:
    """Top-1 agreement and mean embedding cosine between a reference run and a candidate run.

    Both runs must be the same kind (zero-shot or retrieval) on the same samples.

    Example:
        >>> ref = zeroshot_classify(fp32_model, data)  # doctest: +SKIP
        >>> fidelity(ref, zeroshot_classify(int4_model, data))  # doctest: +SKIP
        {'basis': 'zeroshot', 'n': 1000, 'agreement': 0.97, 'image_cosine': 0.995, 'text_cosine': 0.998}
    """
    ref, cand = _outputs(reference_outputs), _outputs(candidate_outputs)
    if ref.kind != cand.kind:
        raise LowbitError(
            f"fidelity compares runs of one kind; received {ref.kind!r} and {cand.kind!r}; "
            "accepted: two zeroshot or two retrieval runs"
        )
    same_texts = ref.text_embeddings.shape[0] == cand.text_embeddings.shape[0]
    if ref.predictions.shape != cand.predictions.shape or not same_texts:
        raise LowbitError(
            f"fidelity compares runs on the same samples; received {len(ref.predictions)} vs "
            f"{len(cand.predictions)} images and {ref.text_embeddings.shape[0]} vs "
            f"{cand.text_embeddings.shape[0]} texts; accepted: equal counts"
        )
    n = int(ref.predictions.numel())
    agree = (ref.predictions == cand.predictions) & (cand.predictions != NO_PREDICTION)  # NaN output: no agreement
    agreement = float(agree.float().mean()) if n else 0.0
    return {
        "basis": ref.kind,
        "n": n,
        "agreement": agreement,
        "image_cosine": _mean_cosine(ref.image_embeddings, cand.image_embeddings),
        "text_cosine": _mean_cosine(ref.text_embeddings, cand.text_embeddings),
    }


def accuracy_kept(reference_metrics: dict[str, Any], candidate_metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline accuracy of both runs and their ratio (candidate / reference).

    Example:
        >>> accuracy_kept({"top1": 0.8}, {"top1": 0.76})
        {'metric': 'top1', 'reference_accuracy': 0.8, 'candidate_accuracy': 0.76, 'accuracy_kept': 0.95}
    """
    ref, cand = headline(reference_metrics), headline(candidate_metrics)
    if ref is None or cand is None:
        return {"metric": None, "reference_accuracy": None, "candidate_accuracy": None, "accuracy_kept": None}
    kept = round(cand[1] / ref[1], 6) if ref[1] > 0 else None
    return {"metric": ref[0], "reference_accuracy": ref[1], "candidate_accuracy": cand[1], "accuracy_kept": kept}


def compare_models(
    reference: DualEncoder,
    candidate: DualEncoder,
    data: ImageTextSet,
    batch_size: int = 64,
    progress: bool = False,
) -> dict[str, Any]:
    """Run both models on ``data`` (zero-shot if labelled, else retrieval) and compare them.

    Returns ``fidelity(...)`` merged with ``accuracy_kept(...)``.

    Example:
        >>> data = resolve_dataset("fashion-mnist", limit=500)  # doctest: +SKIP
        >>> compare_models(fp32_model, int4_model, data)  # doctest: +SKIP
        {'basis': 'zeroshot', 'n': 500, 'agreement': 0.96, ..., 'accuracy_kept': 0.98}
    """
    from lowbit.eval.retrieval import retrieve
    from lowbit.eval.zeroshot import zeroshot_classify

    run = zeroshot_classify if data.labels is not None and data.classnames else retrieve
    ref = run(reference, data, batch_size=batch_size, progress=progress)
    cand = run(candidate, data, batch_size=batch_size, progress=progress)
    return {**fidelity(ref, cand), **accuracy_kept(ref, cand)}
