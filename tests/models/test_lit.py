"""The built-in ``lit-fashion`` model on real pretrained towers: accuracy bars and a subset rebuild."""

from __future__ import annotations

import pytest
import torch

from lowbit.eval import evaluate
from lowbit.models.lit import LitDualEncoder, packaged_heads_path

# Chance on the shapes test set is 1/1000 for R@1. The shipped model measures i2t 0.848 / t2i 0.804; the bar is
# 500x chance. A subset rebuild (500 shapes images, 300 steps) must reach 50x chance.
SHAPES_R1_BAR = 0.5
SUBSET_SHAPES_R1_BAR = 0.05


def test_packaged_heads_carry_their_build_log():
    from lowbit.models.lit import _read_meta

    meta = _read_meta(packaged_heads_path())
    assert meta["training"]["seed"] == 0
    assert meta["n_train"] == 60000
    assert meta["fashion_test_top1"] >= 0.87


@pytest.mark.slow
def test_towers_and_embedding_shapes(lit_model):
    towers = lit_model.towers()
    assert set(towers) == {"vision", "text", "projector"}
    assert sum(p.numel() for p in towers["vision"].parameters()) > 3_000_000  # EfficientNet-Lite0 trunk
    emb = lit_model.embed_texts(["a photo of a bag.", "a photo of a sneaker."])
    assert emb.shape == (2, 256)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))


@pytest.mark.slow
def test_fashion_mnist_full_test_set_top1(lit_model):
    result = evaluate(lit_model, "fashion-mnist", footprint=False, progress=False)
    assert result["data"]["n"] == 10000
    assert result["metrics"]["top1"] >= 0.87, result["metrics"]
    assert result["metrics"]["top5"] >= 0.99


@pytest.mark.slow
def test_shapes_retrieval_above_chance(lit_model):
    result = evaluate(lit_model, "shapes", footprint=False, progress=False)
    assert result["data"]["n"] == 1000
    assert result["metrics"]["i2t_r1"] >= SHAPES_R1_BAR, result["metrics"]
    assert result["metrics"]["t2i_r1"] >= SHAPES_R1_BAR, result["metrics"]


@pytest.mark.slow
def test_rebuild_heads_on_a_subset_is_deterministic_and_learns(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from lowbit.workflows.build_lit import HeadTraining, build_lit_heads

    monkeypatch.setenv("LOWBIT_HOME", str(tmp_path / "home"))
    hp = HeadTraining(steps=300, batch_size=256)
    kwargs = dict(n_train=2000, n_test=1000, n_shapes=500, hp=hp, progress=False)
    log = build_lit_heads(tmp_path / "a.safetensors", **kwargs)
    build_lit_heads(tmp_path / "b.safetensors", **kwargs)  # second run reads the feature cache
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert log["fashion_test_top1"] >= 0.70, log
    assert log["shapes_test_i2t_r1"] >= SUBSET_SHAPES_R1_BAR, log
    assert isinstance(LitDualEncoder, type)
