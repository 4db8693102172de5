"""Depthwise convs on the kernel (lowbit.kernels.depthwise, cpu/kernels_dwconv_impl.h) against F.conv2d.

The kernel sums each output's taps in float32 in a fixed order, so it equals torch's conv to float32
rounding: asserted at 1e-5 relative to the output's scale, on every ISA, over odd shapes (channels that are
not a multiple of the vector width, maps smaller than the kernel, asymmetric padding, strides 1-3) and with 1
and 2 threads; and the swapped modules (float, packed, TF-"same" padding at stride 1 and 2) equal their own
forward.

Packed per-channel convs run the int8 form (int8 activations per image and channel x the exact integer taps,
both as pairs of adjacent columns):
within ``int8_error_bound`` (the activation rounding) plus float32 rounding, on every ISA, over the same shapes
(symmetric and asymmetric codes, 8 and 4 bits), 1 and 2 threads bit-equal.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding
from torch import nn

import lowbit.models  # noqa: F401  (the lit spec registers EfficientNet's same-padding convs)
from lowbit.kernels import fast
from lowbit.kernels.depthwise import (
    DepthwiseKernel,
    conv_padding,
    depthwise_kernels_,
    int8_error_bound,
    int8_taps,
    tf_same_padding,
)
from lowbit.kernels.quant_linear import QuantWeightParam
from lowbit.kernels.static_padding import static_same_padding_
from lowbit.quant.primitives import QuantSpec, to_packed
from tests.kernels.conftest import needs_kernels

GEN = torch.Generator().manual_seed(0)
REL = 1e-5
# (B, C, H, W, kernel, stride, (top, bottom, left, right)): vector tails (C = 1, 7, 19, 40), interior and edge
# pixels, maps smaller than the kernel, padding wider than the kernel reach, a 7x7 at stride 3.
CASES = [
    (1, 32, 12, 12, 3, 1, (1, 1, 1, 1)),
    (2, 19, 11, 13, 5, 2, (2, 1, 1, 2)),
    (1, 40, 10, 9, 3, 2, (0, 1, 0, 1)),
    (3, 7, 5, 4, 3, 1, (0, 0, 0, 0)),
    (1, 48, 3, 3, 5, 1, (2, 2, 2, 2)),
    (1, 17, 6, 9, 7, 3, (1, 4, 3, 0)),
    (1, 8, 2, 2, 3, 1, (3, 3, 3, 3)),
    (2, 1, 7, 7, 3, 1, (1, 1, 1, 1)),
    (1, 33, 8, 20, (3, 5), (1, 2), (1, 1, 2, 2)),
]


def _kernel(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, stride: int | tuple[int, int],
            pads: tuple[int, int, int, int], clamp: tuple[float, float] | None = None) -> torch.Tensor:
    pt, pb, pl, pr = pads
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    kh, kw = w.shape[-2:]
    oh, ow = (x.shape[2] + pt + pb - kh) // sh + 1, (x.shape[3] + pl + pr - kw) // sw + 1
    taps = w[:, 0].permute(1, 2, 0).contiguous()  # [C, 1, KH, KW] -> [KH, KW, C]
    lo, hi = clamp or (0.0, 0.0)
    return fast.extension().dwconv(x, taps, b, sh, sw, pt, pl, oh, ow, clamp is not None, lo, hi)


def _torch(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, stride: int | tuple[int, int],
           pads: tuple[int, int, int, int]) -> torch.Tensor:
    pt, pb, pl, pr = pads
    return F.conv2d(F.pad(x, [pl, pr, pt, pb]), w, b, stride, 0, 1, x.shape[1])


def _close(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.shape == ref.shape
    assert (y - ref).abs().max().item() <= REL * max(ref.abs().max().item(), 1e-30)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}C{c[1]}H{c[2]}W{c[3]}k{c[4]}s{c[5]}")
def test_kernel_matches_conv2d(isa: str, case: tuple) -> None:
    b, c, h, w, k, s, pads = case
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(b, c, h, w, generator=GEN)
    weight, bias = torch.randn(c, 1, kh, kw, generator=GEN), torch.randn(c, generator=GEN)
    y = _kernel(x, weight, bias, s, pads)
    assert y.is_contiguous(memory_format=torch.channels_last) or y.shape[1] == 1
    _close(y, _torch(x, weight, bias, s, pads))
    # A channels-last input is read in place; no bias; the fused clamp equals clamping afterwards.
    xcl = x.contiguous(memory_format=torch.channels_last)
    _close(_kernel(xcl, weight, None, s, pads, clamp=(0.0, 6.0)), _torch(x, weight, None, s, pads).clamp(0, 6))


def _within_int8_bound(y: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    assert y.shape == ref.shape
    slack = REL * max(ref.abs().max().item(), 1e-30)  # float32 rounding of the sums and the write-out
    assert bool(((y - ref).abs() <= int8_error_bound(x, weight) + slack).all())


def _packed_conv(c: int, kh: int, kw: int, spec: QuantSpec) -> nn.Conv2d:
    conv = nn.Conv2d(c, c, (kh, kw), groups=c)
    QuantWeightParam.attach(conv, to_packed(conv.weight.detach() * 3, spec))
    return conv


@pytest.mark.parametrize("spec", [QuantSpec(8), QuantSpec(8, symmetric=False), QuantSpec(4, symmetric=False)],
                         ids=["w8", "w8-asym", "w4-asym"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}C{c[1]}H{c[2]}W{c[3]}k{c[4]}s{c[5]}")
def test_int8_kernel_within_its_bound(isa: str, case: tuple, spec: QuantSpec) -> None:
    b, c, h, w, k, s, pads = case
    kh, kw = (k, k) if isinstance(k, int) else k
    sh, sw = (s, s) if isinstance(s, int) else s
    conv = _packed_conv(c, kh, kw, spec)
    taps, steps = int8_taps(conv)  # type: ignore[misc]
    weight = conv.weight.detach()  # the dequantized reference
    unpaired = torch.stack([taps << 16 >> 16, taps >> 16], dim=2).flatten(1, 2)[:, :kw]  # [KH, KW, C]
    assert torch.equal(unpaired.permute(2, 0, 1).unsqueeze(1).float() * steps.view(-1, 1, 1, 1), weight)
    x = torch.randn(b, c, h, w, generator=GEN) * torch.rand(1, c, 1, 1, generator=GEN) * 4  # channel ranges differ
    if c > 1:
        x[:, :1] = 0.0  # an all-zero channel: scale 0
    pt, pb, pl, pr = pads
    oh, ow = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
    ext = fast.extension()
    for threads in (1, 2):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            y = ext.dwconv_int8(x, taps, kw, steps, conv.bias, sh, sw, pt, pl, oh, ow, False, 0.0, 0.0)  # type: ignore[union-attr]
        finally:
            torch.set_num_threads(before)
        if threads == 1:
            y1 = y
    assert torch.equal(y1, y)
    ref = _torch(x, weight, conv.bias.detach(), s, pads)
    _within_int8_bound(y, ref, x, weight)
    assert (y - ref).abs().max() > 0  # it is the int8 form (float would match to rounding)
    clamped = ext.dwconv_int8(x, taps, kw, steps, None, sh, sw, pt, pl, oh, ow, True, 0.0, 0.5)  # type: ignore[union-attr]
    _within_int8_bound(clamped, _torch(x, weight, None, s, pads).clamp(0, 0.5), x, weight)


def test_int8_taps_only_for_weights_they_hold_exactly() -> None:
    assert int8_taps(nn.Conv2d(8, 8, 3, groups=8)) is None  # float: the float kernel
    assert int8_taps(_packed_conv(8, 3, 3, QuantSpec(8, group_size=3))) is None  # grouped along the taps
    assert int8_taps(_packed_conv(8, 3, 3, QuantSpec(8))) is not None


def test_thread_count_does_not_change_results() -> None:
    needs_kernels()
    x = torch.randn(4, 72, 24, 24, generator=GEN)
    w, b = torch.randn(72, 1, 5, 5, generator=GEN), torch.randn(72, generator=GEN)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = _kernel(x, w, b, 2, (1, 2, 1, 2))
        torch.set_num_threads(2)
        y2 = _kernel(x, w, b, 2, (1, 2, 1, 2))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y1, y2)  # each output row is computed by one thread, taps in the same order
    _close(y1, _torch(x, w, b, 2, (1, 2, 1, 2)))


@pytest.mark.parametrize(("size", "k", "s", "expected"), [(96, 3, 2, (0, 1)), (95, 3, 2, (1, 1)), (48, 5, 2, (1, 2)),
                                                          (12, 5, 1, (2, 2)), (7, 3, 3, (1, 1))])
def test_tf_same_padding(size: int, k: int, s: int, expected: tuple[int, int]) -> None:
    assert tf_same_padding(size, k, s) == expected
    lo, hi = expected
    assert (size + lo + hi - k) // s + 1 == -(-size // s)  # output ceil(size / stride)


def _count_kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Route ``fast.extension()`` through a proxy that records each ``dwconv`` call."""
    ext, calls = fast.extension(), []

    class Counting:
        def __getattr__(self, name: str) -> object:
            return getattr(ext, name)

        def dwconv(self, *args: object) -> torch.Tensor:
            calls.append(1)
            return ext.dwconv(*args)

        def dwconv_int8(self, *args: object) -> torch.Tensor:
            calls.append(8)
            return ext.dwconv_int8(*args)

    monkeypatch.setattr(fast, "extension", lambda: Counting())
    return calls


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize(("kind", "stride"), [("same", 1), ("same", 2), ("plain", 1), ("plain", 2), ("torch-same", 1)])
def test_swapped_convs_equal_their_own_forward(kind: str, stride: int, packed: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    needs_kernels()
    calls = _count_kernel_calls(monkeypatch)
    if kind == "same":
        conv: nn.Conv2d = Conv2dDynamicSamePadding(24, 24, 5, stride=stride, groups=24)
    elif kind == "plain":
        conv = nn.Conv2d(24, 24, 3, stride=stride, padding=(1, 2), groups=24, bias=False)
    else:  # torch's "same" (stride 1 only); the even kernel height pads asymmetrically
        conv = nn.Conv2d(24, 24, (4, 3), padding="same", groups=24)
    if packed:
        QuantWeightParam.attach(conv, to_packed(conv.weight.detach(), QuantSpec(8)))
    x = torch.randn(2, 24, 13, 10, generator=GEN)
    model = nn.Sequential(conv)
    with torch.no_grad():
        before = conv(x)
        keys = sorted(conv.state_dict())
        static_same_padding_(model)
        assert depthwise_kernels_(model) == 1 and depthwise_kernels_(model) == 0  # idempotent
        assert isinstance(conv, DepthwiseKernel) and isinstance(conv, QuantWeightParam) == packed
        assert sorted(conv.state_dict()) == keys
        check = (lambda y: _within_int8_bound(y, before, x, conv.weight)) if packed else (lambda y: _close(y, before))
        check(conv(x))
        with torch.inference_mode():
            check(conv(x))
    assert calls == [8 if packed else 1] * 2  # both ran on the kernel (packed: its int8 form), not the own forward
    # Autograd recording runs the class's own forward (gradients flow).
    xg = x.clone().requires_grad_(True)
    conv(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_only_eligible_convs_are_swapped() -> None:
    class OwnPadding(nn.Conv2d):  # a forward whose padding the transform cannot know
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(F.pad(x, [1, 0, 1, 0]))

    model = nn.ModuleList([
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise: swapped
        nn.Conv2d(8, 8, 3, padding=1, groups=4),  # grouped, not depthwise
        nn.Conv2d(8, 16, 3, padding=1, groups=8),  # channel multiplier 2
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect"),
        OwnPadding(8, 8, 3, groups=8),
    ])
    assert depthwise_kernels_(model) == 1
    assert [isinstance(m, DepthwiseKernel) for m in model] == [True] + [False] * 5
    assert conv_padding(model[5], 9, 9) is None


def test_weight_change_refreshes_the_taps() -> None:
    needs_kernels()
    conv = nn.Conv2d(16, 16, 3, padding=1, groups=16)
    depthwise_kernels_(conv)
    x = torch.randn(1, 16, 6, 6, generator=GEN)
    with torch.no_grad():
        conv(x)
        conv.weight.mul_(2.0)  # in place: a new version of the same tensor
        _close(conv(x), F.conv2d(x, conv.weight, conv.bias, 1, 1, 1, 16))


def test_packed_weight_change_refreshes_the_taps() -> None:
    needs_kernels()
    conv, other = (nn.Conv2d(16, 16, 3, padding=1, groups=16) for _ in range(2))
    for m in (conv, other):
        QuantWeightParam.attach(m, to_packed(m.weight.detach(), QuantSpec(8)))
    depthwise_kernels_(conv)
    x = torch.randn(1, 16, 6, 6, generator=GEN)
    with torch.no_grad():
        conv(x)
        conv.load_state_dict(other.state_dict())  # new packed codes copied into the same buffers
        _within_int8_bound(conv(x), F.conv2d(x, other.weight, other.bias, 1, 1, 1, 16), x, other.weight)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_float_dtypes_compute_in_float32_and_keep_their_dtype(dtype: torch.dtype) -> None:
    needs_kernels()
    conv = nn.Conv2d(24, 24, 3, padding=1, groups=24).to(dtype)
    x = torch.randn(2, 24, 9, 7, generator=GEN).to(dtype)
    with torch.no_grad():
        ref = F.conv2d(x.float(), conv.weight.float(), conv.bias.float(), 1, 1, 1, 24)
        depthwise_kernels_(conv)
        y = conv(x)
    assert y.dtype == dtype
    if dtype == torch.float64:
        _close(y.float(), ref)
    else:  # bfloat16: the output's own rounding (8 bits of mantissa)
        torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)
