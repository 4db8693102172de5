"""How a module's forward is called directly by a planned forward (``lowbit.kernels.planned``): the registry.

A CNN tower at batch 1 spends as long in Python as in its kernels: each block dispatches eight modules, and
each kernel layer re-checks its cached weight, padding and backend per call (lit-fashion's w4 image tower:
about half of its time). A *lowering* turns one module, as it is now, into a plain function ``f(x) -> y`` that
computes exactly what its forward would (the same kernel call with the same arguments, bit for bit), its
per-call decisions taken once. ``LOWERINGS`` maps a module class (its "module.QualName"; subclasses match
through their MRO, nearest first) to a rule ``rule(module) -> Lowered | None``: None keeps the module's own
forward, ``IDENTITY`` drops a module that returns its input. Rules live beside the forward they mirror (the
kernel layers in ``fast``, ``depthwise``, ``static_padding``, ``fuse_act``); torch's own plain modules are here.

What a lowered function captured must not change unseen. The modules of planned subtrees are *watched*
(``watch_modules``). Tensors: the plan re-checks their versions before each call, and a parameter, buffer or
submodule assigned to a watched module bumps ``plan_epoch`` (torch's global registration hooks; modules being
built elsewhere, e.g. per request, are not watched and change nothing). Attributes: lowbit's kernel classes declare
the ones their lowering reads (``PlanWatched._plan_reads``) and bump the epoch when a watched one's is set; a torch
module's lowering names its instance attributes in ``Lowered.reads``, re-checked per call. Hooks: a lowered
module's hook dicts become ``WatchedHooks``, which bump the epoch when a hook is added or removed. A bumped epoch
makes every plan rebuild at its next call.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.registry import Registry, qualname

_EPOCH = [1]


def plan_epoch() -> int:
    """The current epoch: a plan made in an earlier one is rebuilt before it runs."""
    return _EPOCH[0]


def invalidate_plans(*_: Any) -> None:
    """Make every plan rebuild at its next call (also the signature of torch's registration hooks)."""
    _EPOCH[0] += 1


_WATCHED: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # the modules of planned subtrees
_HOOKED = [False]


def watch_modules(modules: Iterable[nn.Module]) -> None:
    """Watch ``modules`` (a planned subtree's): assignments to them invalidate plans from now on."""
    if not _HOOKED[0]:  # once per process: torch's global registration hooks
        _HOOKED[0] = True
        nn.modules.module.register_module_parameter_registration_hook(_assigned)
        nn.modules.module.register_module_buffer_registration_hook(_assigned)
        nn.modules.module.register_module_module_registration_hook(_assigned)
    _WATCHED.update(modules)


def _assigned(module: nn.Module, name: str, value: Any) -> None:
    if module in _WATCHED:
        invalidate_plans()


class WatchedHooks(OrderedDict):  # type: ignore[type-arg]
    """A module's forward (pre-)hook dict that invalidates plans when a hook is added or removed."""

    def __setitem__(self, key: Any, value: Any) -> None:
        invalidate_plans()
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        invalidate_plans()
        super().__delitem__(key)


def watch_hooks(module: nn.Module) -> None:
    """Swap ``module``'s hook dicts for ``WatchedHooks`` (same content) once."""
    for name in ("_forward_hooks", "_forward_pre_hooks"):
        hooks = module.__dict__[name]
        if not isinstance(hooks, WatchedHooks):
            module.__dict__[name] = WatchedHooks(hooks)


class PlanWatched:
    """Base of lowbit's kernel classes with a lowering: setting one of ``_plan_reads`` (the attributes the lowering
    captured) invalidates plans."""

    _plan_reads: frozenset[str] = frozenset()

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._plan_reads and self in _WATCHED:
            invalidate_plans()
        super().__setattr__(name, value)


@dataclass(frozen=True)
class Lowered:
    """A module's forward as a function of its one input (None for ``IDENTITY``: the input itself), valid while
    the module's tensors and the instance attributes ``reads`` are unchanged (lowbit's own classes leave
    ``reads`` empty: they are ``PlanWatched``)."""

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
