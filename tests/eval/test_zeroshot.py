"""Zero-shot classification: hand-computed accuracies, prompt ensembling, oracle and error paths."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lowbit.data.base import ImageTextSet
from lowbit.errors import LowbitError
from lowbit.eval.zeroshot import class_embeddings, classify_embeddings, zeroshot_classify


def _e(i: int, dim: int = 6) -> list[float]:
    return torch.eye(dim)[i].tolist()


def test_hand_computed_top1_top5(lookup, id_set) -> None:
    classes = [f"c{i}" for i in range(6)]
    data = id_set([0, 1, 3, 5], classes)
    images = [
        _e(0),  # class 0 first: hit
        _e(1),  # class 1 first: hit
        [0, 0, 1, 0.5, 0, 0],  # true class 3 second: top-1 miss, top-5 hit
        [1, 1, 1, 1, 1, 0],  # true class 5 scores 0, five classes above: top-5 miss (k = 5)
    ]
    model = lookup(images, {f"a photo of a c{i}.": _e(i) for i in range(6)})
    r = zeroshot_classify(model, data, progress=False)
    assert r["top1"] == 0.5
    assert r["top5"] == 0.75
    assert r["top5_k"] == 5 and r["n"] == 4 and r["n_classes"] == 6
    # classes 2 and 4 have no images, so they are absent rather than 0.
    assert r["per_class_top1"] == {"c0": 1.0, "c1": 1.0, "c3": 0.0, "c5": 0.0}
    assert r.outputs.predictions.tolist() == [0, 1, 2, 0]
    assert r.outputs.image_embeddings.shape == (4, 6)
    assert r.outputs.text_embeddings.shape == (6, 6)


def test_top5_uses_k_min_5_and_classes() -> None:
    # 3 classes: "top5" is top-3, so every image is a hit.
    r = classify_embeddings(torch.tensor([[0.0, 1, 0], [1, 0, 0]]), torch.eye(3), torch.tensor([2, 2]), "abc")
    assert r["top5_k"] == 3 and r["top5"] == 1.0 and r["top1"] == 0.0


def test_template_ensembling_averages_normalised_prompts(lookup) -> None:
    texts = {
        "a photo of a cat.": [1, 0, 0],
        "a sketch of a cat.": [0, 3, 0],  # longer vector: normalised before averaging, so weight stays equal
        "a photo of a dog.": [0, 0, 1],
        "a sketch of a dog.": [0, 0, 2],
    }
    model = lookup([[1, 0, 0]], texts)
    emb = class_embeddings(model, ["cat", "dog"], ["a photo of a {}.", "a sketch of a {}."])
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(emb, torch.tensor([[s, s, 0], [0, 0, 1.0]]))


def test_oracle_is_perfect(oracle, id_set) -> None:
    data = id_set([0, 1, 2, 1, 0, 2, 2], ["cat", "dog", "bird"], ["a photo of a {}.", "art of a {}"])
    r = zeroshot_classify(oracle(data), data, batch_size=3, progress=False)
    assert r["top1"] == 1.0 and r["top5"] == 1.0 and r["n"] == 7
    assert r["per_class_top1"] == {"cat": 1.0, "dog": 1.0, "bird": 1.0}


def test_ties_count_against_the_image(lookup, id_set) -> None:
    data = id_set([0, 1], ["a", "b"])
    collapsed = lookup([[1, 0], [1, 0]], {"a photo of a a.": [1, 0], "a photo of a b.": [1, 0]})
    r = zeroshot_classify(collapsed, data, progress=False)
    assert r["top1"] == 0.0  # not 0.5 from a lucky argmax
    assert r["top5"] == 1.0  # k = 2: one tied rival is fewer than 2


def test_result_is_json_without_tensors(oracle, id_set) -> None:
    data = id_set([0, 1], ["a", "b"])
    r = zeroshot_classify(oracle(data), data, progress=False)
    decoded = json.loads(json.dumps(r))
    assert set(decoded) == {"top1", "top5", "top5_k", "n", "n_classes", "per_class_top1"}


def test_fake_model_runs_on_pil_images(fake_model, toy_set) -> None:
    r = zeroshot_classify(fake_model, toy_set(10), batch_size=4, progress=False)
    assert 0.0 <= r["top1"] <= r["top5"] <= 1.0
    assert r["top5_k"] == 4 and r["n"] == 10


def test_errors(fake_model, toy_set) -> None:
    with pytest.raises(LowbitError, match="needs labels"):
        zeroshot_classify(fake_model, toy_set(4, labelled=False), progress=False)
    bad = toy_set(4)
    bad.templates = ["no placeholder"]
    with pytest.raises(LowbitError, match="'\\{\\}'"):
        zeroshot_classify(fake_model, bad, progress=False)
    with pytest.raises(LowbitError, match="accepted: 0..1"):
        classify_embeddings(torch.eye(2), torch.eye(2), torch.tensor([0, 2]), ["a", "b"])
    empty = ImageTextSet(name="empty", images=[], labels=[], classnames=["a"])
    with pytest.raises(LowbitError, match="no images"):
        zeroshot_classify(fake_model, empty, progress=False)
