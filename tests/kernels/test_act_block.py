"""The kernels' activation quantization blocks (``act_block``): one scale per row, or coarser / finer blocks.

Every choice keeps the stated elementwise error bound (checked against the float64 reference through
``check_against_reference``) on every ISA, through the fused (M <= 4) and the GEMM paths, including the row
block's edges; the choice reaches the kernels from a model (``set_act_block``), and bad values fail clearly.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels import fast
from lowbit.kernels.fusion import fuse_shared_inputs
from lowbit.kernels.quant_linear import QuantLinear, check_act_block, set_act_block
from tests.kernels.conftest import needs_kernels
from tests.kernels.test_fast import EDGE_MS, check_against_reference, make_packed
from tests.kernels.test_fusion import Pair

# (format, group, act_block): one scale per row for per-channel, grouped (zero point folded or not) and binary
# weights; blocks coarser than the default (per-channel), finer than the group, and spanning the row.
CASES = (
    ("int8", "pc", "row"), ("int4", 128, "row"), ("uint4", 64, "row"), ("binary", "pc", "row"),
    ("int2", 32, "row"), ("int8", "pc", 256), ("int4", 128, 64), ("int3", 64, 32), ("int4", 32, 512),
)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-g{c[1]}-a{c[2]}")
def test_any_act_block_stays_within_the_bound(isa: str, case: tuple[str, int | str, int | str]) -> None:
    fmt, group, act_block = case
    n, k = 100, 328  # a 4-column panel tail; K with a partial group and block
    packed = make_packed(n, k, fmt, group, seed=zlib.crc32(f"ab{case}".encode()))
    g = torch.Generator().manual_seed(7)
    bias = torch.randn(n, generator=g)
    for m in EDGE_MS:
        x = torch.randn(m, k, generator=g)
        x[:, 5] *= 20.0  # an outlier channel: a per-row scale is visibly coarser (the bound follows it)
        assert check_against_reference(packed, x, bias if m % 2 else None, act_block=act_block) < 5e-2


@pytest.mark.parametrize(("k", "group"), ((32, "pc"), (200, "pc"), (256, 128), (96, 32)))
def test_single_chunk_rows_start_and_finish_in_one_step(isa: str, k: int, group: int | str) -> None:
    # K <= 256: one activation block is the whole row, so its first K-blocks are also its last (the GEMM
    # starts and writes out in the same step, with no earlier partial sums to read).
    packed = make_packed(24, k, "int4", group, seed=k)
    g = torch.Generator().manual_seed(k)
    for act_block in (None, "row"):
        for m in (5, 13, 197):
            check_against_reference(packed, torch.randn(m, k, generator=g), torch.randn(24, generator=g), act_block)


def test_act_blocks_follow_the_choice() -> None:
    needs_kernels()
    packed = make_packed(8, 1000, "int4", 128)  # K = 1000: 32 blocks, groups of 4 blocks
    assert fast.prepare(packed).act_block == 128
    assert fast.prepare(packed, act_block="row").act_blocks == 32
    assert fast.prepare(packed, act_block=64).act_block == 64
    assert fast.prepare(packed, act_block=4096).act_blocks == 32  # spans the row: one scale per row
    with pytest.raises(LowbitError, match="neither divides the weight group"):
        fast.prepare(packed, act_block=256)
    assert fast.prepare(make_packed(8, 1000, "int8", "pc"), act_block=256).act_block == 256


@pytest.mark.parametrize("bad", (0, 33, -32, "col", True, 12.0))
def test_bad_act_block_names_what_is_accepted(bad: object) -> None:
    with pytest.raises(LowbitError, match="positive multiple of 32, 'row' or None"):
        check_act_block(bad)  # type: ignore[arg-type]
    with pytest.raises(LowbitError):
        set_act_block(nn.Sequential(), bad)  # type: ignore[arg-type]


def test_model_setting_reaches_the_kernels_and_the_fused_call() -> None:
    needs_kernels()
    model = Pair(QuantLinear.from_packed(make_packed(16, 300, "int8", "pc", seed=1)),
                 QuantLinear.from_packed(make_packed(24, 300, "int8", "pc", seed=2))).eval()
    x = torch.randn(40, 300, generator=torch.Generator().manual_seed(8))
    x[:, 3] *= 50.0
    both = lambda: torch.cat(model(x), -1)  # noqa: E731
    with torch.no_grad():
        default = both()
        assert fast.prepared(model.a).act_block == 128
        set_act_block(model, "row")
        assert model.a.act_block == model.b.act_block == "row"
        row = both()
        assert fast.prepared(model.a).act_blocks == 10  # the cached handle follows the setting
        ref = torch.cat([m.packed.dequantize() for m in (model.a, model.b)])
        exact = x.double() @ ref.double().T
        err_default, err_row = ((default - exact).norm() / exact.norm()), ((row - exact).norm() / exact.norm())
        assert err_row > 1.3 * err_default  # one scale per row really is coarser with an outlier channel
        assert fuse_shared_inputs(model) == 1  # same act_block: one shared call
        close = lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-4)  # noqa: E731 (float summation order)
        assert close(both(), row)
        model.b.act_block = None  # set after fusing: each sibling then runs its own call, its own way
        mixed = both()
        assert close(mixed[:, :16], row[:, :16]) and close(mixed[:, 16:], default[:, 16:])
        assert not close(mixed[:, 16:], row[:, 16:])
