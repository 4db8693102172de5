"""The packaged ViT default ``clip-vit-tiny-fashion``: a built-in name, standard files, accuracy as shipped."""

from __future__ import annotations

import json

import pytest
import torch

import lowbit.models.vit_default as vit
from lowbit.errors import LowbitError
from lowbit.models import FAMILIES, builtin_models, load_model

needs_asset = pytest.mark.skipif(not (vit.ASSET_DIR / "config.json").is_file(), reason="asset not built")


def test_registered_as_a_builtin_name():
    assert builtin_models()[vit.NAME] == "vit"
    with pytest.raises(LowbitError, match="unknown vit model"):
        FAMILIES.get("vit").load("clip-vit-huge")


@needs_asset
def test_asset_is_a_small_standard_fp16_checkpoint():
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    files = {p.name for p in vit.ASSET_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "BUILD.md",
            "train_log.jsonl", "metrics.json"} <= files
    weights = vit.ASSET_DIR / "model.safetensors"
    assert weights.stat().st_size < 8_000_000
    assert {t.dtype for t in load_file(str(weights)).values()} == {torch.float16}
    assert AutoModel.from_pretrained(vit.ASSET_DIR).dtype == torch.float32
    assert AutoTokenizer.from_pretrained(vit.ASSET_DIR)("a photo of a bag.")["input_ids"][-1] == 3


@needs_asset
def test_loads_by_name_in_float32_eval_mode():
    model = load_model(vit.NAME)
    assert model.source == {"family": "vit", "name": vit.NAME, "options": {}}
    assert not model.training and next(model.parameters()).dtype == torch.float32
    emb = model.embed_texts(["a photo of a sneaker.", "a photo of a bag."])
    assert emb.shape == (2, 128) and float((emb[0] * emb[1]).sum()) < 0.99


@needs_asset
def test_zero_shot_on_a_test_slice_agrees_with_the_shipped_metrics():
    from lowbit.eval import evaluate

    shipped = json.loads((vit.ASSET_DIR / "metrics.json").read_text())
    assert shipped["fashion_mnist_top1"] >= 0.85
    result = evaluate(load_model(vit.NAME), "fashion-mnist", limit=500, footprint=False, progress=False)
    assert result["metrics"]["top1"] >= 0.8  # 500-image slice: within sampling noise of the full-set number


@needs_asset
@pytest.mark.slow
def test_full_fashion_mnist_test_set_top1_at_least_085():
    from lowbit.eval import evaluate

    result = evaluate(load_model(vit.NAME), "fashion-mnist", footprint=False, progress=False)
    assert result["metrics"]["n"] == 10000 and result["metrics"]["top1"] >= 0.85
