"""Dense convs with a spatial kernel (a CNN's stem: 3x3, stride 2, over 3 channels) as im2col + one GEMM.

A packed conv that is not 1x1 otherwise runs its class's own forward on the cached dequantized weight, and a
float one torch's conv: ``F.pad`` + ``F.conv2d`` (lit-fashion's stem at batch 1, 1 thread: 103 us, 74 us this
way, ``benchmarks/bench_conv_layers.py --kind spatial``; its ReLU6 then also fuses into the write-out).
``conv_gemm_kernels_(model)`` re-classes each eligible one in place to
``Gemm<Class>`` (a subclass of its class: ``isinstance``, the state dict and the packed weight are unchanged):
im2col (``ext.im2col``: the input unfolded into [B, OH * OW, C * KH * KW] rows, K in the weight's own flattening
order, the padding's taps zero: no padded copy), then one GEMM, written [B, OH * OW, N] and returned as the
channels-last [B, N, OH, OW] view (what the next layers of lowbit's kernels read in place):

* packed convs: the packed weight on the kernels (``fast.prepare``: at these row counts the small weight's float
  path, or the panel GEMM; K = 27 is padded to one 32-block inside). Error: that of every packed linear, the
  int8 rounding of each row of 27 inputs (``fast.error_bound``), none on the float path; the weight is the packed
  one, exactly;
* float convs: the weight on the dense float kernel (``ext.DenseWeight``, as ``lowbit.kernels.pointwise``),
  for calls of at most ``pointwise.POINTWISE_MAX_MACS`` multiply-adds (larger ones: torch's conv). Equal to
  ``F.conv2d`` to float32 rounding.

Eligible: groups 1, dilation 1, a kernel larger than 1x1, known padding (``depthwise.conv_padding``); packed: a
``QuantWeightParam`` conv without ``input_scale`` in a plain packed format the kernels run; float: float32
weights. Where the kernels cannot run (extension unavailable, autograd recording, a non-CPU or non-float32 input,
a packed conv on a backend other than "cpu": ``set_backend``) the class's own forward runs.

Example:
    >>> conv_gemm_kernels_(model.vision)  # doctest: +SKIP
    1
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from lowbit.kernels import fast, pointwise
from lowbit.kernels.class_swap import DropsCaches, mixed_class, swap_eligible_
from lowbit.kernels.depthwise import conv_padding
from lowbit.kernels.formats import PackedWeight
from lowbit.kernels.lowering import Lowered, register_lowering
from lowbit.kernels.quant_linear import QuantWeightParam, clamp_output

_PREPARED = "_lowbit_conv_gemm"  # instance attribute: (tensor states, the GEMM's weight, the tensors)


def is_gemm_conv(conv: nn.Module) -> bool:
    """A conv the im2col path computes (see the module docstring)."""
    if not (isinstance(conv, nn.Conv2d) and conv.groups == 1 and tuple(conv.kernel_size) != (1, 1)
            and tuple(conv.dilation) == (1, 1) and conv_padding(conv, 1, 1) is not None):
        return False
    if isinstance(conv, QuantWeightParam):
        return conv._buffers.get("input_scale") is None and type(conv.packed) is PackedWeight
    return conv.weight.dtype == torch.float32


class ConvGemmKernel(DropsCaches):
    """Mixin placed before a packed or float conv class: its forward runs im2col + one GEMM."""

    _cache_attrs = (_PREPARED,)
    _reproduces_padding = True  # conv_padding reads the padding of the class's own forward
    # (lo, hi) of an activation fused into the conv (``lowbit.kernels.fuse_act``): clamped before the store.
    output_clamp: tuple[float, float] | None = None

    @classmethod
    def kernel_class(cls, base: type) -> type:
        """The (cached) ``Gemm<base>`` class."""
        return mixed_class(cls, base, f"Gemm{base.__name__}")

    def _gemm(self) -> Any:
        """The weight as an [N, C * KH * KW] matrix for the kernels, cached until it changes: a packed weight's
        prepared call, a float weight's ``ext.DenseWeight``; both ``f(rows, clamp, lo, hi)``."""
        packed = isinstance(self, QuantWeightParam)
        bias = self.bias  # type: ignore[attr-defined]  # a Parameter (or None), kept beside the packed buffers
        tensors = [bias, *self._buffers.values()] if packed else [bias, self.weight]  # type: ignore[attr-defined]
        key = tuple(fast.tensor_state(t) for t in tensors)
        hit = self.__dict__.get(_PREPARED)
        if hit is not None and hit[0] == key:
            return hit[1]
        b = None if bias is None else bias.detach()
        with torch.inference_mode(False), torch.no_grad():
            if packed:
                weight: PackedWeight = self.packed  # type: ignore[attr-defined]
                gemm = fast.prepare(dataclasses.replace(weight, shape=(weight.shape[0], weight.in_features)), b).call
            else:
                gemm = fast.extension().DenseWeight(self.weight.detach().flatten(1), b)  # type: ignore[union-attr]
        self.__dict__[_PREPARED] = (key, gemm, tensors)  # type: ignore[attr-defined]
        return gemm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv: nn.Conv2d = self  # type: ignore[assignment]
        pads = conv_padding(conv, x.shape[-2], x.shape[-1]) if x.dim() == 4 else None
        if pads is None or not self._runs_kernel(x):
            return clamp_output(self, super().forward(x))  # type: ignore[misc]
        pt, pb, pl, pr = pads
        (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
        oh, ow = (x.shape[-2] + pt + pb - kh) // sh + 1, (x.shape[-1] + pl + pr - kw) // sw + 1
        macs = x.shape[0] * oh * ow * conv.in_channels * kh * kw * conv.out_channels
        # a large float call keeps torch's conv (compute-bound there; pointwise.POINTWISE_MAX_MACS), unprepared
        gemm = None if not isinstance(self, QuantWeightParam) and macs > pointwise.POINTWISE_MAX_MACS else self._gemm()
        if gemm is None:
            return clamp_output(self, super().forward(x))  # type: ignore[misc]
        rows = fast.extension().im2col(x, kh, kw, sh, sw, pt, pl, oh, ow)  # type: ignore[union-attr]
        clamp = self.output_clamp
        y = gemm(rows, clamp is not None, *(clamp or (0.0, 0.0)))  # [B, OH, OW, N]
        return y.permute(0, 3, 1, 2)

    def _runs_kernel(self, x: torch.Tensor) -> bool:
        """Whether this call can run on the kernels (module docstring)."""
        if fast.extension() is None or not x.is_cpu or x.dtype != torch.float32:
            return False
        if isinstance(self, QuantWeightParam):
            return not (torch.is_grad_enabled() and x.requires_grad) and self.backend == "cpu"
        return not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))  # type: ignore[attr-defined]


@register_lowering(ConvGemmKernel)
def lowered_conv_gemm(conv: Any) -> Lowered:
    """Its forward, called directly (``lowbit.kernels.lowering``): it reads the conv's state per call (the geometry
    depends on the input size), so it captures nothing; this rule also keeps a base class's rule (a same-padding
    conv's static ``F.conv2d``) from replacing it."""
    return Lowered(conv.forward)


def conv_gemm_kernels_(model: nn.Module) -> int:
    """Re-class every eligible packed or float spatial conv of ``model`` to run im2col + one GEMM; returns how many.
    Idempotent."""
    return swap_eligible_(model, ConvGemmKernel, is_gemm_conv)
