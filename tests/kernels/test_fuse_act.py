"""Clamp activations fused into the kernel layers before them (lowbit.kernels.fuse_act, the kernels' write-out).

The kernels clamp after the bias, so a fused layer equals the unfused layer followed by the activation: bit for
bit on the reference backend, and on the kernels (which round the same int8 activations either way) on every
ISA, on both the fused GEMV (M <= 4) and the panel GEMM. Only call sites the graph proves are fused.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lowbit.kernels import fast
from lowbit.kernels.depthwise import depthwise_kernels_
from lowbit.kernels.fold_bn import FoldedBatchNorm
from lowbit.kernels.fuse_act import FusedActivation, clamp_of, fuse_activations_
from lowbit.kernels.quant_linear import QuantConv2d1x1, QuantLinear, set_backend
from lowbit.quant.primitives import QuantSpec, to_packed
from tests.kernels.conftest import needs_kernels

GEN = torch.Generator().manual_seed(0)


def _packed_1x1(c_in: int, c_out: int, bits: int = 4) -> QuantConv2d1x1:
    w = torch.randn(c_out, c_in, 1, 1, generator=GEN) * 0.3
    bias = torch.randn(c_out, generator=GEN)
    return QuantConv2d1x1.from_packed(to_packed(w, QuantSpec(bits, group_size=32)), bias)


class Block(nn.Module):
    """expand (packed 1x1) -> identity -> act; depthwise -> act (the same module: both sites fusable);
    project (packed) -> ``head_act``, which also runs on a float conv's output (not fusable); ``twice`` feeds
    ``tanh6`` and is read again (not fusable)."""

    def __init__(self) -> None:
        super().__init__()
        self.expand, self.bn = _packed_1x1(32, 64), FoldedBatchNorm(64)
        self.dw = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.project, self.float_conv = _packed_1x1(64, 32), nn.Conv2d(32, 32, 1)
        self.twice = _packed_1x1(32, 32)
        self.act, self.head_act, self.tanh6 = nn.ReLU6(), nn.ReLU(), nn.Hardtanh(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.dw(self.act(self.bn(self.expand(x)))))
        p = self.head_act(self.project(h))
        t = self.twice(p)
        return self.head_act(self.float_conv(p)) + self.tanh6(t) + t


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_only_proven_sites_fuse_and_outputs_are_equal(backend: str) -> None:
    if backend == "cpu":
        needs_kernels()
    model = Block().eval()
    set_backend(model, backend)
    x = torch.randn(2, 32, 7, 6, generator=GEN) * 2
    xg = x.clone().requires_grad_(True)
    depthwise_kernels_(model)
    before_recording = model(xg)  # autograd: the layers' fallback (float) paths
    with torch.no_grad():
        before = model(x)
        assert fuse_activations_(model) == 1 and fuse_activations_(model) == 0  # idempotent
        assert isinstance(model.act, FusedActivation) and isinstance(model.act, nn.ReLU6)
        assert model.expand.output_clamp == model.dw.output_clamp == (0.0, 6.0)
        assert not isinstance(model.head_act, FusedActivation) and model.project.output_clamp is None
        assert not isinstance(model.tanh6, FusedActivation) and model.twice.output_clamp is None
        assert torch.equal(model(x), before)
    # Autograd recording takes the layers' fallback paths, which clamp too.
    y = model(xg)
    torch.testing.assert_close(y, before_recording, rtol=1e-6, atol=1e-6)
    y.sum().backward()
    assert xg.grad is not None


@pytest.mark.parametrize("m", [1, 3, 5, 197])
def test_kernel_clamp_equals_clamping_after(isa: str, m: int) -> None:
    layer = QuantLinear.from_packed(to_packed(torch.randn(40, 96, generator=GEN), QuantSpec(4, group_size=32)),
                                    torch.randn(40, generator=GEN))
    x = torch.randn(m, 96, generator=GEN)
    call = fast.prepared(layer).call
    for lo, hi in [(0.0, 6.0), (0.0, math.inf), (-0.5, 0.5)]:
        assert torch.equal(call(x, True, lo, hi), call(x).clamp(lo, hi))


def test_registered_clamps() -> None:
    assert clamp_of(nn.ReLU()) == (0.0, math.inf)
    assert clamp_of(nn.ReLU6()) == (0.0, 6.0)  # a Hardtanh subclass
    assert clamp_of(nn.Hardtanh(-2.0, 3.0)) == (-2.0, 3.0)
    assert clamp_of(nn.SiLU()) is None and clamp_of(nn.GELU()) is None
