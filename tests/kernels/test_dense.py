"""The float path of small packed weights (cpu/kernels_dense_impl.h, ``fast.DENSE_*``) on every ISA.

A weight of at most ``DENSE_MAX_WEIGHTS`` entries keeps its dequantized float32 copy, and calls of at least
``DENSE_MIN_ROWS`` rows compute ``x @ W^T + bias`` on it in float: no activation rounding, so the result must
match the float64 reference to float32 accumulation rounding (far inside the int8 path's bound). Row counts
cross the register blocks (6 rows AVX-512, 4 AVX2), column counts the vector widths (16 / 8) and the blocks of
4 / 2 vectors.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.kernels import fast
from lowbit.kernels.quant_linear import QuantConv2d1x1
from lowbit.kernels.reference import reference_linear
from tests.kernels.test_fast import make_packed

# (N, K): one vector, vector tails, several blocks of vectors with a tail, K of one input to several groups
SHAPES = ((16, 32), (37, 24), (96, 16), (24, 144), (130, 70), (8, 1))
# rows: the threshold, the register-block tails, several parallel chunks
ROWS = tuple(fast.DENSE_MIN_ROWS + d for d in (0, 1, 3, 5, 2 * fast.DENSE_MIN_ROWS + 7))


def float_slack(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A few ulps of sum |x||W| (float32 accumulation rounding)."""
    return 1e-5 * (x.double().abs() @ w.double().abs().T) + 1e-6


@pytest.mark.parametrize("fmt,group", [("uint8", 32), ("int4", "pc")])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}K{s[1]}")
def test_dense_path_matches_the_float_reference(isa: str, fmt: str, group: int | str,
                                                shape: tuple[int, int]) -> None:
    n, k = shape
    if group != "pc" and k % int(group) != 0 and k > int(group):
        group = "pc"  # grouped formats need whole groups
    packed = make_packed(n, k, fmt, group, seed=n * 1000 + k)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(k))
    call = fast.prepare(packed, bias).call
    assert call is not None and call.dense_at(fast.DENSE_MIN_ROWS) and not call.dense_at(fast.DENSE_MIN_ROWS - 1)
    w = packed.dequantize()
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for m in ROWS:
                x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
                ref = reference_linear(x, packed, bias, dtype=torch.float64).double()
                err = (call(x).double() - ref).abs()
                assert torch.all(err <= float_slack(x, w)), (threads, m, err.max().item())
                lo, hi = -0.25, 0.5  # a fused clamp in the write-out
                err = (call(x, True, lo, hi).double() - ref.clamp(lo, hi)).abs()
                assert torch.all(err <= float_slack(x, w)), (threads, m, "clamp", err.max().item())
    finally:
        torch.set_num_threads(before)


def test_fewer_rows_and_large_weights_stay_on_the_int8_path(isa: str) -> None:
    """Below DENSE_MIN_ROWS the int8 GEMM runs (its activation rounding shows); a weight above
    DENSE_MAX_WEIGHTS keeps no float copy."""
    packed = make_packed(64, 64, "uint8", 32)
    call = fast.prepare(packed).call
    x = torch.randn(fast.DENSE_MIN_ROWS - 1, 64, generator=torch.Generator().manual_seed(1))
    ref = reference_linear(x, packed, None, dtype=torch.float64).double()
    err = (call(x).double() - ref).abs()
    assert not torch.all(err <= float_slack(x, packed.dequantize()))  # int8 rounding: beyond float rounding
    big = make_packed(fast.DENSE_MAX_WEIGHTS // 64 + 1, 64, "uint8", 32)
    assert not fast.prepare(big).call.dense_at(1 << 20)


def test_static_activation_scale_is_never_computed_in_float(isa: str) -> None:
    """A static activation scale (activation quantization) asks for int8 inputs: the float path must not run."""
    packed = make_packed(32, 64, "int8", "pc")
    call = fast.prepare(packed).call
    x = torch.randn(fast.DENSE_MIN_ROWS, 64, generator=torch.Generator().manual_seed(2))
    scale = x.abs().max().item() / 127
    y = call(x, act_scale=scale)
    xq = (x / scale).round().clamp(-127, 127) * scale
    ref = reference_linear(xq, packed, None, dtype=torch.float64).double()
    assert torch.all((y.double() - ref).abs() <= float_slack(xq, packed.dequantize()))


def test_conv1x1_on_a_large_map_runs_the_float_path(isa: str) -> None:
    """A small packed 1x1 conv over a map of >= DENSE_MIN_ROWS pixels, channels-last and contiguous, as the
    module forward and as the planned call: the float reference to float32 rounding."""
    packed = make_packed(40, 24, "uint8", "pc", seed=3)
    bias = torch.randn(40, generator=torch.Generator().manual_seed(4))
    layer = QuantConv2d1x1.from_packed(packed, bias).eval()
    w = packed.dequantize()
    x = torch.randn(2, 24, 12, 12, generator=torch.Generator().manual_seed(3))
    ref = torch.nn.functional.conv2d(x.double(), w.double()[:, :, None, None], bias.double())
    rows = x.permute(0, 2, 3, 1).reshape(-1, 24)
    slack = float_slack(rows, w).reshape(2, 12, 12, 40).permute(0, 3, 1, 2)
    with torch.inference_mode():
        for inp in (x, x.contiguous(memory_format=torch.channels_last)):
            assert torch.all((layer(inp).double() - ref).abs() <= slack)
            call = fast.prepared(layer).call
            assert torch.all((call.conv1x1(inp, None, False, 0.0, 0.0).double() - ref).abs() <= slack)
