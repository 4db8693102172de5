"""Image<->text retrieval Recall@1/5/10 with one caption per image.

Rules (documented because they change the numbers):

- **Identical captions are equivalent.** The gallery holds one caption per image, so captions repeat (e.g.
  "a red circle" for several images). Image->text: a retrieved caption whose *string* equals the image's
  own caption is a hit. Text->image: a retrieved image whose caption equals the query string is a hit.
  Every copy of a wrong caption still occupies a rank, exactly as in the full N x N ranking.
- **Cosine similarity.** The model's logits are ``scale * cos (+ bias)``, monotonic in cos, so rankings and
  recalls do not depend on the logit scale.
- **Ties count against the query**: an item is within the top k only if fewer than k wrong items score at
  least as high. A collapsed model therefore scores ~0, not a lucky sort order.

Each distinct caption is embedded once; identical strings have identical embeddings in a deterministic
model, so scoring against the unique captions and weighting by their copy counts equals the N x N
computation while using O(N x unique) memory in bounded chunks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

from lowbit.data.base import ImageTextSet
from lowbit.errors import LowbitError
from lowbit.eval.results import Outputs, Result, finite_argmax, pessimistic_scores
from lowbit.models.base import DualEncoder

KS = (1, 5, 10)
_CHUNK_ELEMENTS = 1 << 22  # ~16 MB of float32 similarities per chunk

_MISS = 2**62  # the rank of a query whose own score is not finite: beyond every k

def unique_captions(captions: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """Distinct captions in first-seen order, and each caption's index into them.

    Example:
        >>> unique_captions(["a", "b", "a"])
        (['a', 'b'], tensor([0, 1, 0]))
    """
    index: dict[str, int] = {}
    ids = [index.setdefault(c, len(index)) for c in captions]
    return list(index), torch.tensor(ids, dtype=torch.long)


def recall_at_k(
    image_emb: torch.Tensor, caption_emb: torch.Tensor, caption_ids: torch.Tensor, ks: Sequence[int] = KS
) -> Result:
    """Recalls from embeddings: ``image_emb`` [N, D], unique ``caption_emb`` [U, D], ``caption_ids`` [N].

    ``caption_ids[i]`` is the row of ``caption_emb`` holding image i's caption. Returns ``i2t_r{k}`` and
    ``t2i_r{k}`` for each k, plus ``n`` and ``n_unique_captions``; ``.outputs.predictions`` is each image's
    top-1 unique caption.

    Example:
        >>> recall_at_k(torch.eye(2), torch.eye(2), torch.tensor([0, 1]))["i2t_r1"]
        1.0
    """
    n, n_unique = image_emb.shape[0], caption_emb.shape[0]
    img = F.normalize(image_emb.float(), dim=-1)
    cap = F.normalize(caption_emb.float(), dim=-1)
    copies = torch.bincount(caption_ids, minlength=n_unique)  # gallery captions per distinct string
    rows = max(1, _CHUNK_ELEMENTS // max(n_unique, 1))
    i2t_rank = torch.empty(n, dtype=torch.long)
    predictions = torch.empty(n, dtype=torch.long)
    best = torch.full((n_unique,), -torch.inf)  # best score of a matching image, per distinct caption

    for s in range(0, n, rows):
        raw, ids = img[s : s + rows] @ cap.T, caption_ids[s : s + rows]  # [b, U]
        own = F.one_hot(ids, n_unique).bool()
        sim = pessimistic_scores(raw, own)  # a NaN/Inf score loses: a miss, never a hit
        true = sim.gather(1, ids[:, None])
        wrong_at_least = (sim >= true) & ~own
        i2t_rank[s : s + rows] = torch.where(torch.isfinite(true[:, 0]), (wrong_at_least.long() * copies).sum(dim=1),
                                             _MISS)
        predictions[s : s + rows] = finite_argmax(raw)
        best = torch.maximum(best, sim.masked_fill(~own, -torch.inf).amax(dim=0))

    # Text->image needs each query's best matching image first, hence a second pass over the same chunks.
    t2i_rank = torch.zeros(n_unique, dtype=torch.long)
    for s in range(0, n, rows):
        raw, ids = img[s : s + rows] @ cap.T, caption_ids[s : s + rows]
        own = F.one_hot(ids, n_unique).bool()
        t2i_rank += ((pessimistic_scores(raw, own) >= best) & ~own).sum(dim=0)
    t2i_rank[~torch.isfinite(best)] = _MISS  # no matching image scored a finite value: a miss at every k

    metrics: dict[str, object] = {}
    query_rank = t2i_rank[caption_ids]  # one text query per image, i.e. per gallery caption
    for k in ks:  # exact Python division: JSON shows 0.315, not 0.3149999976158142
        metrics[f"i2t_r{k}"] = int((i2t_rank < k).sum()) / max(n, 1)
    for k in ks:
        metrics[f"t2i_r{k}"] = int((query_rank < k).sum()) / max(n, 1)
    metrics.update(n=int(n), n_unique_captions=int(n_unique))
    return Result(metrics, Outputs(img, cap, predictions, kind="retrieval"))


def retrieve(model: DualEncoder, data: ImageTextSet, batch_size: int = 64, progress: bool = True) -> Result:
    """Image->text and text->image Recall@1/5/10 of ``model`` on a captioned ``data`` set.

    Returns a ``Result`` (JSON-ready: ``i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5, t2i_r10, n,
    n_unique_captions``) whose ``.outputs`` holds image and unique-caption embeddings for ``fidelity``.

    Example:
        >>> r = retrieve(model, resolve_dataset("shapes", limit=200))  # doctest: +SKIP
        >>> r["i2t_r1"], r["t2i_r1"]  # doctest: +SKIP
        (0.42, 0.39)
    """
    if data.captions is None:
        raise LowbitError(
            f"retrieval needs captions; received dataset {data.name!r} without captions; "
            "accepted: a captioned dataset such as 'shapes'"
        )
    if len(data.captions) != len(data.images) or not data.images:
        raise LowbitError(
            f"retrieval needs exactly one caption per image; received {len(data.images)} images and "
            f"{len(data.captions)} captions in {data.name!r}; accepted: equal, non-zero counts"
        )
    texts, ids = unique_captions(data.captions)
    cap = model.embed_texts(texts, progress=progress and "captions")
    img = model.embed_images(data.images, batch_size=batch_size, progress=progress and "images")
    return recall_at_k(img, cap, ids)
