"""Depthwise convs on lowbit's own CPU kernel: channels-last, padding never copied, bias in registers.

A depthwise conv does ~10 multiply-adds per value it reads, so at mobile-CNN sizes (EfficientNet-Lite0 at
96 px: 3x3 and 5x5 kernels, 3x3 to 48x48 maps, 32 to 1152 channels) torch's call (``F.pad`` for the TF
"same" padding, then mkldnn) is dominated by padding copies, layout reorders and dispatch: lit-fashion's 16
depthwise convs take 66-173 us each as loaded, 13-40 us on this kernel, 1.50 -> 0.39 ms in all at batch 1 and
27.1 -> 9.3 ms at batch 32 (1 thread, ``benchmarks/bench_conv_layers.py``); before, they were about half of the
w4 image embedding at batch 1. ``cpu/kernels_dwconv_impl.h``
computes them over channels-last maps (channels in the vector lanes), skips the taps that fall in the zero
padding instead of padding a copy (so the asymmetric TF-"same" padding of stride-2 convs costs nothing) and
adds the bias before its single store. Its output is channels-last, which the packed 1x1 convs
(``QuantConv2d1x1``) read in place, so after the first depthwise conv the tower stays channels-last.

``depthwise_kernels_(model)`` re-classes each eligible conv in place to ``Dw<Class>`` (a subclass of its class:
``isinstance``, the state dict and packed weights are unchanged). Eligible: ``groups == in == out channels``,
dilation 1, zero padding, and a forward whose padding is known: ``nn.Conv2d``'s own (its ``padding``, also
``"same"`` / ``"valid"``) or a class of ``static_padding.SAME_PADDING_CONVS`` (TF "same", at any stride).
Float convs and packed ones (``QuantWeightParam``: the cached dequantized weight) alike; the kernel computes in
float32 with each output's taps summed in a fixed order, so it matches ``F.conv2d`` to float32 rounding
(tested). Where the kernel cannot run (extension unavailable, autograd recording, a non-CPU or non-4-D
input) the class's own forward runs.

Packed convs (int8 towers: ``QuantWeightParam`` on the default "cpu" backend, per-channel, no ``input_scale``;
the "reference" backend keeps the float kernel on the dequantized taps) run the kernel's int8 form
instead (``DwConvQ``): the taps are the packed codes minus their zero point, exact (so the weight is the
dequantized reference's own), the input map is quantized per image and channel to int8 (a[b, c] = max |x| /
127 over the image's pixels, round half to even) into pairs of adjacent pixels, so one pmaddwd / vpdpwssd
multiplies two taps at once; products are summed in int32 and the write-out applies a[b, c] * s[c], the bias
and a fused clamp. Per-channel scales cost nothing here (a depthwise output reads one
channel) and keep a channel of small values from losing its precision to a large one. Error: only the
activation rounding, |y - y_ref| <= a[b, c] / 2 * sum |w[c]| (``int8_error_bound``) plus float32 rounding.

Example:
    >>> depthwise_kernels_(model.vision)  # doctest: +SKIP
    16
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lowbit.kernels import fast
from lowbit.kernels.class_swap import mixed_class, swap_eligible_
from lowbit.kernels.formats import PackedWeight, symmetric_zero
from lowbit.kernels.lowering import Lowered, PlanWatched, register_lowering
from lowbit.kernels.quant_linear import QuantWeightParam, clamp_output
from lowbit.kernels.static_padding import registered_same_padding

_TAPS = "_lowbit_dw_taps"  # instance attribute: (identity of the weight's tensors, taps [KH, KW, C], the tensors)
_INT_TAPS = "_lowbit_dw_int_taps"  # likewise for the int8 form: (state, (taps, steps) or None, the tensors)


def int8_taps(conv: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The int8 kernel's weight of a packed depthwise ``conv``: integer tap pairs int32 [KH, ceil(KW / 2), C] (codes
    minus zero point; taps 2t / 2t + 1 in the low / high 16 bits: see lowbit_kernels.h, DwConvQ) and steps float32
    [C]; None for a weight it cannot hold exactly (float, grouped along the taps, 1-bit, an ``input_scale``, a
    variant format)."""
    if not isinstance(conv, QuantWeightParam) or conv._buffers.get("input_scale") is not None:
        return None
    packed = conv.packed
    if type(packed) is not PackedWeight or packed.bits == 1 or packed.scales.shape[1] != 1:
        return None
    kh, kw = packed.shape[2:]
    codes = packed.codes().to(torch.int32)  # [C, KH * KW]
    zero = packed.zeros.to(torch.int32) if packed.zeros is not None else int(symmetric_zero(packed.bits))
    taps = (codes - zero).t().reshape(kh, kw, -1)  # [KH, KW, C]
    if kw % 2:
        taps = torch.cat([taps, torch.zeros_like(taps[:, :1])], dim=1)  # the odd last pair's high half: 0
    pairs = (taps[:, 0::2] & 0xFFFF) | (taps[:, 1::2] << 16)  # int32 wraps: the high half's bits, as stored
    return pairs.contiguous(), packed.scales[:, 0].to(torch.float32).contiguous()


