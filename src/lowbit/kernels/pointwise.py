"""Float 1x1 convs on lowbit's dense float kernel (``cpu/kernels_dense_impl.h``): the float model's pointwise convs.

A packed 1x1 conv runs on lowbit's kernels (``QuantConv2d1x1``), and a small one of many pixels on the float path of
its dequantized weight (``fast.DENSE_MAX_WEIGHTS``). A float model's 1x1 convs ran torch's ``F.conv2d``, which at
batch 1 costs about twice the dense kernel (lit-fashion's 32 pointwise convs, 1 thread,
``benchmarks/bench_conv_layers.py --kind pointwise``: 2.22 ms against 1.07 ms; oneDNN reorders the weight in
every call). So "fp32 with the same graph optimisations" is only an honest baseline for a packed tower if its
float 1x1 convs get the same kernel: ``pointwise_kernels_(model)`` re-classes each eligible float conv in place to
``Pw<Class>`` (a subclass of its class: ``isinstance`` and the state dict are unchanged) whose forward computes
``x @ W^T + bias`` over the channels-last rows on that kernel (``DenseWeight``: the weight's transposed float32
copy, made once and kept until the weight or bias changes; it doubles the memory of these weights).

Only calls of at most ``POINTWISE_MAX_MACS`` multiply-adds take the kernel: past that torch's conv is compute-bound
and well tuned. Measured per layer (``pointwise*.json``): at batch 1 the kernel takes 0.48x of torch's time
(AVX-512) and 0.85x with both on AVX2 (``--like-avx2-machine``); at batch 32 (``--no-row-limit``) 0.82x on
AVX-512 but 1.08x on AVX2, so large calls keep torch's conv on every ISA.

Eligible: an ``nn.Conv2d`` with float weights (not a packed ``QuantWeightParam``), a 1x1 kernel, stride 1, groups 1
and no padding from its forward (``depthwise.conv_padding``: ``nn.Conv2d``'s own or a registered TF-"same"
class). The result equals ``F.conv2d``'s to float32 rounding (the sums in another order). Where the kernel
cannot run (extension unavailable, autograd recording, a non-CPU, non-float32 or non-4-D input, attributes
changed since the swap) the class's own forward runs. Its output is channels-last when its input is (the towers'
maps after lowbit's depthwise kernel), which the next kernel layers read in place.

Example:
    >>> pointwise_kernels_(model.vision)  # doctest: +SKIP
    32
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowbit.kernels import fast
from lowbit.kernels.class_swap import DropsCaches, mixed_class, swap_eligible_
from lowbit.kernels.depthwise import conv_padding
from lowbit.kernels.lowering import Lowered, PlanWatched, register_lowering
from lowbit.kernels.quant_linear import QuantWeightParam, clamp_output

# Largest call (rows x C x N multiply-adds) on the kernel: every 1x1 conv of lit-fashion at batch 1 (at most 3.7M)
POINTWISE_MAX_MACS = 1 << 22
_DENSE = "_lowbit_pointwise"  # instance attribute: (identity of weight and bias, DenseWeight, the tensors)


def is_pointwise(conv: nn.Module) -> bool:
    """A float conv the dense kernel computes (see the module docstring)."""
    return (isinstance(conv, nn.Conv2d) and not isinstance(conv, QuantWeightParam)
            and conv.weight.dtype == torch.float32 and tuple(conv.kernel_size) == (1, 1)
            and tuple(conv.stride) == (1, 1) and conv.groups == 1 and conv_padding(conv, 1, 1) == (0, 0, 0, 0))


class PointwiseKernel(DropsCaches, PlanWatched):
    """Mixin placed before a float conv class: its 1x1 forward runs on the dense float kernel."""

    _cache_attrs = (_DENSE,)
    _reproduces_padding = True  # conv_padding reads the padding of the class's own forward
    # what its lowering (lowered_pointwise) captures: setting one invalidates planned forwards
    _plan_reads = frozenset({"output_clamp", "stride", "kernel_size", "padding", "padding_mode", "groups",
                             "weight", "bias"})
    # (lo, hi) of an activation fused into the conv (``lowbit.kernels.fuse_act``): clamped before the store.
    output_clamp: tuple[float, float] | None = None

    @classmethod
    def kernel_class(cls, base: type) -> type:
        """The (cached) ``Pw<base>`` class."""
        return mixed_class(cls, base, f"Pw{base.__name__}")

    def _dense(self) -> Any:
        """The weight and bias as an ``ext.DenseWeight``, cached until either changes (their ids and versions)."""
        weight, bias = self.weight, self.bias  # type: ignore[attr-defined]
        key = (fast.tensor_state(weight), fast.tensor_state(bias))
        hit = self.__dict__.get(_DENSE)
        if hit is not None and hit[0] == key:
            return hit[1]
        ext: Any = fast.extension()
        with torch.inference_mode(False), torch.no_grad():
            dense = ext.DenseWeight(weight.detach().flatten(1), None if bias is None else bias.detach())
        # the keyed tensors are kept alive with the entry, so their ids cannot be reused meanwhile
        self.__dict__[_DENSE] = (key, dense, (weight, bias))
        return dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight  # type: ignore[attr-defined]
        recording = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        if fast.extension() is None or recording or x.dim() != 4 or not x.is_cpu or x.dtype != torch.float32 \
                or x.numel() * weight.shape[0] > POINTWISE_MAX_MACS or not is_pointwise(self):  # type: ignore[arg-type]
            return clamp_output(self, super().forward(x))  # type: ignore[misc]
        clamp = self.output_clamp
        return self._dense().conv1x1(x, clamp is not None, *(clamp or (0.0, 0.0)))


@register_lowering(PointwiseKernel)
def lowered_pointwise(conv: Any) -> Lowered | None:
    """The conv's forward as its kernel call (``lowbit.kernels.lowering``) on float32 4-D inputs; other inputs take
    the forward. None where the forward would not run the kernel."""
    if fast.extension() is None or not is_pointwise(conv):
        return None
    dense = conv._dense()
    clamp = conv.output_clamp
    args = (clamp is not None, *(clamp or (0.0, 0.0)))
    max_numel = POINTWISE_MAX_MACS // conv.out_channels  # larger inputs: torch's conv (the forward)

    def pointwise_call(x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.dtype != torch.float32 or x.numel() > max_numel:
            return conv.forward(x)
        return dense.conv1x1(x, *args)

    return Lowered(pointwise_call)


def pointwise_kernels_(model: nn.Module) -> int:
    """Re-class every eligible float 1x1 conv of ``model`` to run on the dense kernel; returns how many.
    Idempotent; outputs equal the convs' own to float32 rounding."""
    return swap_eligible_(model, PointwiseKernel, is_pointwise)
