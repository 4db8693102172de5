"""Planned forwards: a CNN tower's traced graph run as straight-line code that calls its kernels directly.

After ``optimize_for_inference_``'s other steps, lit-fashion's w4 image tower at batch 1 spent about as long in
Python as in its kernels: 16 blocks of eight module dispatches, each kernel layer re-checking its cached weight,
padding and backend per call (1x1 convs and depthwise convs: 3.2 ms as modules, 1.7 ms as the same kernel calls
in a bare loop, 1 thread). ``plan_forwards_(model)`` gives each ``torch.fx``-traceable subtree holding a conv
kernel layer (``lowbit.kernels.graph.module_graphs``: lit-fashion's and llava-fashion-hd's ``vision``) a *plan*:
its graph with every module that has a lowering (``lowbit.kernels.lowering``) replaced by that function and
every identity (folded BatchNorms, fused activations) removed, compiled by fx to Python code
(``fx.GraphModule``); other modules stay calls of the module. The plan makes the same kernel calls with the
same arguments in the same order, so outputs are bit-equal (tested).

The plan is the subtree's ``forward`` (an instance attribute, ``PlannedCall``, over its class's own forward:
the module's class, state dict and repr are unchanged). It runs only where the module's forward would run the
kernels: eval mode, CPU float32 tensor inputs, no autograd recording (grad mode off, or nothing requiring
grad), no tracing (torch.jit / ONNX export, fx, dynamo), no global module hooks. It rebuilds itself when the
model changed (``lowbit.kernels.lowering``): a parameter, buffer or submodule assigned in it, a captured attribute
set, a hook added to a lowered module (then kept as a module call, so the hook sees it), or, checked per call,
an in-place write to a lowered module's tensor or a changed attribute of a lowered torch module. Python
attributes of the traced-through modules (branches such as a block's ``expand_ratio``) are taken as they were
when planned, as fx records them; re-run ``plan_forwards_`` (or ``optimize_for_inference_``) after changing
those. Copies (``deepcopy``, pickle) plan again at their first call.

Example:
    >>> plan_forwards_(model)  # doctest: +SKIP
    1
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from lowbit.kernels.conv_gemm import ConvGemmKernel
from lowbit.kernels.depthwise import DepthwiseKernel
from lowbit.kernels.graph import module_graphs, trace_module
from lowbit.kernels.lowering import (
    IDENTITY,
    LOWERINGS,
    Lowered,
    lowering_of,
    plan_epoch,
    watch_hooks,
    watch_modules,
)
from lowbit.kernels.pointwise import PointwiseKernel
from lowbit.kernels.quant_linear import QuantConv2d1x1

_FAILED = "failed"  # PlannedCall.plan after a build that could not plan (not retried until planned again)


def is_conv_kernel(module: nn.Module) -> bool:
    """A conv on lowbit's kernels: what makes a subtree worth planning."""
    return isinstance(module, (DepthwiseKernel, ConvGemmKernel, PointwiseKernel, QuantConv2d1x1))


def _leaf(module: nn.Module) -> bool:
    return is_conv_kernel(module) or LOWERINGS.for_class(type(module)) is not None


_VERSION = operator.attrgetter("_version")


class _Guard:
    """What a plan assumed beyond the epoch (``lowbit.kernels.lowering``), re-checked before each call in C-level
    passes: the versions of the lowered modules' tensors (in-place writes, ``load_state_dict``) and the values of
    the torch modules' attributes their lowering read (~17 us on lit-fashion's image tower)."""

    def __init__(self) -> None:
        self.epoch = 0
        self.versioned: list[torch.Tensor] = []  # inference tensors have no version counter
        self.params: list[torch.Tensor] = []  # parameters the lowered functions hold (the autograd check)
        self.dicts: list[dict[str, Any]] = []  # instance dicts and names of the attributes read
        self.names: list[str] = []
        self.versions: list[int] = []
        self.values: list[Any] = []

    def lowered(self, module: nn.Module, reads: tuple[str, ...]) -> None:
        for t in (*module._parameters.values(), *module._buffers.values()):
            if t is not None and not t.is_inference():
                self.versioned.append(t)
            if isinstance(t, nn.Parameter):
                self.params.append(t)
        for name in reads:
            if name in module.__dict__:  # instance attributes (class-level ones are not per-module settings)
                self.dicts.append(module.__dict__)
                self.names.append(name)
        watch_hooks(module)

    def seal(self) -> None:
        self.epoch = plan_epoch()
        self.versions = list(map(_VERSION, self.versioned))
        self.values = list(map(dict.get, self.dicts, self.names))

    def holds(self) -> bool:
        return (self.epoch == plan_epoch() and list(map(_VERSION, self.versioned)) == self.versions
                and list(map(dict.get, self.dicts, self.names)) == self.values)


