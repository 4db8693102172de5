"""LoRA adapters on packed layers (lowbit.quant.lora): gradients reach only the adapters, the packed bytes never
change, the output is a float LoRA on the dequantized weight within the kernels' bound, the backward never holds
a whole float matrix, PEFT loads the saved adapters onto the float model, merge, and the one-line errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import LowbitError
from lowbit.kernels import fast
from lowbit.kernels.quant_linear import QuantConv2d1x1, QuantLinear, set_backend
from lowbit.quant import lora as L


class Toy(nn.Module):
    """A linear path and a 1x1 conv path, as in lit-fashion's towers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 96, 1), nn.ReLU(),
                                  nn.Conv2d(96, 64, 1))
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 32))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.conv(img).mean((2, 3)))


def packed_toy() -> tuple[Toy, Toy]:
    float_model = Toy().eval()
    model = copy.deepcopy(float_model)
    lowbit.quantize_(model, "*/conv.0=w8,*=w4g32", progress=False)
    return float_model, model


def inputs(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def packed_bytes(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


def train_steps(model: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    opt = torch.optim.AdamW(L.lora_parameters(model), lr=1e-2)
    for _ in range(steps):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def test_targets_parse_and_errors() -> None:
    assert L.parse_targets("vision@conv1x1, text/*attn*@linear+conv1x1") == (
        L.Target("vision", "*", ("conv1x1",)), L.Target("text", "*attn*", ("linear", "conv1x1")))
    for bad in ("vision=w4", "vision@conv", "", "/x", "a/"):
        with pytest.raises(LowbitError, match="LoRA target"):
            L.parse_targets(bad)
    _, model = packed_toy()
    with pytest.raises(LowbitError) as err:
        L.attach_lora(model, L.LoraConfig(r=4, targets="model/nothing*"))
    assert "\n" not in str(err.value) and "matches no linear or 1x1 conv" in str(err.value)
    assert "model/conv.2 (conv1x1)" in str(err.value)
    with pytest.raises(LowbitError) as err:
        L.attach_lora(model, L.LoraConfig(r=40, targets="model/mlp.4"))  # [32, 64]
    assert "\n" not in str(err.value) and "rank 40 exceeds layer model/mlp.4 ([32, 64])" in str(err.value)
    assert not L.lora_layers(model)  # nothing attached after an error
    with pytest.raises(LowbitError, match="LoRA rank"):
        L.LoraConfig(r=0).validate()


def test_grads_reach_only_adapters_and_packed_bytes_unchanged() -> None:
    _, model = packed_toy()
    before = packed_bytes(model)
    report = L.attach_lora(model, L.LoraConfig(r=4, alpha=8, targets="model/conv.*@conv1x1,model/mlp.2"))
    assert sorted(report.layers) == ["conv.2", "conv.4", "mlp.2"]
    assert isinstance(model.conv[2], L.LoraLayer) and isinstance(model.conv[2].base_layer, QuantConv2d1x1)
    assert report.trainable_params == 4 * (64 + 96) + 4 * (96 + 64) + 4 * (128 + 64)
    model.train()
    train_steps(model, inputs())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(L.lora_state(model))
    assert all(p.grad is None for p in model.parameters())  # zeroed; frozen ones never had one
    model(inputs()).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    assert all(float(model.get_submodule(n.rsplit(".", 1)[0]).weight.grad.abs().sum()) > 0 for n in with_grad)
    after = packed_bytes(model)
    renamed = {k.replace(".base_layer", ""): v for k, v in after.items()}
    assert renamed.keys() == before.keys() and all(torch.equal(renamed[k], before[k]) for k in before)
    assert float(model.conv[2].lora_B.weight.abs().sum()) > 0  # it did train


def test_output_is_float_lora_on_dequantized_weight_within_kernel_bound() -> None:
    _, model = packed_toy()
    L.attach_lora(model, L.LoraConfig(r=4, alpha=8, targets="model/mlp.*"))
    train_steps(model, inputs())
    layer = model.mlp[2]
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(3))
    base: QuantLinear = layer.base_layer
    with torch.no_grad():
        got = layer(x)
        w = base.dequantized_weight()
        want = x @ w.T + base.bias + layer.scaling * (x @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
    bound = fast.error_bound(x, w, 128).float() if fast.unavailable_reason() is None else torch.zeros(())
    assert float((got - want).abs().max()) <= float((bound + 1e-4 * want.abs().max()).max())
    # and with gradients on: the same forward, the backward equal to autograd on the float weight
    x.requires_grad_(True)
    y = layer(x)
    (gy := torch.randn_like(y))
    y.backward(gy)
    assert torch.allclose(x.grad, gy @ (w + layer.delta_weight()), atol=1e-4)


def test_backward_dequantizes_in_row_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """grad_x through a frozen packed layer: no dequantized block holds more than the limit, the float matrix
    is never cached on the layer, and the result is the float one."""
    _, model = packed_toy()
    layer: QuantLinear = model.mlp[0]  # [128, 64]
    seen: list[tuple[int, int]] = []
    real = L.packed_rows

    def spy(packed, a, b):  # noqa: ANN001, ANN202
        seen.append((b - a, packed.in_features))
        return real(packed, a, b)

    monkeypatch.setattr(L, "packed_rows", spy)
    monkeypatch.setattr(L, "GRAD_BLOCK_ELEMENTS", 64 * 20)
    g = torch.randn(7, 128)
    got = L.blocked_grad_input(layer.packed, g, limit=L.GRAD_BLOCK_ELEMENTS)
    assert max(r * k for r, k in seen) <= 64 * 20 and sum(r for r, _ in seen) == 128
    assert torch.allclose(got, g @ layer.packed.dequantize(), atol=1e-5)
    # through the model: no layer ends up with its cached float weight (the reference path's cache)
    L.attach_lora(model, L.LoraConfig(r=2, targets="model/mlp.4"))
    x = inputs().requires_grad_(True)
    model(x).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert not any("w" in m._lowbit_cache for m in model.modules() if isinstance(m, QuantLinear))


def test_packed_rows_of_storage_variants() -> None:
    """Row blocks of every storage variant dequantize to the rows of the whole (PB-LLM's CSR side included)."""
    from lowbit.kernels.storage import storage_formats

    gen = torch.Generator().manual_seed(4)
    for fmt in storage_formats():
        packed = fmt.sample(8, 64, fmt.group or 32, gen)
        whole = packed.dequantize()
        parts = torch.cat([L.packed_rows(packed, a, min(a + 3, 8)).dequantize() for a in range(0, 8, 3)])
        assert torch.equal(parts, whole), fmt.name


def test_peft_loads_saved_adapters_on_the_float_model(tmp_path) -> None:  # noqa: ANN001
    peft = pytest.importorskip("peft")
    float_model, model = packed_toy()
    config = L.LoraConfig(r=4, alpha=8, targets="model/conv.2,model/mlp.*")
    L.attach_lora(model, config)
    train_steps(model, inputs())
    L.save_adapters(model, tmp_path / "ad", config, base_model="toy")
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(float_model), str(tmp_path / "ad")).eval()
    # lowbit's dequantized path: the packed model on the exact reference backend, its adapters as trained
    model.eval()
    set_backend(model, "reference")
    x = inputs(4, seed=7)
    with torch.no_grad():
        ours, theirs = model(x), peft_model(x)
        # the float model with the same adapters differs from ours only by the quantization of the base weights:
        # compare against PEFT on the float model whose weights are our dequantized ones
        deq = copy.deepcopy(float_model)
        for name, m in deq.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                base = model.get_submodule(name)
                base = base.base_layer if isinstance(base, L.LoraLayer) else base
                m.weight.copy_(base.effective_weight().reshape(m.weight.shape))
        peft_deq = peft.PeftModel.from_pretrained(deq, str(tmp_path / "ad")).eval()
        assert torch.allclose(ours, peft_deq(x), atol=1e-5)
    assert float((ours - theirs).abs().max()) > 0  # a real quantization gap remains vs the float model
    # and lowbit reads its own files back onto a fresh packed model
    _, again = packed_toy()
    L.load_adapters(again, tmp_path / "ad")
    set_backend(again, "reference")
    with torch.no_grad():
        assert torch.equal(again.eval()(x), ours)


def test_merge_and_detach() -> None:
    _, model = packed_toy()
    L.attach_lora(model, L.LoraConfig(r=4, alpha=64, targets="model/mlp.*"))
    train_steps(model, inputs(), steps=5)
    set_backend(model, "reference")
    x = inputs(4, seed=9)
    with torch.no_grad():
        with_adapters = model.eval()(x)
    report = L.merge_lora(model)
    assert not L.lora_layers(model) and isinstance(model.mlp[0], QuantLinear)
    assert 0 <= report["rel_rms"] < 0.2 and report["delta_rel_rms"] > 0
    with torch.no_grad():
        merged = model(x)
    assert float((merged - with_adapters).abs().max()) < float(with_adapters.abs().max())
    assert all(QuantLinear._matmul is type(m)._matmul and "_matmul" not in m.__dict__
               for m in model.modules() if isinstance(m, QuantLinear))
