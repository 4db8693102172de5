"""``lowbit.quantize_`` on any ``nn.Module`` (torchao style): one tower, rules by dotted path and kind, errors for
recipes that match nothing, and transformers models saved and loaded back without lowbit knowing them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import LowbitError
from lowbit.kernels.quant_linear import is_quantized


def toy_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()


class ToyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)) for _ in range(2))
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(self.norm(x))


def cosine_min(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min())


@torch.no_grad()
def test_toy_cnn_gptq_on_example_inputs() -> None:
    cnn, x = toy_cnn(), torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    ref = cnn(x)
    report = lowbit.quantize_(cnn, "*=w8:gptq", calibration=x, progress=False)
    assert [(m.tower, m.path, m.kind) for m in report.modules] == [
        ("model", "0", "conv"), ("model", "2", "conv1x1"), ("model", "6", "linear")]
    assert all(is_quantized(cnn[i]) for i in (0, 2, 6))
    assert report.calibration == {"source": "example inputs", "kind": "inputs", "samples": 1, "seed": 0}
    assert cosine_min(cnn(x), ref) > 0.999


@torch.no_grad()
def test_toy_mlp_rules_by_path_glob_and_kind() -> None:
    mlp, x = ToyMLP().eval(), torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    ref = mlp(x)
    # blocks at 4 bits with GPTQ (calibrated on a list of batches), the head at 8 bits, nothing else
    report = lowbit.quantize_(mlp, "*/blocks.*=w4g32:gptq,*/head=w8", calibration=[x[:32], x[32:]], progress=False)
    assert {m.path: m.bits for m in report.modules} == {
        "blocks.0.0": 4, "blocks.0.2": 4, "blocks.1.0": 4, "blocks.1.2": 4, "head": 8}
    assert {f.name for f in report.float_modules} == {"norm"}  # LayerNorm: listed as kept float
    assert "model/head" in report.markdown()
    assert cosine_min(mlp(x), ref) > 0.99


def test_recipe_matching_nothing_is_an_error_naming_real_paths() -> None:
    with pytest.raises(LowbitError, match=r"matches no layer .*rules: vision=w4:rtn.*model/blocks\.0\.0 \(linear\)"):
        lowbit.quantize_(ToyMLP(), "vision=w4", progress=False)
    with pytest.raises(LowbitError, match="matches no layer"):  # a kind the model lacks
        lowbit.quantize_(ToyMLP(), "*@conv=w8", progress=False)


def test_a_dataset_does_not_calibrate_a_bare_module() -> None:
    with pytest.raises(LowbitError, match="example inputs"):
        lowbit.quantize_(toy_cnn(), "*=w4:gptq", calibration="scenes", progress=False)


def tiny_llama():
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config).eval()


@torch.no_grad()
def test_transformers_model_saves_and_loads_without_lowbit_knowing_it(tmp_path) -> None:
    model, ids = tiny_llama(), torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(4))
    report = lowbit.quantize_(model, "*=w4g32:gptq", calibration=[{"input_ids": ids}], progress=False)
    assert len(report.modules) == 15  # 2 x (q, k, v, o, gate, up, down) + the (tied) lm_head
    logits = model(ids).logits
    lowbit.save(model, tmp_path / "q", report)
    loaded = lowbit.load(str(tmp_path / "q"))
    assert type(loaded) is type(model)
    assert loaded.lowbit_manifest["architecture"]["family"] == "transformers"
    assert torch.equal(loaded(ids).logits, logits)


def test_default_calibration_is_declared_by_the_family_never_fashion_mnist_by_default() -> None:
    from lowbit.models.base import DualEncoder
    from lowbit.workflows.quantize import default_calibration

    def loaded_by(family: str, name: str) -> DualEncoder:
        model = DualEncoder()
        model.source = {"family": family, "name": name}
        return model

    assert default_calibration(loaded_by("lit", "lit-fashion")) == "fashion-mnist"  # built on it: its own data
    assert default_calibration(loaded_by("vit", "clip-vit-tiny-fashion")) == "fashion-mnist"
    assert default_calibration(loaded_by("llava", "llava-fashion-hd")) == "fashion-mnist"
    assert default_calibration(loaded_by("llava", "/some/hf-llava")) == "scenes"  # any other model: generic
    assert default_calibration(loaded_by("clip", "/some/clip")) == "scenes"
    assert default_calibration(toy_cnn()) is None  # a bare module: example inputs or nothing


def test_a_bare_module_without_calibration_data_is_told_what_to_pass() -> None:
    with pytest.raises(LowbitError, match=r"method\(s\) gptq need calibration data .*accepted: calibration= example"):
        lowbit.quantize_(toy_cnn(), "*=w4:gptq", progress=False)
