"""Zero-shot classification: score each image against one text embedding per class (CLIP prompt ensembling).

Each class embedding is the mean of the normalised embeddings of every ``template.format(classname)``,
renormalised. Images are ranked by cosine similarity, which orders classes exactly like the model's own
logits (``scale * cos + bias`` is monotonic in ``cos``), so the logit scale never matters here.

Ties count against the image: a class is "in the top k" only if fewer than k other classes score at least as
high. A collapsed model (every class scoring the same) therefore scores 0, not the share of class 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

from lowbit.data.base import ImageTextSet
from lowbit.errors import LowbitError
from lowbit.eval.results import Outputs, Result, finite_argmax, pessimistic_scores
from lowbit.models.base import DualEncoder


def class_embeddings(
    model: DualEncoder, classnames: Sequence[str], templates: Sequence[str], progress: bool | str = False
) -> torch.Tensor:
    """Normalised class embeddings [C, D]: mean over templates of each prompt's normalised embedding.

    Example:
        >>> emb = class_embeddings(model, ["cat", "dog"], ["a photo of a {}.", "a {}."])  # doctest: +SKIP
        >>> emb.shape  # doctest: +SKIP
        torch.Size([2, 512])
    """
    if not classnames:
        raise LowbitError("zero-shot classification needs class names; received none; accepted: >= 1 name")
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise LowbitError(
            f"zero-shot templates need one '{{}}' for the class name; received {list(templates)!r}; "
            "accepted: e.g. ['a photo of a {}.']"
        )
    # replace() rather than format(): a template may contain other braces, and names may contain '{'.
    prompts = [t.replace("{}", name, 1) for name in classnames for t in templates]
    emb = F.normalize(model.embed_texts(prompts, progress=progress).float(), dim=-1)
    emb = emb.reshape(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


def classify_embeddings(
    image_emb: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str]
) -> Result:
    """Metrics from precomputed embeddings: ``top1``, ``top5`` (k = min(5, C)), ``n``, ``per_class_top1``.

    ``per_class_top1`` maps each class name present in ``labels`` to its top-1 accuracy (absent classes
    are left out rather than reported as 0).

    Example:
        >>> img = torch.eye(2); cls = torch.eye(2)
        >>> classify_embeddings(img, cls, torch.tensor([0, 1]), ["a", "b"])["top1"]
        1.0
    """
    n_classes = class_emb.shape[0]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise LowbitError(
            f"zero-shot labels must index the class names; received labels in "
            f"[{int(labels.min())}, {int(labels.max())}]; accepted: 0..{n_classes - 1}"
        )
    image_emb = F.normalize(image_emb.float(), dim=-1)
    class_emb = F.normalize(class_emb.float(), dim=-1)
    raw = image_emb @ class_emb.T  # [N, C] cosine
    scores = pessimistic_scores(raw, F.one_hot(labels, n_classes).bool())
    true = scores.gather(1, labels[:, None])
    # Pessimistic rank: how many *other* classes score at least as high as the true class; a non-finite true
    # score is a miss even with one class.
    rank = torch.where(torch.isfinite(true[:, 0]), (scores >= true).sum(dim=1) - 1, n_classes)
    k = min(5, n_classes)
    hit1 = (rank < 1).float()
    metrics: dict[str, object] = {
        # Exact Python division, not a float32 mean: JSON shows 0.315, not 0.3149999976158142.
        "top1": int(hit1.sum()) / max(len(labels), 1),
        "top5": int((rank < k).sum()) / max(len(labels), 1),
        "top5_k": k,
        "n": int(len(labels)),
        "n_classes": n_classes,
        "per_class_top1": {
            classnames[c]: int(hit1[labels == c].sum()) / int((labels == c).sum())
            for c in range(n_classes)
            if (labels == c).any()
        },
    }
    outputs = Outputs(image_emb, class_emb, finite_argmax(raw), kind="zeroshot")
    return Result(metrics, outputs)


def zeroshot_classify(
    model: DualEncoder, data: ImageTextSet, batch_size: int = 64, progress: bool = True
) -> Result:
    """Zero-shot top-1/top-5 accuracy of ``model`` on a labelled ``data`` set, with prompt ensembling.

    Returns a ``Result`` (a JSON-ready dict: ``top1``, ``top5``, ``top5_k``, ``n``, ``n_classes``,
    ``per_class_top1``) whose ``.outputs`` holds predictions, image and class embeddings for ``fidelity``.

    Example:
        >>> r = zeroshot_classify(model, resolve_dataset("fashion-mnist", limit=100))  # doctest: +SKIP
        >>> r["top1"], r.outputs.predictions.shape  # doctest: +SKIP
        (0.71, torch.Size([100]))
    """
    if data.labels is None or not data.classnames:
        raise LowbitError(
            f"zero-shot classification needs labels and class names; received dataset {data.name!r} "
            "without them; accepted: a labelled dataset such as 'fashion-mnist'"
        )
    if len(data) == 0:
        raise LowbitError(f"dataset {data.name!r} has no images; received 0; accepted: >= 1 image")
    cls = class_embeddings(model, data.classnames, data.templates, progress=progress and "class prompts")
    img = model.embed_images(data.images, batch_size=batch_size, progress=progress and "images")
    labels = torch.as_tensor(data.labels, dtype=torch.long)
    return classify_embeddings(img.float(), cls, labels, data.classnames)
