"""Packed spatial convs on im2col + the int8 GEMM (lowbit.kernels.conv_gemm) against their own forward.

The own forward is F.conv2d on the dequantized weight; the GEMM rounds each im2col row (C * KH * KW inputs) to
int8, so the two agree within ``fast.error_bound`` of those rows (plus float32 rounding), on every ISA: an
EfficientNet stem (TF-"same" 3x3 stride 2 over 3 channels, asymmetric padding; at its 340 rows the small
weight takes the kernels' float path, ``fast.DENSE_MIN_ROWS``), a plain padded conv, a non-square kernel and
stride; the fused clamp; only eligible convs are swapped.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding
from torch import nn

import lowbit.models  # noqa: F401  (the lit spec registers EfficientNet's same-padding convs)
from lowbit.kernels import fast
from lowbit.kernels.conv_gemm import ConvGemmKernel, conv_gemm_kernels_
from lowbit.kernels.depthwise import conv_padding
from lowbit.kernels.quant_linear import QuantWeightParam
from lowbit.quant.primitives import QuantSpec, to_packed

GEN = torch.Generator().manual_seed(0)


def _packed(conv: nn.Conv2d) -> nn.Conv2d:
    QuantWeightParam.attach(conv, to_packed(conv.weight.detach(), QuantSpec(8)))
    return conv


def _bound(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """fast.error_bound of the im2col rows, as [B, N, OH, OW] (one activation block per 32 inputs)."""
    pt, pb, pl, pr = conv_padding(conv, x.shape[2], x.shape[3])  # type: ignore[misc]
    cols = F.unfold(F.pad(x, (pl, pr, pt, pb)), conv.kernel_size, stride=conv.stride)  # [B, K, L]
    b, k, n_pix = cols.shape
    w = conv.weight.detach().reshape(conv.out_channels, -1)
    bound = fast.error_bound(cols.transpose(1, 2).reshape(-1, k), w, 32)  # [B * L, N]
    return bound.view(b, n_pix, -1).permute(0, 2, 1).float()  # [B, N, L]


@pytest.mark.parametrize("kind", ["stem", "plain", "odd"])
def test_gemm_conv_within_the_kernel_bound(isa: str, kind: str) -> None:
    if kind == "stem":
        conv: nn.Conv2d = Conv2dDynamicSamePadding(3, 32, 3, stride=2, bias=False)
        x = torch.randn(1, 3, 33, 40, generator=GEN)  # odd size: the extra padding on the bottom / right
    elif kind == "plain":
        conv = nn.Conv2d(5, 12, 3, padding=1)
        x = torch.randn(2, 5, 9, 7, generator=GEN)
    else:
        conv = nn.Conv2d(4, 9, (2, 5), stride=(1, 3), padding=(1, 2))
        x = torch.randn(1, 4, 6, 11, generator=GEN)
    _packed(conv)
    with torch.no_grad():
        ref = conv(x)
        assert conv_gemm_kernels_(conv) == 1 and conv_gemm_kernels_(conv) == 0  # idempotent
        assert isinstance(conv, ConvGemmKernel) and isinstance(conv, QuantWeightParam)
        y = conv(x)
        assert y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
        slack = 1e-5 * ref.abs().max().item()
        err = (y - ref).abs().reshape(ref.shape[0], ref.shape[1], -1)
        assert bool((err <= _bound(conv, x) + slack).all())
        rows = ref.shape[0] * ref.shape[2] * ref.shape[3]
        if conv._prepared().call.dense_at(rows):  # a small weight at many rows: the float path, exact to rounding
            assert bool((err <= slack).all())
        else:
            assert err.max() > 0  # the int8 GEMM, not the float conv
        conv.output_clamp = (0.0, 0.5)  # a fused activation: clamped in the write-out
        clamped = conv(x)
        assert clamped.max() <= 0.5 and clamped.min() >= 0.0
        assert torch.allclose(clamped, y.clamp(0.0, 0.5))
    # Autograd recording runs the class's own forward.
    xg = x.clone().requires_grad_(True)
    conv.output_clamp = None
    conv(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_only_packed_spatial_convs_are_swapped() -> None:
    model = nn.ModuleList([
        _packed(nn.Conv2d(3, 8, 3, padding=1)),  # swapped
        nn.Conv2d(3, 8, 3, padding=1),  # float: its own forward
        _packed(nn.Conv2d(8, 8, 1)),  # 1x1: QuantConv2d1x1's business
        _packed(nn.Conv2d(8, 8, 3, padding=1, groups=8)),  # depthwise: lowbit.kernels.depthwise
        _packed(nn.Conv2d(3, 8, 3, padding=2, dilation=2)),
    ])
    assert conv_gemm_kernels_(model) == 1
    assert [isinstance(m, ConvGemmKernel) for m in model] == [True, False, False, False, False]
