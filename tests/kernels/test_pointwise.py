"""Float 1x1 convs on the dense kernel (``lowbit.kernels.pointwise``): parity with ``F.conv2d`` on every ISA, which
convs qualify, the weight cache, and the fallbacks to the class's own forward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.kernels import fast, pointwise
from lowbit.kernels.pointwise import PointwiseKernel, is_pointwise, pointwise_kernels_
from lowbit.kernels.quant_linear import QuantConv2d1x1
from lowbit.quant.primitives import QuantSpec, to_packed
from tests.kernels.conftest import needs_kernels
from tests.kernels.test_dense import float_slack

GEN = torch.Generator().manual_seed(0)


def _conv(c: int, n: int, bias: bool = True, **kw: object) -> nn.Conv2d:
    conv = nn.Conv2d(c, n, 1, bias=bias, **kw)  # type: ignore[arg-type]
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=GEN))
    return conv.eval()


def _map(b: int, c: int, h: int, w: int, channels_last: bool) -> torch.Tensor:
    x = torch.randn(b, c, h, w, generator=GEN)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# (C, N, H, W): one vector, vector tails, several blocks of vectors, one input channel, many rows
SHAPES = ((16, 16, 3, 3), (37, 24, 5, 7), (16, 96, 12, 12), (144, 24, 6, 6), (70, 130, 1, 1), (1, 8, 9, 2))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "C{}N{}H{}W{}".format(*s))
def test_matches_conv2d_to_float_rounding(isa: str, shape: tuple[int, int, int, int]) -> None:
    c, n, h, w = shape
    conv = _conv(c, n, bias=c % 2 == 0)
    ref_conv = _conv(c, n, bias=c % 2 == 0)
    ref_conv.load_state_dict(conv.state_dict())
    assert pointwise_kernels_(conv) == 1 and isinstance(conv, PointwiseKernel)
    weight = conv.weight.detach().flatten(1)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for b, channels_last in ((1, True), (3, False), (2, True)):
                x = _map(b, c, h, w, channels_last)
                with torch.no_grad():
                    y, ref = conv(x), ref_conv(x.double().float())
                rows = x.permute(0, 2, 3, 1).reshape(-1, c)
                slack = float_slack(rows, weight).view(b, h, w, n).permute(0, 3, 1, 2)
                assert y.shape == ref.shape and torch.all((y - ref).abs() <= slack), (threads, b)
                # the tower's layout is kept: channels-last in (not also contiguous: C = 1), channels-last out
                keep = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
                assert y.is_contiguous(memory_format=torch.channels_last if keep else torch.contiguous_format)
                conv.output_clamp = (-0.5, 1.0)  # a fused activation, clamped in the write-out
                with torch.no_grad():
                    clamped = conv(x)
                conv.output_clamp = None
                assert torch.all((clamped - ref.clamp(-0.5, 1.0)).abs() <= slack)
    finally:
        torch.set_num_threads(before)


def test_which_convs_qualify() -> None:
    needs_kernels()
    assert is_pointwise(_conv(8, 16)) and is_pointwise(_conv(8, 16, padding="same"))
    assert not is_pointwise(_conv(8, 16, stride=2))  # strided: fewer rows than pixels
    assert not is_pointwise(_conv(8, 16, padding=1))  # padded border pixels
    assert not is_pointwise(_conv(8, 16, groups=2))
    assert not is_pointwise(nn.Conv2d(8, 16, 3))
    assert not is_pointwise(_conv(8, 16).half())  # the kernel computes in float32
    packed = QuantConv2d1x1.from_packed(to_packed(_conv(32, 16).weight.detach(), QuantSpec(8)), None)
    assert not is_pointwise(packed)  # packed 1x1 convs run on the packed kernels
    model = nn.Sequential(_conv(8, 16), nn.ReLU(), _conv(16, 8, stride=2), nn.Conv2d(8, 8, 3))
    assert pointwise_kernels_(model) == 1 and pointwise_kernels_(model) == 0  # idempotent
    assert [type(m).__name__ for m in model] == ["PwConv2d", "ReLU", "Conv2d", "Conv2d"]
    assert set(model[0].state_dict()) == {"weight", "bias"}


def _on_kernel() -> tuple[nn.Conv2d, torch.Tensor]:
    """A 24 -> 40 float 1x1 conv put on the kernel, and a channels-last input for it."""
    needs_kernels()
    conv = _conv(24, 40)
    pointwise_kernels_(conv)
    return conv, _map(1, 24, 4, 4, True)


def test_weight_changes_are_seen() -> None:
    conv, x = _on_kernel()
    with torch.no_grad():
        conv(x)
        conv.weight.mul_(2)  # in place: a new version
        assert torch.allclose(conv(x), F.conv2d(x, conv.weight, conv.bias), atol=1e-4)
        conv.bias = nn.Parameter(torch.zeros(40))  # a new tensor
        assert torch.allclose(conv(x), F.conv2d(x, conv.weight), atol=1e-4)
        conv.load_state_dict(_conv(24, 40).state_dict())
        assert torch.allclose(conv(x), F.conv2d(x, conv.weight, conv.bias), atol=1e-4)


def test_a_copy_rebuilds_its_kernel_weight() -> None:
    """deepcopy leaves out the cached extension object (it cannot be copied); the copy builds its own."""
    conv, x = _on_kernel()
    with torch.no_grad():
        y = conv(x)
        twin = copy.deepcopy(conv)
        assert type(twin) is type(conv) and torch.equal(twin(x), y)
        twin.weight.mul_(2)  # its own tensors and cache
        assert torch.equal(conv(x), y) and not torch.equal(twin(x), y)


def test_falls_back_to_the_own_forward() -> None:
    needs_kernels()
    conv = _conv(16, 8)
    pointwise_kernels_(conv)
    x = _map(2, 16, 3, 3, True).requires_grad_()
    y = conv(x)  # autograd recording: torch's conv, gradients flow
    y.sum().backward()
    assert x.grad is not None and conv.weight.grad is not None
    with torch.no_grad():
        x64 = x.detach().double()
        assert conv.double()(x64).dtype == torch.float64  # a float64 conv: torch's
        conv.float()
        assert torch.equal(conv(x.detach()[0]), F.conv2d(x.detach()[0], conv.weight, conv.bias))  # 3-D input
        conv.stride = (2, 2)  # changed after the swap: no longer the kernel's
        assert torch.equal(conv(x.detach()), F.conv2d(x.detach(), conv.weight, conv.bias, stride=2))


def test_large_calls_run_torchs_conv(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past POINTWISE_MAX_MACS (torch's conv is compute-bound and well tuned there) the class's own forward runs,
    fused clamp included; below it the kernel (float32 rounding, not bit-equal to torch's)."""
    needs_kernels()
    conv = _conv(24, 40)
    pointwise_kernels_(conv)
    conv.output_clamp = (0.0, 6.0)
    x = _map(2, 24, 5, 5, True)
    monkeypatch.setattr(pointwise, "POINTWISE_MAX_MACS", x.numel() * 40 - 1)
    with torch.no_grad():
        assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias).clamp(0.0, 6.0))
        monkeypatch.setattr(pointwise, "POINTWISE_MAX_MACS", x.numel() * 40)
        assert not torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias).clamp(0.0, 6.0))


def test_dense_weight_rejects_mismatched_inputs() -> None:
    needs_kernels()
    ext = fast.extension()
    dense = ext.DenseWeight(torch.randn(8, 16))  # type: ignore[union-attr]
    with pytest.raises(RuntimeError, match="x has 15 features, the weight expects K=16"):
        dense(torch.randn(3, 15))
    with pytest.raises(RuntimeError, match=r"x must be \[B, C, H, W\]"):
        dense.conv1x1(torch.randn(3, 16))
    with pytest.raises(RuntimeError, match="bias must have N elements"):
        ext.DenseWeight(torch.randn(8, 16), torch.randn(7))  # type: ignore[union-attr]
