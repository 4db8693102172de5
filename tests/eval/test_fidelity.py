"""Fidelity: a model against itself is perfect; hand-built disagreements give hand-computed numbers."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.eval.fidelity import accuracy_kept, compare_models, fidelity
from lowbit.eval.results import Outputs
from lowbit.eval.retrieval import retrieve
from lowbit.eval.zeroshot import zeroshot_classify

E = torch.eye(3)


def test_self_comparison_is_perfect(fake_model, toy_set) -> None:
    data = toy_set(8)
    a = zeroshot_classify(fake_model, data, progress=False)
    b = zeroshot_classify(fake_model, data, progress=False)
    f = fidelity(a, b)
    assert f["agreement"] == 1.0 and f["n"] == 8 and f["basis"] == "zeroshot"
    assert f["image_cosine"] == pytest.approx(1.0) and f["text_cosine"] == pytest.approx(1.0)
    r = fidelity(retrieve(fake_model, data, progress=False), retrieve(fake_model, data, progress=False))
    assert r["agreement"] == 1.0 and r["basis"] == "retrieval"


def test_hand_computed_agreement_and_cosine() -> None:
    ref_img, cand_img = torch.stack([E[0], E[0], E[1], E[2]]), torch.stack([E[0], E[1], E[1], E[2]])
    ref = Outputs(ref_img, torch.stack([E[0], E[1]]), torch.tensor([0, 0, 1, 1]), "zeroshot")
    cand = Outputs(cand_img, torch.stack([E[0], E[2]]), torch.tensor([0, 1, 1, 1]), "zeroshot")
    f = fidelity(ref, cand)
    assert f["agreement"] == 0.75  # one of four predictions changed
    assert f["image_cosine"] == pytest.approx(0.75)  # cosines 1, 0, 1, 1
    assert f["text_cosine"] == pytest.approx(0.5)  # cosines 1, 0


def test_different_dims_only_agreement() -> None:
    ref = Outputs(torch.eye(2), torch.eye(2), torch.tensor([0, 1]), "zeroshot")
    cand = Outputs(torch.eye(3)[:2], torch.eye(3)[:2], torch.tensor([0, 0]), "zeroshot")
    f = fidelity(ref, cand)
    assert f["agreement"] == 0.5 and f["image_cosine"] is None and f["text_cosine"] is None


def test_mismatches_raise() -> None:
    a = Outputs(torch.eye(2), torch.eye(2), torch.tensor([0, 1]), "zeroshot")
    with pytest.raises(LowbitError, match="one kind"):
        fidelity(a, Outputs(torch.eye(2), torch.eye(2), torch.tensor([0, 1]), "retrieval"))
    with pytest.raises(LowbitError, match="same samples"):
        fidelity(a, Outputs(torch.eye(3), torch.eye(2), torch.tensor([0, 1, 1]), "zeroshot"))
    with pytest.raises(LowbitError, match="needs model outputs"):
        fidelity({"top1": 1.0}, a)


def test_accuracy_kept() -> None:
    assert accuracy_kept({"top1": 0.8}, {"top1": 0.6})["accuracy_kept"] == 0.75
    kept = accuracy_kept({"i2t_r1": 0.5, "t2i_r1": 0.7}, {"i2t_r1": 0.3, "t2i_r1": 0.3})
    assert kept["metric"] == "mean_r1" and kept["accuracy_kept"] == 0.5
    assert accuracy_kept({"top1": 0.0}, {"top1": 0.1})["accuracy_kept"] is None


def test_compare_models(fake_model, toy_set, oracle, id_set) -> None:
    f = compare_models(fake_model, fake_model, toy_set(8))
    assert f["basis"] == "zeroshot" and f["agreement"] == 1.0 and f["accuracy_kept"] in (1.0, None)
    f = compare_models(fake_model, fake_model, toy_set(8, labelled=False))
    assert f["basis"] == "retrieval" and f["agreement"] == 1.0
    data = id_set([0, 1, 0, 1], ["a", "b"])
    f = compare_models(oracle(data), oracle(data), data)
    assert f["reference_accuracy"] == 1.0 and f["candidate_accuracy"] == 1.0 and f["accuracy_kept"] == 1.0
    assert f["image_cosine"] == pytest.approx(1.0)
