"""QuantLinear / QuantConv2d1x1 / QuantWeightParam against the reference oracle; caching; backends."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels.quant_linear import (
    LINEAR_BACKENDS,
    QuantConv2d1x1,
    QuantLinear,
    QuantWeightParam,
    set_backend,
)
from lowbit.kernels.reference import reference_linear
from lowbit.quant.primitives import QuantSpec, to_packed

GEN = torch.Generator().manual_seed(0)


def _layer(asym: bool = False, input_scale: bool = False) -> tuple[QuantLinear, torch.Tensor | None]:
    w = torch.randn(12, 40, generator=GEN)
    s = torch.rand(40, generator=GEN) + 0.5 if input_scale else None
    packed = to_packed(w if s is None else w * s, QuantSpec(4, 16, not asym))
    layer = QuantLinear.from_packed(packed, torch.randn(12, generator=GEN), s)
    layer.backend = "reference"  # these tests compare with float matmuls exactly (the kernels round activations)
    return layer, s


@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("input_scale", [False, True])
def test_quant_linear_matches_reference_oracle(asym: bool, input_scale: bool) -> None:
    layer, s = _layer(asym, input_scale)
    assert (layer.zeros is None) != asym and sorted(layer.state_dict()) == sorted(
        ["qweight", "scales", "bias"] + (["zeros"] if asym else []) + (["input_scale"] if input_scale else []))
    x = torch.randn(3, 5, 40, generator=GEN)
    assert torch.equal(layer(x), reference_linear(x, layer.packed, layer.bias, s))
    torch.testing.assert_close(layer(x), reference_linear(x, layer.packed, layer.bias, s, dtype=torch.float64))
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))  # .weight folds input_scale


def test_conv1x1_is_a_channel_linear() -> None:
    w = torch.randn(6, 8, 1, 1, generator=GEN)
    conv = QuantConv2d1x1.from_packed(to_packed(w, QuantSpec(8)), torch.randn(6, generator=GEN))
    conv.backend = "reference"  # exact float comparison (the default kernels round activations to int8)
    x = torch.randn(2, 8, 3, 5, generator=GEN)
    assert conv.weight.shape == (6, 8, 1, 1)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias))
    with pytest.raises(LowbitError, match=r"expects input \[B, C, H, W\]"):
        conv(torch.randn(2, 8))


def test_cache_follows_buffers_and_dtype_moves_keep_the_format() -> None:
    layer, _ = _layer()
    x = torch.randn(2, 40, generator=GEN)
    w1 = layer.dequantized_weight()
    assert layer.dequantized_weight() is w1  # cached
    y = layer(x)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["scales"] = state["scales"] * 2
    layer.load_state_dict(state)
    torch.testing.assert_close(layer(x) - layer.bias, 2 * (y - layer.bias))
    with torch.inference_mode():
        layer(x)
    layer(x)  # a weight cached under inference mode is still usable outside it
    layer.double()
    assert layer.scales.dtype == torch.float16 and layer.bias.dtype == torch.float64
    layer.to(torch.bfloat16)
    assert layer.scales.dtype == torch.float16
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_weight_param_keeps_module_and_survives_state_dict() -> None:
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    w = conv.weight.detach().clone()
    QuantWeightParam.attach(conv, to_packed(w, QuantSpec(8)))
    assert isinstance(conv, nn.Conv2d) and type(conv).__name__ == "QuantConv2d"
    assert "weight" not in dict(conv.named_parameters())
    x = torch.randn(1, 4, 5, 5, generator=GEN)
    fresh = QuantWeightParam.attach_empty(nn.Conv2d(4, 4, 3, padding=1, groups=4), 8, 9)
    fresh.load_state_dict(conv.state_dict())
    assert torch.equal(fresh(x), conv(x))
    torch.testing.assert_close(conv(x), F.conv2d(x, w, conv.bias, padding=1, groups=4), atol=0.02, rtol=0.02)
    with pytest.raises(LowbitError, match="already quantized"):
        QuantWeightParam.attach_empty(conv, 8, 9)


def test_backend_registry_dispatch() -> None:
    name = "test-double-output"
    if name not in LINEAR_BACKENDS:
        LINEAR_BACKENDS.register(name)(lambda layer, x: 2 * LINEAR_BACKENDS.get("reference")(layer, x))
    layer, _ = _layer()
    x = torch.randn(2, 40, generator=GEN)
    y = layer(x)
    set_backend(nn.Sequential(layer), name)
    assert torch.equal(layer(x), 2 * y)
    with pytest.raises(LowbitError, match="unknown linear backend 'nope'"):
        set_backend(layer, "nope")
