"""How a module's forward is called directly by a planned forward (``lowbit.kernels.planned``): the registry.

A CNN tower at batch 1 spends as long in Python as in its kernels: each block dispatches eight modules, and
each kernel layer re-checks its cached weight, padding and backend per call (lit-fashion's w4 image tower:
about half of its time). A *lowering* turns one module, as it is now, into a plain function ``f(x) -> y`` that
computes exactly what its forward would (the same kernel call with the same arguments, bit for bit), its
per-call decisions taken once. ``LOWERINGS`` maps a module class (its "module.QualName"; subclasses match
through their MRO, nearest first) to a rule ``rule(module) -> Lowered | None``: None keeps the module's own
forward, ``IDENTITY`` drops a module that returns its input. Rules live beside the forward they mirror (the
kernel layers in ``fast``, ``depthwise``, ``static_padding``, ``fuse_act``); torch's own plain modules are here.

A ``Lowered`` names the attributes its function read (``reads``): the plan re-checks them, with the identity and
version of the module's tensors, before every call, and is rebuilt when one changed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.registry import Registry, qualname


@dataclass(frozen=True)
class Lowered:
    """A module's forward as a function of its one input (None for ``IDENTITY``: the input itself), valid while
    the attributes ``reads`` (read with ``getattr(module, name, None)``) and the module's tensors are unchanged."""

    fn: Callable[[torch.Tensor], torch.Tensor] | None
    reads: tuple[str, ...] = ()


IDENTITY = Lowered(None)
LoweringRule = Callable[[nn.Module], "Lowered | None"]
LOWERINGS: Registry[LoweringRule] = Registry("lowering")


def lowering_of(module: nn.Module) -> Lowered | None:
    """``module`` lowered by the rule of its class (or nearest base), None where none applies. A module with its
    own forward hooks is never lowered (the hooks must see the call)."""
    rule = LOWERINGS.for_class(type(module))
    if rule is None or module._forward_hooks or module._forward_pre_hooks:
        return None
    return rule(module)


def register_lowering(cls: type) -> Callable[[LoweringRule], LoweringRule]:
    """Decorator: ``rule`` lowers instances of ``cls`` (and its subclasses without a nearer rule)."""
    return LOWERINGS.register(qualname(cls))


@register_lowering(nn.Identity)
def _identity(module: nn.Module) -> Lowered:
    return IDENTITY


@register_lowering(nn.Conv2d)
def _conv2d(conv: nn.Module) -> Lowered | None:
    # only convs that run nn.Conv2d's own forward (subclasses with their own padding logic keep theirs)
    if type(conv).forward is not nn.Conv2d.forward or conv.padding_mode != "zeros":
        return None
    w, b = conv.weight, conv.bias  # a packed conv's weight: its cached dequantized tensor (guarded by the plan)
    stride, padding, dilation, groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def conv2d(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, b, stride, padding, dilation, groups)

    return Lowered(conv2d, ("stride", "padding", "dilation", "groups", "padding_mode"))


@register_lowering(nn.Hardtanh)
def _hardtanh(act: nn.Module) -> Lowered | None:
    if type(act).forward is not nn.Hardtanh.forward:
        return None
    lo, hi, inplace = act.min_val, act.max_val, act.inplace

    def hardtanh(x: torch.Tensor) -> torch.Tensor:
        return F.hardtanh(x, lo, hi, inplace)

    return Lowered(hardtanh, ("min_val", "max_val", "inplace"))


@register_lowering(nn.ReLU)
def _relu(act: nn.Module) -> Lowered | None:
    if type(act).forward is not nn.ReLU.forward:
        return None
    inplace = act.inplace

    def relu(x: torch.Tensor) -> torch.Tensor:
        return F.relu(x, inplace)

    return Lowered(relu, ("inplace",))
