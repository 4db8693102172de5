"""Static padding for TF-style "same" convs at stride 1: the conv pads inside itself, no ``F.pad`` per call.

EfficientNet ports (``efficientnet_lite_pytorch.utils.Conv2dDynamicSamePadding``) compute TensorFlow's "same"
padding from the input size in every forward and apply it with ``F.pad`` before an unpadded conv: a copy of
every depthwise conv's input (``constant_pad_nd`` + ``fill_``: ~10% of lit-fashion's image tower at batch 1).
At stride 1 the total padding is ``(k - 1) * d`` whatever the input size, split low side first
(``pad // 2``, ``pad - pad // 2``): for an odd kernel that is symmetric, ``(k - 1) * d / 2`` on each side, which
the conv's own zero padding computes without the copy (same values: zero padding either way).

``static_same_padding_(model)`` re-classes each such conv in place to ``Static<Class>`` (a subclass of its
class, so ``isinstance``, the state dict and packed weights are unchanged) whose forward calls ``F.conv2d``
with that symmetric padding while the conv is at stride 1 with odd kernels and zero padding, and falls back
to the class's own forward otherwise (a later change of stride stays correct; dilation is read per call).

Which classes pad this way is knowledge of their forward, so it is a registry (``SAME_PADDING_CONVS``: the
"module.QualName" of the class), never guessed from names, filled by the family specs' ``same_padding_convs``
(``lowbit.models.spec``; e.g. the EfficientNet convs of ``lowbit.models.lit``).

Example:
    >>> static_same_padding_(model.vision)  # doctest: +SKIP
    16
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.kernels.class_swap import mixed_class
from lowbit.kernels.lowering import Lowered, PlanWatched, register_lowering
from lowbit.registry import Registry

# "module.QualName" of a conv class whose forward applies TF "same" padding (total (k-1)*d at stride 1, low side
# pad // 2) with F.pad before an unpadded conv.
SAME_PADDING_CONVS: Registry[str] = Registry("dynamic same-padding conv class")


def registered_same_padding(module: nn.Module) -> bool:
    """True if ``module``'s class (or a base of it) is in ``SAME_PADDING_CONVS``."""
    return SAME_PADDING_CONVS.for_class(type(module)) is not None


def _symmetric_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """The conv's "same" padding per side if it is symmetric without F.pad (stride 1, odd kernel), else None."""
    kh, kw = conv.kernel_size
    if tuple(conv.stride) != (1, 1) or kh % 2 == 0 or kw % 2 == 0 or tuple(conv.padding) != (0, 0) \
            or conv.padding_mode != "zeros":
        return None
    return (kh - 1) * conv.dilation[0] // 2, (kw - 1) * conv.dilation[1] // 2


class StaticSamePadding(PlanWatched):
    """Mixin placed before a registered class: stride-1 odd-kernel forwards pad inside ``F.conv2d``."""

    # what its lowering (lowered_static_padding) captures: setting one invalidates planned forwards
    _plan_reads = frozenset({"stride", "padding", "kernel_size", "dilation", "groups"})

    @classmethod
    def static_class(cls, base: type) -> type:
        """The (cached) ``Static<base>`` class."""
        return mixed_class(cls, base, f"Static{base.__name__}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv: nn.Conv2d = self  # type: ignore[assignment]
        pad = _symmetric_padding(conv)
        if pad is None:
            return super().forward(x)  # type: ignore[misc]
        return F.conv2d(x, conv.weight, conv.bias, 1, pad, conv.dilation, conv.groups)


@register_lowering(StaticSamePadding)
def lowered_static_padding(conv: nn.Module) -> Lowered | None:
    """The padded ``F.conv2d`` of the forward (``lowbit.kernels.lowering``) while the padding is static."""
    pad = _symmetric_padding(conv)  # type: ignore[arg-type]
    if pad is None:
        return None
    w, b, dilation, groups = conv.weight, conv.bias, conv.dilation, conv.groups

    def static_conv(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, b, 1, pad, dilation, groups)

    return Lowered(static_conv)


def static_same_padding_(model: nn.Module) -> int:
    """Re-class every registered same-padding conv of ``model`` at stride 1 with odd kernels; returns how many.

    Idempotent; outputs are unchanged (zero padding of the same widths).
    """
    count = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and not isinstance(m, StaticSamePadding) and registered_same_padding(m) \
                and _symmetric_padding(m) is not None:
            m.__class__ = StaticSamePadding.static_class(type(m))
            count += 1
    return count
