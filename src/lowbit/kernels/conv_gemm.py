"""Packed dense convs with a spatial kernel (a CNN's stem: 3x3, stride 2, over 3 channels) on the int8 GEMM.

A packed conv that is not 1x1 otherwise runs its class's own forward on the cached dequantized weight: ``F.pad``
+ ``F.conv2d`` in float. ``conv_gemm_kernels_(model)`` re-classes each eligible one in place to ``Gemm<Class>``
(a subclass of its class: ``isinstance``, the state dict and the packed weight are unchanged): im2col (the
zero-padded input unfolded into [B, OH * OW, C * KH * KW] rows, K in the weight's own flattening order), then the
packed weight on the kernels (``fast.prepare``: the panel GEMM at these M; K = 27 is padded to one 32-block
inside), written [B, OH * OW, N] and returned as the channels-last [B, N, OH, OW] view (what the next layers of
lowbit's kernels read in place). Error: that of every packed linear, the int8 rounding of each row of 27 inputs
(``fast.error_bound``); the weight is the packed one, exactly.

Eligible: a ``QuantWeightParam`` conv, groups 1, dilation 1, a kernel larger than 1x1, known padding
(``depthwise.conv_padding``), no ``input_scale``, a plain packed format the kernels run. Where the kernels cannot
run (extension unavailable, autograd recording, a non-CPU or non-float32 input, a backend other than "cpu":
``set_backend``) the class's own forward runs.

Example:
    >>> conv_gemm_kernels_(model.vision)  # doctest: +SKIP
    1
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.kernels import fast
from lowbit.kernels.class_swap import mixed_class, swap_eligible_
from lowbit.kernels.depthwise import conv_padding
from lowbit.kernels.formats import PackedWeight
from lowbit.kernels.quant_linear import QuantWeightParam, clamp_output

_PREPARED = "_lowbit_conv_gemm"  # instance attribute: (buffer state, prepared weight, the buffers)


def is_gemm_conv(conv: nn.Module) -> bool:
    """A packed conv the im2col path computes (see the module docstring)."""
    return (isinstance(conv, nn.Conv2d) and isinstance(conv, QuantWeightParam) and conv.groups == 1
            and tuple(conv.kernel_size) != (1, 1) and tuple(conv.dilation) == (1, 1)
            and conv._buffers.get("input_scale") is None and type(conv.packed) is PackedWeight
            and conv_padding(conv, 1, 1) is not None)


class ConvGemmKernel:
    """Mixin placed before a packed conv class: its forward runs im2col + the packed GEMM."""

    _reproduces_padding = True  # conv_padding reads the padding of the class's own forward

    @classmethod
    def kernel_class(cls, base: type) -> type:
        """The (cached) ``Gemm<base>`` class."""
        return mixed_class(cls, base, f"Gemm{base.__name__}")

    def _prepared(self) -> Any:
        """The packed weight as an [N, C * KH * KW] matrix prepared for the kernels, cached until it changes."""
        bias = self.bias  # type: ignore[attr-defined]  # a Parameter (or None), kept beside the packed buffers
        key = (fast.buffer_state(self),  # type: ignore[arg-type]
               None if bias is None else (id(bias), -1 if bias.is_inference() else bias._version))
        hit = self.__dict__.get(_PREPARED)
        if hit is not None and hit[0] == key:
            return hit[1]
        packed: PackedWeight = self.packed  # type: ignore[attr-defined]
        matrix = dataclasses.replace(packed, shape=(packed.shape[0], packed.in_features))
        with torch.inference_mode(False), torch.no_grad():
            handle = fast.prepare(matrix, None if bias is None else bias.detach())
        self.__dict__[_PREPARED] = (key, handle, [bias, *self._buffers.values()])  # type: ignore[attr-defined]
        return handle

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv: nn.Conv2d = self  # type: ignore[assignment]
        recording = torch.is_grad_enabled() and x.requires_grad
        pads = conv_padding(conv, x.shape[-2], x.shape[-1]) if x.dim() == 4 else None
        handle = None
        if fast.extension() is not None and not recording and pads is not None and x.is_cpu \
                and x.dtype == torch.float32 and self.backend == "cpu":  # type: ignore[attr-defined]
            handle = self._prepared()
        if handle is None or handle.call is None:
            return clamp_output(self, super().forward(x))  # type: ignore[misc]
        pt, pb, pl, pr = pads  # type: ignore[misc]
        (kh, kw), stride = conv.kernel_size, tuple(conv.stride)
        h, w = x.shape[-2] + pt + pb, x.shape[-1] + pl + pr
        oh, ow = (h - kh) // stride[0] + 1, (w - kw) // stride[1] + 1
        padded = F.pad(x, (pl, pr, pt, pb)) if any(pads) else x  # type: ignore[arg-type]
        k = conv.in_channels * kh * kw
        onehot = self.__dict__.get("_lowbit_onehot")
        if onehot is None or onehot.shape[0] != k:  # filter i picks input i of the weight's flattening
            onehot = self.__dict__["_lowbit_onehot"] = torch.eye(k).view(k, conv.in_channels, kh, kw)
        cols = F.conv2d(padded.contiguous(memory_format=torch.channels_last), onehot, None, stride)  # [B, K, OH, OW]
        cols = cols.permute(0, 2, 3, 1).reshape(x.shape[0], oh * ow, k)  # a view when channels-last
        clamp = getattr(self, "output_clamp", None)
        y = handle.call(cols) if clamp is None else handle.call(cols, True, *clamp)  # [B, OH * OW, N]
        return y.view(x.shape[0], oh, ow, -1).permute(0, 3, 1, 2)


def conv_gemm_kernels_(model: nn.Module) -> int:
    """Re-class every eligible packed conv of ``model`` to run im2col + the packed GEMM; returns how many.
    Idempotent."""
    return swap_eligible_(model, ConvGemmKernel, is_gemm_conv)
