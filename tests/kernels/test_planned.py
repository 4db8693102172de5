"""Planned forwards (lowbit.kernels.planned): a CNN tower's graph calling its kernels directly.

The plan makes the same kernel calls as the modules, so it is bit-equal to the class's own forward on every ISA;
it follows every change the modules' own caches follow (in-place weight writes, assigned tensors and modules,
backends, hooks) by rebuilding, and steps aside where the modules' forwards would not run the kernels.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from lowbit.kernels.fold_bn import FoldedBatchNorm
from lowbit.kernels.graph import trace_module
from lowbit.kernels.inference import optimize_for_inference_
from lowbit.kernels.planned import PlannedCall, is_conv_kernel, planned
from lowbit.kernels.pointwise import PointwiseKernel
from lowbit.kernels.quant_linear import QuantConv2d1x1, QuantWeightParam, set_backend
from lowbit.quant.primitives import QuantSpec, to_packed
from tests.kernels.conftest import needs_kernels

GEN = torch.Generator().manual_seed(0)


def _packed_1x1(c_in: int, c_out: int, bits: int = 4, input_scale: bool = False) -> QuantConv2d1x1:
    w = torch.randn(c_out, c_in, 1, 1, generator=GEN) * 0.3
    scale = torch.rand(c_in, generator=GEN) + 0.5 if input_scale else None
    return QuantConv2d1x1.from_packed(to_packed(w, QuantSpec(bits, group_size=32)), torch.randn(c_out, generator=GEN),
                                      input_scale=scale)


class Block(nn.Module):
    """MBConv: packed expand -> BN -> ReLU6 -> depthwise (float or packed per-channel int8) -> BN -> ReLU6 ->
    packed project -> BN (+ the input)."""

    def __init__(self, c: int, packed_dw: bool, input_scale: bool = False) -> None:
        super().__init__()
        self.expand, self.bn0 = _packed_1x1(c, 4 * c, input_scale=input_scale), nn.BatchNorm2d(4 * c)
        self.dw, self.bn1 = nn.Conv2d(4 * c, 4 * c, 3, padding=1, groups=4 * c, bias=False), nn.BatchNorm2d(4 * c)
        if packed_dw:
            QuantWeightParam.attach(self.dw, to_packed(self.dw.weight.detach(), QuantSpec(8, group_size=9)))
        self.project, self.bn2 = _packed_1x1(4 * c, c), nn.BatchNorm2d(c)
        self.act = nn.ReLU6()
        for bn in (self.bn0, self.bn1, self.bn2):
            bn.running_mean.uniform_(-0.2, 0.2, generator=GEN)
            bn.running_var.uniform_(0.5, 1.5, generator=GEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn1(self.dw(self.act(self.bn0(self.expand(x))))))
        return self.bn2(self.project(h)) + x


class Tower(nn.Module):
    """A float stem, two blocks, a packed head and the spatial mean: a CNN image tower in miniature."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.act = nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU6()
        self.blocks = nn.ModuleList([Block(32, packed_dw=False, input_scale=True), Block(32, packed_dw=True)])
        self.head = _packed_1x1(32, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem(x))
        for block in self.blocks:
            x = block(x)
        return self.head(x).mean(dim=(2, 3))


def _planned_tower() -> Tower:
    needs_kernels()
    model = Tower().eval()
    report = optimize_for_inference_(model)
    assert report.planned_forwards == 1 and planned(model) is not None
    return model