@dataclass
class ForwardPlan:
    """A module's planned forward: the compiled graph's ``forward``, its guard and what it replaced."""

    forward: Any
    guard: _Guard
    lowered: int
    dropped: int
    kept: int


def build_plan(root: nn.Module) -> ForwardPlan | None:
    """``root``'s forward traced and lowered (see the module docstring); None where it does not trace or no module
    in it has a lowering."""
    try:
        graph = trace_module(root, _leaf)
    except Exception:  # noqa: BLE001 - a forward fx cannot trace keeps running as it is
        return None
    guard = _Guard()
    lowered = dropped = kept = 0
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        module = root.get_submodule(str(node.target))
        low: Lowered | None = lowering_of(module) if len(node.args) == 1 and not node.kwargs else None
        if low is None:
            kept += 1
            continue
        guard.lowered(module, low.reads)
        if low is IDENTITY:
            node.replace_all_uses_with(node.args[0])
            dropped += 1
        else:
            with graph.inserting_after(node):
                call = graph.call_function(low.fn, node.args)  # type: ignore[arg-type]
            node.replace_all_uses_with(call)
            lowered += 1
        graph.erase_node(node)
    if lowered == 0:
        return None
    graph.lint()
    module = fx.GraphModule(root, graph)
    watch_modules(root.modules())  # assignments to them invalidate the plan (lowbit.kernels.lowering)
    guard.seal()
    return ForwardPlan(module.forward, guard, lowered, dropped, kept)


def _fx_tracing() -> bool:
    symbolic = getattr(fx._symbolic_trace, "is_fx_symbolic_tracing", None)  # torch >= 2.7
    return bool(symbolic() if symbolic is not None else fx._symbolic_trace.is_fx_tracing())


def _global_hooks() -> bool:
    hooks = torch.nn.modules.module
    return bool(getattr(hooks, "_global_forward_hooks", None) or getattr(hooks, "_global_forward_pre_hooks", None)
                or getattr(hooks, "_global_forward_hooks_always_called", None))


class PlannedCall:
    """A planned module's ``forward``: its plan where the plan can run (module docstring), else its class's own
    forward."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.plan: ForwardPlan | str | None = None  # built at the first call it can serve

    def can_run(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        if self.module.training or torch._C._get_tracing_state() is not None or _fx_tracing() \
                or torch.compiler.is_compiling() or _global_hooks():
            return False
        grad = torch.is_grad_enabled()
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and (
                    value.dtype != torch.float32 or not value.is_cpu or (grad and value.requires_grad)):
                return False
        return True

    def current(self) -> ForwardPlan | None:
        """The plan, (re)built when it is missing or its guard no longer holds; None where it cannot plan."""
        plan = self.plan
        if plan is _FAILED:
            return None
        if plan is None or not plan.guard.holds():  # type: ignore[union-attr]
            plan = self.plan = build_plan(self.module) or _FAILED
        return None if plan is _FAILED else plan  # type: ignore[return-value]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.can_run(args, kwargs):
            plan = self.current()
            if plan is not None and not (torch.is_grad_enabled() and any(p.requires_grad for p in plan.guard.params)):
                return plan.forward(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    # A copy of the module gets its own PlannedCall, planned at its first call (the plan holds this module's
    # tensors and prepared weights).
    def __deepcopy__(self, memo: dict[int, Any]) -> PlannedCall:
        return PlannedCall(memo.get(id(self.module), self.module))

    def __reduce__(self) -> tuple[Any, ...]:
        return PlannedCall, (self.module,)


def planned(module: nn.Module) -> PlannedCall | None:
    """The module's ``PlannedCall`` if ``plan_forwards_`` gave it one."""
    call = module.__dict__.get("forward")
    return call if isinstance(call, PlannedCall) else None


def plan_forwards_(model: nn.Module) -> int:
    """Plan the forward of every traceable subtree of ``model`` holding a conv kernel layer (see the module
    docstring); returns how many were planned. Idempotent: a planned subtree is planned afresh."""
    graphs, _ = module_graphs(model, is_conv_kernel)
    count = 0
    for g in graphs:
        call = PlannedCall(g.root)
        with torch.no_grad():
            call.plan = build_plan(g.root) or _FAILED
        if call.plan is not _FAILED:
            g.root.forward = call  # type: ignore[method-assign]  # an instance attribute over the class's forward
            count += 1
        elif planned(g.root) is not None:
            del g.root.forward
    return count