def int8_error_bound(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Bound [B, C, 1, 1] on |int8 kernel - F.conv2d on the dequantized weight| of a depthwise conv (besides
    float32 rounding): the input's rounding to a[b, c] = max |x[b, c]| / 127 steps, at most a / 2 per tap."""
    a = x.abs().amax(dim=(2, 3), keepdim=True) / 127  # [B, C, 1, 1]
    return a / 2 * weight.abs().sum(dim=(1, 2, 3)).view(1, -1, 1, 1)


def _forward_owner(cls: type) -> type:
    """The class whose ``forward`` instances of ``cls`` run, ignoring the kernel mixins themselves (marked
    ``_reproduces_padding``: ``DepthwiseKernel``, ``conv_gemm.ConvGemmKernel``; the forward whose padding they
    reproduce) and mixins without a forward."""
    return next(c for c in cls.__mro__ if "forward" in c.__dict__ and not c.__dict__.get("_reproduces_padding"))


def tf_same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow "same" padding (low side, high side) of one spatial dimension: output ``ceil(size / stride)``,
    the extra pixel of an odd total on the high side."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def conv_padding(conv: nn.Conv2d, h: int, w: int) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) zero padding ``conv``'s forward applies to an [.., h, w] input; None when its
    forward is not one whose padding is known (see the module docstring)."""
    if conv.padding_mode != "zeros":
        return None
    kh, kw = conv.kernel_size
    if registered_same_padding(conv) and conv.padding in ((0, 0), "valid"):
        return (*tf_same_padding(h, kh, conv.stride[0], conv.dilation[0]),
                *tf_same_padding(w, kw, conv.stride[1], conv.dilation[1]))
    if _forward_owner(type(conv)) is not nn.Conv2d:
        return None
    if conv.padding == "valid":
        return 0, 0, 0, 0
    if conv.padding == "same":  # torch: total (k - 1) * d, the low side gets total // 2
        th, tw = (kh - 1) * conv.dilation[0], (kw - 1) * conv.dilation[1]
        return th // 2, th - th // 2, tw // 2, tw - tw // 2
    ph, pw = conv.padding
    return ph, ph, pw, pw


def is_depthwise(conv: nn.Module) -> bool:
    """A conv the kernel computes: depthwise (one filter per channel), dilation 1, padding known."""
    return (isinstance(conv, nn.Conv2d) and conv.groups == conv.in_channels == conv.out_channels
            and tuple(conv.dilation) == (1, 1) and conv_padding(conv, 1, 1) is not None)


class DepthwiseKernel(PlanWatched):
    """Mixin placed before a depthwise conv class: its forward runs on ``cpu/kernels_dwconv_impl.h``."""

    _reproduces_padding = True  # conv_padding reads the padding of the class's own forward
    # what its lowering (lowered_depthwise) captures: setting one invalidates planned forwards
    _plan_reads = frozenset({"backend", "output_clamp", "stride", "kernel_size", "padding", "padding_mode", "bias"})

    @classmethod
    def kernel_class(cls, base: type) -> type:
        """The (cached) ``Dw<base>`` class."""
        return mixed_class(cls, base, f"Dw{base.__name__}")

    def _taps(self) -> torch.Tensor:
        """The weight [C, 1, KH, KW] as float32 taps [KH, KW, C], cached until the weight changes.

        Keyed on the module's own tensors (the float ``weight`` Parameter, or the packed buffers behind a
        ``QuantWeightParam``'s dequantizing property): reading that property costs ~5 us a call."""
        param = self._parameters.get("weight")  # type: ignore[attr-defined]
        key = (None if param is None else (id(param), -1 if param.is_inference() else param._version),
               fast.buffer_state(self))  # type: ignore[arg-type]
        hit = self.__dict__.get(_TAPS)
        if hit is not None and hit[0] == key:
            return hit[1]
        weight: torch.Tensor = self.weight  # type: ignore[attr-defined]
        with torch.inference_mode(False), torch.no_grad():
            taps = weight.detach()[:, 0].permute(1, 2, 0).to(torch.float32).contiguous()  # [C,1,KH,KW] -> [KH,KW,C]
        # The keyed tensors are kept alive with the entry, so their ids cannot be reused meanwhile.
        self.__dict__[_TAPS] = (key, taps, param, list(self._buffers.values()))  # type: ignore[attr-defined]
        return taps

    def _int8_taps(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``int8_taps(self)``, cached until the packed buffers change."""
        key = fast.buffer_state(self)  # type: ignore[arg-type]
        hit = self.__dict__.get(_INT_TAPS)
        if hit is not None and hit[0] == key:
            return hit[1]
        with torch.inference_mode(False), torch.no_grad():
            value = int8_taps(self)  # type: ignore[arg-type]
        self.__dict__[_INT_TAPS] = (key, value, list(self._buffers.values()))  # type: ignore[attr-defined]
        return value

    # (lo, hi) of an activation fused into the conv (``lowbit.kernels.fuse_act``): clamped before the store.
    output_clamp: tuple[float, float] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv: nn.Conv2d = self  # type: ignore[assignment]
        ext: Any = fast.extension()
        recording = torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)
        # None also when the padding mode or class changed since the swap
        geometry = _geometry(conv, x.shape[-2], x.shape[-1]) if x.dim() == 4 else None
        if ext is None or recording or geometry is None or not x.is_cpu or not x.is_floating_point():
            return clamp_output(self, super().forward(x))  # type: ignore[misc]
        int_taps = (self._int8_taps() if isinstance(self, QuantWeightParam) and self.backend == "cpu"
                    and x.dtype == torch.float32 else None)
        return _run(ext, conv, x, geometry, int_taps, None if int_taps is not None else self._taps())


def _geometry(conv: nn.Conv2d, h: int, w: int) -> tuple[int, int, int, int] | None:
    """(top pad, left pad, output height, output width) of the kernel call for an [.., h, w] input, None where
    the padding is unknown."""
    pads = conv_padding(conv, h, w)
    if pads is None:
        return None
    pt, pb, pl, pr = pads
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    return pt, pl, max((h + pt + pb - kh) // sh + 1, 0), max((w + pl + pr - kw) // sw + 1, 0)


def _run(ext: Any, conv: Any, x: torch.Tensor, geometry: tuple[int, int, int, int],
         int_taps: tuple[torch.Tensor, torch.Tensor] | None, taps: torch.Tensor | None) -> torch.Tensor:
    """The kernel call: the int8 form on ``int_taps`` (float32 ``x``), else the float one on ``taps``."""
    kernel, args = _call(ext, conv, geometry, int_taps, taps)
    y = kernel(x, *args)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def _call(ext: Any, conv: Any, geometry: tuple[int, int, int, int], int_taps: tuple[torch.Tensor, torch.Tensor] | None,
          taps: torch.Tensor | None) -> tuple[Any, tuple[Any, ...]]:
    """The extension function and its arguments after the input map."""
    pt, pl, oh, ow = geometry
    (sh, sw), kw = conv.stride, conv.kernel_size[1]
    lo, hi = conv.output_clamp or (0.0, 0.0)
    epilogue = (conv.bias, sh, sw, pt, pl, oh, ow, conv.output_clamp is not None, lo, hi)
    if int_taps is not None:
        return ext.dwconv_int8, (int_taps[0], kw, int_taps[1], *epilogue)
    return ext.dwconv, (taps, *epilogue)


@register_lowering(DepthwiseKernel)
def lowered_depthwise(conv: Any) -> Lowered | None:
    """The conv's forward as its kernel call (``lowbit.kernels.lowering``) on float32 inputs, the taps and each
    input size's geometry resolved once; other inputs take the forward."""
    ext = fast.extension()
    if ext is None:
        return None
    int_taps = conv._int8_taps() if isinstance(conv, QuantWeightParam) and conv.backend == "cpu" else None
    taps = None if int_taps is not None else conv._taps()
    calls: dict[tuple[int, int], tuple[Any, tuple[Any, ...]] | None] = {}  # per input size: the kernel call

    def depthwise_call(x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.dtype != torch.float32:
            return conv.forward(x)
        hw = (x.shape[2], x.shape[3])
        call = calls.get(hw)
        if call is None and hw not in calls:
            geometry = _geometry(conv, *hw)
            call = calls[hw] = None if geometry is None else _call(ext, conv, geometry, int_taps, taps)
        return conv.forward(x) if call is None else call[0](x, *call[1])

    return Lowered(depthwise_call)


def depthwise_kernels_(model: nn.Module) -> int:
    """Re-class every eligible depthwise conv of ``model`` to run on the kernel; returns how many. Idempotent;
    outputs equal the convs' own to float32 rounding."""
    return swap_eligible_(model, DepthwiseKernel, is_depthwise)
