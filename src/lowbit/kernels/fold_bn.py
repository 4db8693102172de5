"""Fold eval-mode BatchNorm2d into the conv before it: the inference transform deployment runtimes apply.

A conv followed by a BatchNorm in eval mode computes ``y = a * conv(x, W) + (beta - a * mean) + a * b`` per
output channel, ``a = gamma / sqrt(var + eps)``. Folding moves ``a`` into the conv's weight and the shift into
its bias, so the BatchNorm (one extra pass over every activation: ~15% of lit-fashion's image tower at batch 1)
disappears and is replaced by ``FoldedBatchNorm`` (an ``nn.Identity`` that marks the fold).

``fold_batchnorm_(model)`` handles three kinds of conv before a BatchNorm2d:

- a packed ``QuantConv2d1x1`` (the 1x1 convs on the kernels) and a ``QuantWeightParam`` conv (depthwise, stem):
  each output channel's fp16 group ``scales`` are multiplied by ``a`` (exact for the packed codes, which do
  not change: ``W_q[n, k] = (q - z) * s[n, g]`` is linear in ``s``) and re-rounded to fp16; the bias becomes
  ``a * (b - mean) + beta`` in float32 (created when the conv had none);
- a float ``nn.Conv2d`` (any subclass, e.g. efficientnet's ``Conv2dDynamicSamePadding``): torch's own
  ``torch.nn.utils.fusion.fuse_conv_bn_eval``, so the same call builds an honest "fp32 with BN folded" baseline.

Rounding bound (the only approximation; float32 rounding of the bias aside): each new scale is the fp16
rounding of ``s * a`` (computed in float64), so per scale

    |s' - s * a| <= 2^-11 * |s * a|     when |s * a| >= 2^-14 (fp16 normal range),
    |s' - s * a| <= 2^-25               below (fp16 subnormals, spacing 2^-24),

hence every dequantized weight is within the same relative 2^-11 of the exact folded ``a * W_q`` and each
conv output within ``2^-11 * (|x| conv |a * W_q|)`` (plus 2^-25 * sum|q - z| |x| for subnormal scales) of the
unfolded conv + BatchNorm. A scale whose product rounds to infinity in fp16 (|s * a| >= 65520) is not
folded: that pair is skipped and listed in the report.

Which conv feeds which BatchNorm is read from the module graph, never from names: each subtree holding a
BatchNorm2d is traced with ``torch.fx`` (``lowbit.kernels.graph``; the modules are not rewritten, the graph
only locates pairs), falling back to its children where a forward does not trace. A pair
is folded only when the BatchNorm's sole input is the conv's output, the conv's output has no other user and
each module is called exactly once in the graph. The model keeps running its own forward; the graph records the
path that the current configuration takes (branches on Python attributes are taken as they are now), so apply
the fold after any change of architecture.

A BatchNorm in training mode (batch statistics, not running ones) cannot be folded: ``fold_batchnorm_``
refuses the whole model with one ``LowbitError`` before changing anything. A folded model is an inference
model: ``lowbit.save`` refuses it (save the unfolded model, fold after loading: ``lowbit.load(dir,
optimize=True)``); packed checkpoints therefore keep their BatchNorms and round-trip unchanged.

Example:
    >>> report = fold_batchnorm_(model.vision)  # doctest: +SKIP
    >>> report.folded  # doctest: +SKIP
    49
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from lowbit.errors import LowbitError
from lowbit.kernels.graph import module_graphs
from lowbit.kernels.quant_linear import QuantConv2d1x1, QuantLinear, QuantWeightParam
from lowbit.kernels.variants import ExtraPackedMixin

SCALE_REL_BOUND = 2.0**-11  # fp16 round-to-nearest, normal range
SCALE_ABS_BOUND = 2.0**-25  # fp16 subnormals (spacing 2^-24)


class FoldedBatchNorm(nn.Identity):
    """Stands where a BatchNorm2d was folded into the conv before it (identity; marks a folded model)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def extra_repr(self) -> str:
        return f"{self.num_features}, folded into the preceding conv"


