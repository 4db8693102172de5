"""Clamp activations (ReLU, ReLU6, Hardtanh) fused into the kernel layer that feeds them.

A ReLU6 after a conv is a pass over the whole activation map: at batch 32 the 33 ReLU6 calls of lit-fashion's
image tower took 9 of its 63 ms (1 thread, after ``optimize_for_inference_``'s other steps), the same memory
traffic as the 1x1 convs' own output. The kernels can clamp in registers before their single store instead.
``fuse_activations_(model)`` finds, in the ``torch.fx`` module graphs of ``lowbit.kernels.graph``, every call
of a clamp activation whose input is the fresh output of a kernel layer (a plain ``QuantLinear`` /
``QuantConv2d1x1``, or a conv on the depthwise, dense or im2col kernels: ``DepthwiseKernel``,
``PointwiseKernel``, ``ConvGemmKernel``), possibly through identities
(``FoldedBatchNorm``), read by nothing else. When every call site of an activation module qualifies (modules
are often shared: efficientnet's block ``_relu`` serves the expand and the depthwise conv), each feeding
layer gets ``output_clamp = (lo, hi)`` and the activation is re-classed to ``Fused<Class>``, whose forward
returns its input. Layers that feed several call sites, or are also called outside the traced subtrees,
are left alone, as are siblings sharing one kernel call (``lowbit.kernels.fusion``) and layer variants with
their own matmul. Outputs are unchanged: ``clamp(y, lo, hi)`` is what the activation computed (every path of
the layer applies it: the kernels in their write-out, the reference backend and fallbacks after the matmul).

Which activations are a clamp is a registry (``CLAMP_ACTIVATIONS``: the class's qualified name -> its
(lo, hi)); subclasses match through their MRO (ReLU6 is a Hardtanh).

Example:
    >>> fuse_activations_(model.vision)  # doctest: +SKIP
    16
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from lowbit.kernels.class_swap import mixed_class
from lowbit.kernels.conv_gemm import ConvGemmKernel
from lowbit.kernels.depthwise import DepthwiseKernel
from lowbit.kernels.graph import called_outside, fresh_source, module_graphs
from lowbit.kernels.lowering import IDENTITY, Lowered, register_lowering
from lowbit.kernels.pointwise import PointwiseKernel
from lowbit.kernels.quant_linear import GROUP_ATTR, QuantLinear
from lowbit.registry import Registry

# "module.QualName" of an activation class -> the (lo, hi) its forward clamps to.
CLAMP_ACTIVATIONS: Registry[Callable[[nn.Module], tuple[float, float]]] = Registry("clamp activation")
CLAMP_ACTIVATIONS.register("torch.nn.modules.activation.ReLU")(lambda m: (0.0, math.inf))
CLAMP_ACTIVATIONS.register("torch.nn.modules.activation.Hardtanh")(
    lambda m: (float(m.min_val), float(m.max_val)))  # type: ignore[attr-defined]


# the kernel mixins of convs (float, or packed outside QuantLinear), which clamp in their write-out
CONV_KERNEL_LAYERS = (DepthwiseKernel, PointwiseKernel, ConvGemmKernel)


def clamp_of(module: nn.Module) -> tuple[float, float] | None:
    """(lo, hi) of a registered clamp activation (or a subclass), else None."""
    clamp = CLAMP_ACTIVATIONS.for_class(type(module))
    return None if clamp is None else clamp(module)


def _kernel_layer(m: nn.Module | None) -> bool:
    """A layer whose every path applies ``output_clamp``, free to take one."""
    if isinstance(m, QuantLinear):
        plain = type(m)._matmul is QuantLinear._matmul  # variants with their own matmul add terms after it
        return plain and GROUP_ATTR not in m.__dict__ and m.output_clamp is None
    return isinstance(m, CONV_KERNEL_LAYERS) and m.output_clamp is None  # type: ignore[union-attr]


class FusedActivation:
    """Mixin placed before an activation class whose clamp now runs inside the layers feeding it."""

    @classmethod
    def fused_class(cls, base: type) -> type:
        """The (cached) ``Fused<base>`` class."""
        return mixed_class(cls, base, f"Fused{base.__name__}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x  # already clamped by the layer that produced it


@register_lowering(FusedActivation)
def _lowered_fused(act: nn.Module) -> Lowered:
    return IDENTITY  # its forward returns its input


def fuse_activations_(model: nn.Module) -> int:
    """Fuse every provably safe clamp activation of ``model`` into the kernel layers feeding it (see the module
    docstring); returns how many activation modules now pass their input through."""
    graphs, _ = module_graphs(model, lambda m: clamp_of(m) is not None and not isinstance(m, FusedActivation))
    feeders: dict[int, list[nn.Module] | None] = {}  # id(activation) -> its call sites' layers (None: not all safe)
    acts: dict[int, nn.Module] = {}
    for g in graphs:
        for node in g.graph.nodes:
            act = g.module(node)
            if act is None or isinstance(act, FusedActivation) or clamp_of(act) is None:
                continue
            acts[id(act)] = act
            one_input = len(node.args) == 1 and not node.kwargs
            src = fresh_source(g, node.args[0], (QuantLinear, *CONV_KERNEL_LAYERS)) if one_input else None
            layer = g.module(src)
            ok = src is not None and _kernel_layer(layer) and g.calls[str(src.target)] == 1
            sites = feeders.get(id(act), [])
            feeders[id(act)] = sites + [layer] if ok and sites is not None else None  # type: ignore[list-item]
    outside = called_outside(model, graphs)
    count = 0
    for key, layers in feeders.items():
        if layers is None or key in outside or any(id(m) in outside for m in layers):
            continue
        act = acts[key]
        clamp = clamp_of(act)
        for layer in layers:
            layer.output_clamp = clamp  # type: ignore[union-attr]
        act.__class__ = FusedActivation.fused_class(type(act))
        count += 1
    return count
