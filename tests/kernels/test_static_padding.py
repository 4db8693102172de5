"""Static same-padding (lowbit.kernels.static_padding): stride-1 odd-kernel convs pad inside the conv, same output."""

from __future__ import annotations

import pytest
import torch
from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding
from torch import nn

import lowbit.models  # noqa: F401  (the lit spec registers EfficientNet's same-padding convs)
from lowbit.kernels.quant_linear import QuantWeightParam
from lowbit.kernels.static_padding import StaticSamePadding, static_same_padding_
from lowbit.quant.primitives import QuantSpec, to_packed

GEN = torch.Generator().manual_seed(0)


@pytest.mark.parametrize(("k", "dilation", "groups"), [(3, 1, 8), (5, 1, 8), (3, 2, 8), (5, 2, 1), (1, 1, 1)])
@pytest.mark.parametrize("packed", [False, True])
def test_static_padding_equals_dynamic_padding(k: int, dilation: int, groups: int, packed: bool) -> None:
    conv = Conv2dDynamicSamePadding(8, 8, k, stride=1, dilation=dilation, groups=groups, bias=True)
    if packed:
        QuantWeightParam.attach(conv, to_packed(conv.weight.detach(), QuantSpec(8)))
    x = torch.randn(2, 8, 11, 6, generator=GEN)
    with torch.no_grad():
        before = conv(x)
        keys = sorted(conv.state_dict())
        assert static_same_padding_(nn.Sequential(conv)) == 1
        assert isinstance(conv, StaticSamePadding) and isinstance(conv, Conv2dDynamicSamePadding)
        assert isinstance(conv, QuantWeightParam) == packed and sorted(conv.state_dict()) == keys
        torch.testing.assert_close(conv(x), before, rtol=1e-6, atol=1e-6)
        assert static_same_padding_(conv) == 0  # idempotent


def test_only_registered_stride1_convs_change_and_a_later_stride_falls_back() -> None:
    strided = Conv2dDynamicSamePadding(4, 4, 3, stride=2, groups=4)
    plain = nn.Conv2d(4, 4, 3, padding=1)  # not a registered same-padding class
    later = Conv2dDynamicSamePadding(4, 4, 3, stride=1, groups=4)
    assert static_same_padding_(nn.ModuleList([strided, plain, later])) == 1
    assert not isinstance(strided, StaticSamePadding) and not isinstance(plain, StaticSamePadding)
    x = torch.randn(1, 4, 9, 9, generator=GEN)
    later.stride = (2, 2)  # e.g. an architecture edit after the transform: the dynamic forward runs again
    reference = Conv2dDynamicSamePadding(4, 4, 3, stride=2, groups=4)
    reference.load_state_dict(later.state_dict())
    with torch.no_grad():
        assert torch.equal(later(x), reference(x)) and later(x).shape == (1, 4, 5, 5)