@dataclass
class FoldReport:
    """What ``fold_batchnorm_`` did: ``pairs`` folded as (conv path, BatchNorm path), ``skipped`` BatchNorms
    with the reason, ``untraced`` subtrees whose forward does not trace (their BatchNorms stay)."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    untraced: list[str] = field(default_factory=list)

    @property
    def folded(self) -> int:
        return len(self.pairs)


def _graph_pairs(model: nn.Module, report: FoldReport) -> list[tuple[str, str]]:
    """(conv path, BatchNorm path) pairs that the module graphs of ``model`` prove."""
    graphs, report.untraced = module_graphs(model, lambda m: isinstance(m, nn.BatchNorm2d))
    pairs = []
    for g in graphs:
        for node in g.graph.nodes:
            if not isinstance(g.module(node), nn.BatchNorm2d):
                continue
            src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
            conv = g.module(src)
            if conv is None or not _is_conv(conv):
                report.skipped.append((g.path(node), "its input is not the output of a conv module"))
            elif len(src.users) != 1 or g.calls[str(src.target)] != 1 or g.calls[str(node.target)] != 1:
                report.skipped.append((g.path(node), "the conv's output has other users, or a module is called twice"))
            else:
                pairs.append((g.path(src), g.path(node)))
    return pairs


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv2d, QuantConv2d1x1))


def _unsupported(conv: nn.Module) -> str | None:
    """Why ``conv`` cannot take a fold, or None."""
    if isinstance(conv, ExtraPackedMixin):
        return f"{type(conv).__name__} stores a variant format (extra buffers) that the fold does not rescale"
    if isinstance(conv, QuantLinear) and type(conv)._matmul is not QuantLinear._matmul:
        return f"{type(conv).__name__} has its own matmul"
    return None


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, shift) in float64 with bn(y) == a * y + shift per channel, from the running statistics."""
    var, mean = bn.running_var.double(), bn.running_mean.double()
    a = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        a = a * bn.weight.detach().double()
    shift = -a * mean
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return a, shift


def fold_scales(scales: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """fp16 ``scales`` [N, G] times ``a`` [N] per row, re-rounded to fp16 (bound in the module docstring)."""
    return (scales.double() * a.reshape(-1, 1)).to(torch.float16)


def _fold_packed(conv: nn.Module, bn: nn.BatchNorm2d) -> str | None:
    """Fold ``bn`` into the packed conv in place; the reason it cannot, or None."""
    a, shift = _bn_affine(bn)
    scales = fold_scales(conv.scales, a)
    if not bool(torch.isfinite(scales).all()):
        return "a folded scale overflows fp16"
    bias = conv.bias
    new_bias = (shift if bias is None else a * bias.detach().double() + shift).to(
        torch.float32 if bias is None else bias.dtype)
    conv.scales = scales  # a new tensor: the kernels' prepared weight and caches rebuild
    if isinstance(conv, QuantLinear):
        conv.register_buffer("bias", new_bias)  # QuantLinear keeps its bias as a buffer
    else:
        conv.bias = nn.Parameter(new_bias, requires_grad=False)
    conv._drop_cache()
    return None


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` at every path where ``old`` is registered (a module may be registered under several)."""
    paths = [p for p, m in model.named_modules(remove_duplicate=False) if m is old]
    for path in paths:
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, new)


@torch.no_grad()
def fold_batchnorm_(model: nn.Module) -> FoldReport:
    """Fold every eval-mode BatchNorm2d of ``model`` into the conv that feeds it, in place.

    Packed convs get rescaled fp16 scales and a float32 bias, float convs ``fuse_conv_bn_eval``; each folded
    BatchNorm becomes a ``FoldedBatchNorm``. Raises ``LowbitError`` (changing nothing) if any BatchNorm2d of
    ``model`` is in training mode. Returns the pairs folded and the BatchNorms left with the reason.
    """
    training = [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and m.training]
    if training:
        raise LowbitError(f"cannot fold BatchNorm in training mode ({len(training)} modules, first "
                          f"{training[0]!r}): it normalises by batch statistics; call model.eval() first")
    report = FoldReport()
    for conv_path, bn_path in _graph_pairs(model, report):
        conv, bn = model.get_submodule(conv_path), model.get_submodule(bn_path)
        reason = _unsupported(conv)
        if reason is None and bn.running_var is None:
            reason = "the BatchNorm tracks no running statistics"
        if reason is None and int(conv.weight_shape[0] if isinstance(conv, QuantLinear) else conv.out_channels) \
                != bn.num_features:
            reason = "conv output channels differ from the BatchNorm's features"
        if reason is None:
            if isinstance(conv, (QuantLinear, QuantWeightParam)):
                reason = _fold_packed(conv, bn)
            else:
                mode = conv.training  # a conv computes the same in both modes; torch's fusion asserts eval
                fused = fuse_conv_bn_eval(conv.eval(), bn).train(mode)
                conv.train(mode)
                fused.weight.requires_grad_(conv.weight.requires_grad)
                fused.bias.requires_grad_(conv.weight.requires_grad)
                _replace(model, conv, fused)
        if reason is not None:
            report.skipped.append((bn_path, reason))
            continue
        _replace(model, bn, FoldedBatchNorm(bn.num_features))
        report.pairs.append((conv_path, bn_path))
    return report


def is_folded(model: nn.Module) -> bool:
    """True if ``fold_batchnorm_`` folded any BatchNorm of ``model``."""
    return any(isinstance(m, FoldedBatchNorm) for m in model.modules())
