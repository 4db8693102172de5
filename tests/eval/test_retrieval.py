"""Retrieval recalls: hand-computed values, duplicate-caption equivalence, chunking, errors."""

from __future__ import annotations

import pytest
import torch

from lowbit.data.base import ImageTextSet
from lowbit.errors import LowbitError
from lowbit.eval import retrieval
from lowbit.eval.retrieval import recall_at_k, retrieve, unique_captions

E = torch.eye(4)


def _hand_setup() -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([
        E[0],
        E[1] + 0.9 * E[3],  # still closest to c1, but beats image 3 for the query c3
        E[2],
        E[0] + 0.5 * E[3],  # own caption c3 ranks second behind c0
    ])
    return images, E.clone()


def test_hand_computed_recalls() -> None:
    images, captions = _hand_setup()
    r = recall_at_k(images, captions, torch.arange(4))
    assert r["i2t_r1"] == 0.75  # 3 of 4 images rank their caption first
    assert r["i2t_r5"] == 1.0 and r["i2t_r10"] == 1.0
    assert r["t2i_r1"] == 0.75  # query c3 retrieves image 1 first
    assert r["t2i_r5"] == 1.0 and r["t2i_r10"] == 1.0
    assert r["n"] == 4 and r["n_unique_captions"] == 4
    assert r.outputs.predictions.tolist() == [0, 1, 2, 0]


def test_ranking_ignores_scale() -> None:
    images, captions = _hand_setup()
    assert dict(recall_at_k(images * 7, captions * 0.1, torch.arange(4))) == dict(
        recall_at_k(images, captions, torch.arange(4))
    )


def test_identical_captions_are_equivalent_and_copies_take_ranks() -> None:
    # captions ["x", "x", "y"]; image 2 (caption "y") is closer to "x", whose two copies fill ranks 1 and 2.
    images = torch.tensor([[1.0, 0], [1.0, 0], [1.0, 0.5]])
    names, ids = unique_captions(["x", "x", "y"])
    assert names == ["x", "y"] and ids.tolist() == [0, 0, 1]
    r = recall_at_k(images, torch.eye(2), ids, ks=(1, 2, 3))
    assert r["i2t_r1"] == pytest.approx(2 / 3)
    assert r["i2t_r2"] == pytest.approx(2 / 3)
    assert r["i2t_r3"] == 1.0
    # Query "x" (asked twice) finds image 0 or 1, both captioned "x": a hit either way.
    assert r["t2i_r1"] == 1.0


def _brute_force(images: torch.Tensor, caption_emb: torch.Tensor, captions: list[str], k: int) -> tuple[float, float]:
    """The plain N x N definition, with the full gallery of one caption per image."""
    _, ids = unique_captions(captions)
    img = torch.nn.functional.normalize(images, dim=-1)
    gallery = torch.nn.functional.normalize(caption_emb, dim=-1)[ids]
    sim = img @ gallery.T
    n = len(captions)
    i2t = t2i = 0
    for i in range(n):
        same = torch.tensor([captions[j] == captions[i] for j in range(n)])
        i2t += int((sim[i][~same] >= sim[i][same].max()).sum() < k)
        t2i += int((sim[:, i][~same] >= sim[:, i][same].max()).sum() < k)
    return i2t / n, t2i / n


def test_matches_brute_force_and_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    captions = [f"c{int(i)}" for i in torch.randint(0, 9, (40,), generator=g)]
    names, ids = unique_captions(captions)
    cap = torch.randn(len(names), 8, generator=g)
    images = cap[ids] + 1.5 * torch.randn(40, 8, generator=g)
    full = recall_at_k(images, cap, ids)
    for k in (1, 5, 10):
        assert (full[f"i2t_r{k}"], full[f"t2i_r{k}"]) == pytest.approx(_brute_force(images, cap, captions, k))
    monkeypatch.setattr(retrieval, "_CHUNK_ELEMENTS", 7)  # 1 row per chunk
    assert dict(recall_at_k(images, cap, ids)) == dict(full)


def test_retrieve_with_models(lookup, make_id_images, fake_model, toy_set) -> None:
    images, captions = _hand_setup()
    data = ImageTextSet(name="hand", images=make_id_images(4), captions=["c0", "c1", "c2", "c3"])
    model = lookup(images.tolist(), {f"c{i}": captions[i].tolist() for i in range(4)})
    r = retrieve(model, data, batch_size=3, progress=False)
    assert (r["i2t_r1"], r["t2i_r1"], r["i2t_r5"]) == (0.75, 0.75, 1.0)

    r = retrieve(fake_model, toy_set(12), progress=False)
    assert r["n"] == 12 and r["n_unique_captions"] == 4
    assert all(0.0 <= r[k] <= 1.0 for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"))


def test_errors(fake_model, toy_set) -> None:
    with pytest.raises(LowbitError, match="needs captions"):
        retrieve(fake_model, toy_set(4, captioned=False), progress=False)
    bad = toy_set(4)
    bad.captions = bad.captions[:3]
    with pytest.raises(LowbitError, match="one caption per image"):
        retrieve(fake_model, bad, progress=False)
