"""The kernels' static activation entry: a precomputed scale, codes clamped to [lo, hi] (lowbit.kernels.act_quant).

The activations are then exactly on the grid the reference rounds to (``act_quant.round_to_grid``), so the
only difference from the float64 reference of the rounded input is float32 accumulation: the stated bound is
``1e-5 * |x_hat| @ |W|^T + 1e-6`` elementwise, far inside the dynamic path's. Checked on every ISA (AVX2 on
an AVX-512 machine too, by the ``isa`` fixture), the fused (M <= 4) and GEMM paths, odd shapes, int8 and int4
weights (with and without zero points, per channel and grouped), symmetric and asymmetric activation grids,
saturating inputs, 1 and 2 threads.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from lowbit.kernels import act_quant, fast
from lowbit.kernels.act_quant import ActSpec
from lowbit.kernels.quant_linear import QuantLinear
from lowbit.kernels.reference import reference_linear
from tests.kernels.conftest import needs_kernels
from tests.kernels.test_fast import make_packed

# (format, group): int8 and int4 weights, symmetric and with zero points, per channel and grouped
WEIGHTS = (("int8", "pc"), ("int4", "pc"), ("int4", 128), ("uint4", 64), ("int8", 32))
# (lo, hi) of the activation codes: a8 symmetric, a4 symmetric, a4 asymmetric (zero point 5), a8-range edge
GRIDS = ((-127, 127), (-7, 7), (-5, 10), (-127, 0))
MS = (1, 3, 4, 5, 9, 64, 197, 241)


def check_static(packed: object, x: torch.Tensor, scale: float, lo: int, hi: int) -> float:
    """Kernel output vs the float64 reference on the rounded input; returns the relative error."""
    handle = fast.prepare(packed)  # type: ignore[arg-type]
    assert handle.call is not None, handle.reason
    y = handle.call(x, act_scale=scale, act_lo=lo, act_hi=hi)
    xq = act_quant.round_to_grid(x, torch.tensor(scale), float(lo), float(hi))
    ref = reference_linear(xq, packed, bias=None, dtype=torch.float64).double()  # type: ignore[arg-type]
    w = packed.dequantize().double()  # type: ignore[attr-defined]
    slack = 1e-5 * (xq.double().abs() @ w.abs().T) + 1e-6
    err = (y.double() - ref).abs()
    assert torch.all(err <= slack), f"max excess {(err - slack).max().item():.3g}"
    return ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("weights", WEIGHTS, ids=lambda c: f"{c[0]}-g{c[1]}")
def test_static_scale_matches_the_rounded_reference(isa: str, weights: tuple[str, int | str]) -> None:
    fmt, group = weights
    n, k = 37, 328  # N not a multiple of the tile, K with a partial group and block
    packed = make_packed(n, k, fmt, group, seed=zlib.crc32(f"static{weights}".encode()))
    g = torch.Generator().manual_seed(3)
    packed_with_bias = fast.prepare(packed, torch.randn(n, generator=g))
    for lo, hi in GRIDS:
        for m in MS:
            x = torch.randn(m, k, generator=g)
            x[:, 7] *= 30.0  # an outlier channel: it saturates (a static scale does not follow it)
            scale = float(x.abs().amax()) / 127.0 * 0.3  # 30% of the range: many codes clamp
            check_static(packed, x, scale, lo, hi)
        y = packed_with_bias.call(x, act_scale=scale, act_lo=lo, act_hi=hi)
        y0 = fast.prepare(packed).call(x, act_scale=scale, act_lo=lo, act_hi=hi)
        bias = packed_with_bias.call(torch.zeros(1, k)).expand_as(y)  # zero input: the bias alone
        torch.testing.assert_close(y - y0, bias, rtol=0, atol=1e-6 * float(y0.abs().max()) + 1e-6)


def test_static_entry_is_thread_count_invariant(isa: str) -> None:
    packed = make_packed(100, 1000, "int4", 128, seed=11)
    x = torch.randn(197, 1000, generator=torch.Generator().manual_seed(4))
    call = fast.prepare(packed).call
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = call(x, act_scale=0.02, act_lo=-127, act_hi=127)
        torch.set_num_threads(2)
        two = call(x, act_scale=0.02, act_lo=-127, act_hi=127)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    check_static(packed, x, 0.02, -127, 127)


def test_static_codes_equal_across_isas() -> None:
    needs_kernels()
    packed = make_packed(24, 200, "int8", "pc", seed=5)
    x = torch.randn(9, 200, generator=torch.Generator().manual_seed(5)) * 3
    call = fast.prepare(packed).call
    before = fast.current_isa()
    outs = []
    try:
        for isa in fast.available_isas():
            fast.set_isa(isa)
            outs.append(call(x, act_scale=0.01, act_lo=-7, act_hi=7))
    finally:
        fast.set_isa(before)
    for y in outs[1:]:
        torch.testing.assert_close(y, outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("scale", "lo", "hi"), ((-1.0, -127, 127), (float("nan"), -127, 127), (0.1, -128, 127),
                                                  (0.1, 1, 127), (0.1, -3.5, 7)))
def test_bad_static_arguments_are_refused(scale: float, lo: float, hi: float) -> None:
    needs_kernels()
    call = fast.prepare(make_packed(8, 64, "int8", "pc")).call
    with pytest.raises(RuntimeError, match="static activation scale"):
        call(torch.randn(2, 64), act_scale=scale, act_lo=lo, act_hi=hi)


@pytest.mark.parametrize("spec", (ActSpec(8), ActSpec(4), ActSpec(4, symmetric=False), ActSpec(8, dynamic=True,
                                  granularity="token"), ActSpec(8, symmetric=False), ActSpec(8, granularity="group",
                                  group_size=64)), ids=lambda s: s.short())
def test_layer_on_the_kernels_matches_its_reference(spec: ActSpec) -> None:
    needs_kernels()
    g = torch.Generator().manual_seed(9)
    layer = QuantLinear.from_packed(make_packed(40, 300, "int8", "pc", seed=9), bias=torch.randn(40, generator=g))
    x = torch.randn(2, 33, 300, generator=g)
    n = spec.num_scales(300)
    scale = zero = None
    if n:
        lo, hi = x.reshape(-1, 300).amin(0), x.reshape(-1, 300).amax(0)
        if n == 1:
            lo, hi = lo.min().reshape(1), hi.max().reshape(1)
        else:
            lo = torch.nn.functional.pad(lo, (0, -300 % 64)).reshape(n, 64).amin(1)
            hi = torch.nn.functional.pad(hi, (0, -300 % 64)).reshape(n, 64).amax(1)
        scale, zero = act_quant.scales_from_range(spec, lo, hi)
    act_quant.attach(layer, spec, scale, zero)
    y = layer(x)
    layer.backend = "reference"
    ref = layer(x)
    native = act_quant.kernel_static(layer) is not None or act_quant.kernel_dynamic(layer)
    rel = ((y - ref).norm() / ref.norm()).item()
    # natively: float32 rounding only (static) or the same per-row rounding (dynamic per token); emulated: the
    # kernels' own dynamic int8 rounding of the rounded input on top (the dynamic path's ~0.5-1%)
    assert rel < (1e-4 if native and not spec.dynamic else 2e-2), rel
    if spec.short() in ("a8", "a4", "a4z"):
        assert native
