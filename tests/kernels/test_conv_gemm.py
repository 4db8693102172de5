"""Spatial convs on im2col + one GEMM (lowbit.kernels.conv_gemm) against their own forward: packed ones on the
int8 GEMM, float ones on the dense float kernel.

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
from lowbit.kernels import fast, pointwise
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
        if conv._gemm().dense_at(rows):  # a small weight at many rows: the float path, exact to rounding
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


def test_only_dense_spatial_convs_are_swapped() -> None:
    model = nn.ModuleList([
        _packed(nn.Conv2d(3, 8, 3, padding=1)),  # swapped
        nn.Conv2d(3, 8, 3, padding=1),  # float: swapped (the dense float kernel)
        _packed(nn.Conv2d(8, 8, 1)),  # 1x1: QuantConv2d1x1's business
        nn.Conv2d(8, 8, 1),  # float 1x1: lowbit.kernels.pointwise
        _packed(nn.Conv2d(8, 8, 3, padding=1, groups=8)),  # depthwise: lowbit.kernels.depthwise
        _packed(nn.Conv2d(3, 8, 3, padding=2, dilation=2)),
        nn.Conv2d(3, 8, 3, padding=1).half(),  # the kernels compute in float32
    ])
    assert conv_gemm_kernels_(model) == 2
    assert [isinstance(m, ConvGemmKernel) for m in model] == [True, True, False, False, False, False, False]


@pytest.mark.parametrize("kind", ["stem", "plain", "odd"])
def test_float_gemm_conv_matches_conv2d(isa: str, kind: str) -> None:
    """A float conv on im2col + the dense float kernel: F.conv2d's result to float32 rounding, 1 and 2 threads,
    the fused clamp; past POINTWISE_MAX_MACS and under autograd, torch's conv."""
    if kind == "stem":
        conv: nn.Conv2d = Conv2dDynamicSamePadding(3, 32, 3, stride=2, bias=False)
        x = torch.randn(2, 3, 33, 40, generator=GEN)
    elif kind == "plain":
        conv = nn.Conv2d(5, 12, 3, padding=1)
        x = torch.randn(2, 5, 9, 7, generator=GEN).contiguous(memory_format=torch.channels_last)
    else:
        conv = nn.Conv2d(4, 9, (2, 5), stride=(1, 3), padding=(1, 2))
        x = torch.randn(1, 4, 6, 11, generator=GEN)
    conv.eval()
    before = torch.get_num_threads()
    try:
        with torch.no_grad():
            ref = conv(x)
            assert conv_gemm_kernels_(conv) == 1
            for threads in (1, 2):
                torch.set_num_threads(threads)
                y = conv(x)
                assert y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
                cols = F.unfold(F.pad(x, _pads(conv, x)), conv.kernel_size, stride=conv.stride)  # [B, K, L]
                w = conv.weight.reshape(conv.out_channels, -1)
                slack = 1e-5 * (w.abs() @ cols.abs()).view(ref.shape) + 1e-6  # float32 accumulation
                assert bool(((y - ref).abs() <= slack).all())
                conv.output_clamp = (-0.1, 0.4)
                assert bool(((conv(x) - ref.clamp(-0.1, 0.4)).abs() <= slack).all())
                conv.output_clamp = None
    finally:
        torch.set_num_threads(before)
    with torch.no_grad():
        assert not torch.equal(conv(x), ref)  # the kernel (other summation order), not torch's conv
    xg = x.clone().requires_grad_(True)
    assert torch.equal(conv(xg), ref)  # autograd recording: the class's own forward
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(pointwise, "POINTWISE_MAX_MACS", 0)
        assert torch.equal(conv(x), ref)  # a large call: torch's conv


def _pads(conv: nn.Conv2d, x: torch.Tensor) -> tuple[int, int, int, int]:
    pt, pb, pl, pr = conv_padding(conv, x.shape[2], x.shape[3])  # type: ignore[misc]
    return pl, pr, pt, pb


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "expanded"])
def test_im2col_is_unfold_of_the_padded_map(layout: str) -> None:
    """ext.im2col: F.unfold of the zero-padded map, rows in the weight's (c, i, j) order, exactly, whatever the
    input's strides (a grey image expanded to 3 channels is read in place)."""
    if not fast.is_available():
        pytest.skip(f"kernels unavailable: {fast.unavailable_reason()}")
    ext = fast.extension()
    geometries = [  # C, H, W, (kh, kw), (sh, sw), (top, bottom, left, right)
        (3, 96, 96, (3, 3), (2, 2), (0, 1, 0, 1)), (5, 9, 7, (3, 3), (1, 1), (1, 1, 1, 1)),
        (4, 6, 11, (2, 5), (1, 3), (1, 1, 2, 2)), (2, 3, 3, (5, 5), (1, 1), (2, 2, 2, 2)),
        (1, 4, 4, (3, 3), (3, 3), (0, 0, 0, 0)), (3, 5, 2, (3, 3), (2, 2), (1, 1, 3, 3)),  # wider padding than map
    ]
    for c, h, w, (kh, kw), (sh, sw), (pt, pb, pl, pr) in geometries:
        x = torch.randn(2, c, h, w, generator=GEN)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        elif layout == "expanded":
            x = x[:, :1].expand(2, c, h, w)
        oh, ow = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
        rows = ext.im2col(x, kh, kw, sh, sw, pt, pl, oh, ow)  # type: ignore[union-attr]
        ref = F.unfold(F.pad(x, (pl, pr, pt, pb)), (kh, kw), stride=(sh, sw))  # [B, K, L]
        assert torch.equal(rows, ref.transpose(1, 2).reshape(2, oh, ow, -1)), (c, h, w)
