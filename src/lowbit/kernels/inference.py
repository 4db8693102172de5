"""``optimize_for_inference_``: the float-graph transforms a deployment runtime applies, in one explicit call.

Quantization speeds up the matmuls; the rest of a CNN's time goes to ops it does not touch (BatchNorm, the
per-call "same" padding copy). This applies, in place and from outside the model code:

1. ``fold_batchnorm_`` (``lowbit.kernels.fold_bn``): eval-mode BatchNorm2d folded into the packed or float conv
   before it (fp16 scale re-rounding, relative 2^-11 per scale, is the only approximation);
2. ``static_same_padding_`` (``lowbit.kernels.static_padding``): stride-1 TF-"same" convs pad inside the conv
   (exact);
3. ``inplace_activations_`` (``lowbit.kernels.inplace_act``): activations whose input nothing else reads clamp
   it in place (exact);
4. ``depthwise_kernels_`` (``lowbit.kernels.depthwise``): depthwise convs run on lowbit's channels-last kernel,
   any padding (including stride-2 TF "same") without a padded copy (float convs: float32 rounding; packed
   ones on its int8 form: int8 activations per image and channel, ``depthwise.int8_error_bound``); and
   ``conv_gemm_kernels_`` (``lowbit.kernels.conv_gemm``): dense convs with a spatial kernel (a CNN's stem) run
   im2col + one GEMM (packed: the kernels, with their activation rounding; float: the dense float kernel); and
   ``pointwise_kernels_``
   (``lowbit.kernels.pointwise``): float 1x1 convs run on lowbit's dense float kernel (float32 rounding), as a
   packed tower's small 1x1 convs do on their dequantized weights;
5. ``fuse_activations_`` (``lowbit.kernels.fuse_act``): ReLU / ReLU6 / Hardtanh whose every call site reads a
   kernel layer's fresh output are clamped in that layer's write-out and pass their input through (exact);
6. ``plan_forwards_`` (``lowbit.kernels.planned``): each traceable subtree holding a conv kernel layer (a CNN
   tower) runs its fx graph as straight-line code calling the kernels directly, identities removed (the same
   calls: bit-equal; guarded, rebuilt when the model changes).

The same call works on a float model (an honest "fp32 with the same graph optimisations" baseline) and on a
packed one. A folded model is for inference only: ``lowbit.save`` refuses it, so checkpoints keep their
BatchNorms; ``lowbit.load(packed_dir, optimize=True)`` applies this after loading (off by default, so a
loaded model is exactly the saved one).

Example:
    >>> r = optimize_for_inference_(model)  # doctest: +SKIP
    >>> (r.batchnorm.folded, r.static_padding, r.inplace_activations,  # doctest: +SKIP
    ...  r.depthwise_kernels, r.fused_activations, r.planned_forwards)
    (49, 12, 17, 16, 16, 1)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.kernels.conv_gemm import conv_gemm_kernels_
from lowbit.kernels.depthwise import depthwise_kernels_
from lowbit.kernels.fold_bn import FoldReport, fold_batchnorm_
from lowbit.kernels.fuse_act import fuse_activations_
from lowbit.kernels.inplace_act import inplace_activations_
from lowbit.kernels.planned import plan_forwards_
from lowbit.kernels.pointwise import pointwise_kernels_
from lowbit.kernels.static_padding import static_same_padding_


@dataclass(frozen=True)
class InferenceReport:
    """What ``optimize_for_inference_`` changed: the BatchNorm fold's report, the convs given static padding,
    the activation modules made in-place, the depthwise convs put on the kernel, the activation modules fused
    into the layers feeding them, the packed spatial convs put on the GEMM, the subtrees given a planned
    forward and the float 1x1 convs put on the dense kernel."""

    batchnorm: FoldReport
    static_padding: int
    inplace_activations: int
    depthwise_kernels: int = 0
    fused_activations: int = 0
    conv_gemm_kernels: int = 0
    planned_forwards: int = 0
    pointwise_kernels: int = 0


def optimize_for_inference_(model: nn.Module, fold_batchnorm: bool = True, static_padding: bool = True,
                            inplace_activations: bool = True, depthwise_kernels: bool = True,
                            fuse_activations: bool = True, plan_forwards: bool = True,
                            pointwise_kernels: bool = True) -> InferenceReport:
    """Fold BatchNorms, make stride-1 same-padding static, safe activations in-place, depthwise and float 1x1
    convs run on the kernels, clamp activations fuse into the kernel layers before them and CNN towers run
    planned forwards in ``model``, in place (see the module docstring). Raises ``LowbitError`` (before changing
    anything) if a BatchNorm2d is in training mode.
    """
    report = fold_batchnorm_(model) if fold_batchnorm else FoldReport()  # first: BNs between conv and activation
    padded = static_same_padding_(model) if static_padding else 0
    inplace = inplace_activations_(model) if inplace_activations else 0
    depthwise = depthwise_kernels_(model) if depthwise_kernels else 0
    gemm_convs = conv_gemm_kernels_(model) if depthwise_kernels else 0
    pointwise = pointwise_kernels_(model) if pointwise_kernels else 0
    fused = fuse_activations_(model) if fuse_activations else 0  # it reads which convs are on the kernel
    planned = plan_forwards_(model) if plan_forwards else 0  # last: it lowers the layers as the steps left them
    return InferenceReport(report, padded, inplace, depthwise, fused, gemm_convs, planned, pointwise)