def _own(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the model's class computes, without its plan."""
    return type(model).forward(model, x)


PIXELS = torch.randn(2, 3, 15, 14, generator=GEN)


def test_plan_is_bit_equal_and_replaces_the_dispatch(isa: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _planned_tower()
    plan = planned(model).current()  # type: ignore[union-attr]
    # 5 packed 1x1 convs, 2 depthwise convs and the stem's conv (im2col + the dense kernel, its ReLU6 fused) lowered;
    # 6 folded BatchNorms and the fused activations dropped
    assert plan is not None and (plan.lowered, plan.kept) == (8, 0) and plan.dropped >= 7
    with torch.inference_mode():
        for x in (PIXELS, PIXELS[:1], torch.randn(1, 3, 9, 9, generator=GEN)):  # each input size its own geometry
            assert torch.equal(model(x), _own(model, x))

        def boom(*_: Any) -> None:
            raise AssertionError("the class's forward ran")

        monkeypatch.setattr(Tower, "forward", boom)
        model(PIXELS)  # the plan alone


def test_float_tower_plans_too() -> None:
    """The float model with the same graph optimisations (the honest baseline) gets the same treatment."""
    needs_kernels()
    model = Tower().eval()
    for block in model.blocks:  # float 1x1 convs in place of the packed ones
        block.expand = nn.Conv2d(32, 128, 1)
        block.project = nn.Conv2d(128, 32, 1)
    model.head = nn.Conv2d(32, 64, 1)
    assert optimize_for_inference_(model).planned_forwards == 1
    with torch.no_grad():
        assert torch.equal(model(PIXELS), _own(model, PIXELS))
    # the stem conv (im2col + the dense kernel), per block: expand, depthwise, project, the head; every ReLU6 fused
    # into the kernel layer before it
    plan = planned(model).current()
    assert plan is not None and plan.lowered == 8
    assert sum(isinstance(m, PointwiseKernel) for m in model.modules()) == 5


def test_plan_follows_changes_to_the_model() -> None:
    model = _planned_tower()
    call = planned(model)
    assert call is not None
    with torch.no_grad():
        first = call.current()
        before = model(PIXELS)
        assert call.current() is first  # unchanged model: the same plan
        nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))  # modules built elsewhere (per request) change nothing
        model(PIXELS)
        assert call.current() is first

        # in-place writes (load_state_dict copies into the same tensors)
        state = model.state_dict()
        state["blocks.0.project.bias"] = state["blocks.0.project.bias"] + 1.0
        model.load_state_dict(state)
        after = model(PIXELS)
        assert not torch.equal(after, before) and torch.equal(after, _own(model, PIXELS))
        assert call.current() is not first

        # an assigned submodule
        model.blocks[1].project = _packed_1x1(128, 32)
        assert torch.equal(model(PIXELS), _own(model, PIXELS))

        # another backend (the reference path: float activations)
        set_backend(model, "reference")
        assert torch.equal(model(PIXELS), _own(model, PIXELS))
        set_backend(model, "cpu")

        # an attribute the lowering captured (lowbit's classes invalidate plans when one is set)
        model.head.output_clamp = (0.0, 0.5)
        clamped = model(PIXELS)
        assert torch.equal(clamped, _own(model, PIXELS)) and clamped.max() <= 0.5
        model.head.output_clamp = None

        # a hook added to a lowered layer sees its calls
        seen: list[tuple[int, ...]] = []
        handle = model.blocks[0].dw.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
        assert torch.equal(model(PIXELS), _own(model, PIXELS)) and len(seen) == 2
        handle.remove()
        model(PIXELS)
        assert len(seen) == 2


def test_plan_steps_aside_where_the_kernels_would() -> None:
    model = _planned_tower()
    calls = []
    own = Tower.forward

    def counted(self: Tower, x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return own(self, x)

    Tower.forward = counted  # type: ignore[method-assign]
    try:
        x = PIXELS.clone().requires_grad_(True)
        y = model(x)  # autograd recording: the modules' own (differentiable) paths
        y.sum().backward()
        assert x.grad is not None and len(calls) == 1
        with torch.no_grad():
            model.train()
            model(PIXELS)  # training mode
            model.eval()
            assert len(calls) == 2
            model(PIXELS)  # the plan again
            assert len(calls) == 2
        graph = trace_module(model, is_conv_kernel)  # tracing sees the class's forward, module by module
        assert any(n.op == "call_module" and n.target == "blocks.0.expand" for n in graph.nodes)
    finally:
        Tower.forward = own  # type: ignore[method-assign]


def test_copies_plan_their_own_weights() -> None:
    model = _planned_tower()
    with torch.no_grad():
        before = model(PIXELS)
        twin = copy.deepcopy(model)
        assert isinstance(twin.forward, PlannedCall) and twin.forward.module is twin
        with torch.no_grad():
            twin.head.bias.add_(1.0)
        assert torch.equal(twin(PIXELS), _own(twin, PIXELS)) and not torch.equal(twin(PIXELS), before)
        assert torch.equal(model(PIXELS), before)


def test_untraceable_and_kernel_free_models_are_left_alone() -> None:
    needs_kernels()

    class Branchy(Tower):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) if x.sum() > 0 else -super().forward(x)  # data-dependent: fx cannot trace

    model = Branchy().eval()
    assert optimize_for_inference_(model).planned_forwards == 2  # its blocks are planned instead
    assert planned(model) is None and all(planned(b) is not None for b in model.blocks)
    with torch.no_grad():
        assert torch.equal(model(PIXELS), _own(model, PIXELS))
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, dilation=2), FoldedBatchNorm(8), nn.ReLU()).eval()  # no kernel runs it
    assert optimize_for_inference_(plain).planned_forwards == 0 and planned(plain) is None
