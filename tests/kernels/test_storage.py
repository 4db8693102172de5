"""The table of storage formats (``lowbit.kernels.storage``), walked row by row.

Every row: its codes round-trip exactly through its packer/unpacker and are what its module stores; its module
dequantizes to the packed weight; and it runs on the reference and on every CPU kernel path (scalar, AVX2,
AVX-512 VNNI where the CPU has it), staying within the row's stated bound of the float64 reference. The
fast rows really run on the kernels (no silent reference fallback).
"""

from __future__ import annotations

import zlib

import pytest
import torch

from lowbit.kernels import fast
from lowbit.kernels.formats import PackedWeight, expand_groups
from lowbit.kernels.offsets import OffsetPacked
from lowbit.kernels.quant_linear import QUANT_KINDS
from lowbit.kernels.reference import reference_linear
from lowbit.kernels.storage import (
    STANDARD_KINDS,
    default_act_block,
    exact_bound,
    find_format,
    format_of,
    storage_format,
    storage_formats,
)

ROWS = storage_formats()
N, K = 37, 300  # tails in N (not a multiple of 8) and K (partial 32-block and group)
MS = (1, 5, 197)  # fused GEMV (M <= 4) and the GEMM
PATHS = ("reference", "scalar", "avx2", "avx512vnni")
REQUIRED_PATHS = ("reference", "scalar", "avx2")  # must run here; AVX-512 VNNI only where the CPU has it


def _groups(row_group: int | None) -> list[int]:
    """Per-channel, two kernel group sizes and the GGUF equivalence's group, as group sizes along K."""
    return sorted({K, 32, 128} | ({row_group} if row_group else set()))


def _sample(name: str, gs: int) -> PackedWeight:
    return storage_format(name).sample(N, K, gs, torch.Generator().manual_seed(zlib.crc32(f"{name}{gs}".encode())))


def _magnitude(packed: PackedWeight) -> torch.Tensor:
    """|W| as the float32 accumulation sees it (for offsets: the codes' part q * s and the minima, summed apart)."""
    if isinstance(packed, OffsetPacked):
        steps = expand_groups(packed.scales.float(), K, packed.group_size)
        return packed.codes().float() * steps + expand_groups(packed.offsets.float().abs(), K, packed.group_size)
    return packed.dequantize().abs()


def measure(name: str, gs: int, path: str) -> tuple[float, float]:
    """Run row ``name`` at group ``gs`` on ``path``; assert the bound; return (max err / bound, relative err)."""
    row = storage_format(name)
    packed = _sample(name, gs)
    g = torch.Generator().manual_seed(gs)
    bias = torch.randn(N, generator=g)
    layer = row.module.from_packed(packed, bias).eval()
    if path == "reference":
        layer.backend = "reference"
    elif row.error_bound is not exact_bound:  # a kernel row must really reach the kernels
        handle = fast.prepare(packed)
        assert handle.tiles is not None, handle.reason
    worst, rel = 0.0, 0.0
    for m in MS:
        x = torch.randn(m, K, generator=g)
        with torch.no_grad():
            y = layer(x).double()
        ref = reference_linear(x, packed, bias, dtype=torch.float64).double()
        stated = exact_bound if path == "reference" else row.error_bound
        bound = stated(x, packed, default_act_block(packed))
        slack = 1e-5 * (x.double().abs() @ _magnitude(packed).double().T) + 1e-6  # float32 accumulation
        err = (y - ref).abs()
        assert torch.all(err <= bound + slack), f"{name} g{gs} {path} M={m}: excess {(err - bound - slack).max():.3g}"
        worst = max(worst, float((err / (bound + slack)).max()))
        rel = max(rel, float((y - ref).norm() / ref.norm()))
    return worst, rel


@pytest.mark.parametrize("name", [r.name for r in ROWS])
def test_row_round_trips_its_codes_and_is_what_its_module_stores(name: str) -> None:
    row = storage_format(name)
    assert not row.kinds or set(row.kinds) - {"embedding"} == set(STANDARD_KINDS)  # superblock: tables too
    assert all(row.kind_for(kind) in QUANT_KINDS for kind in STANDARD_KINDS)
    assert row.module.from_packed(_sample(name, 32)).__class__ is row.module
    for gs in _groups(row.group):
        packed = _sample(name, gs)
        codes = packed.codes()  # [N, K]
        assert row.code_range[0] <= int(codes.min()) and int(codes.max()) <= row.code_range[1]
        stored = row.pack(codes)
        assert torch.equal(row.unpack(stored, K), codes)
        layer = row.module.from_packed(packed)
        assert any(t.dtype == stored.dtype and torch.equal(t, stored) for t in layer.state_dict().values())
        assert torch.equal(layer.dequantized_weight(), packed.dequantize())
        assert format_of(packed) is row
        assert layer.packed.nbytes * 8 >= row.bits_per_weight * N * K  # codes at the stated density, plus grid


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", [r.name for r in ROWS])
def test_row_runs_on_every_path_within_its_bound(name: str, path: str) -> None:
    if path == "reference":
        for gs in _groups(storage_format(name).group):
            measure(name, gs, path)
        return
    assert fast.is_available(), fast.unavailable_reason()  # scalar and AVX2 must run: no skipping them
    if path not in fast.available_isas():
        assert path not in REQUIRED_PATHS, f"{path} must be available"
        pytest.skip(f"{path} not supported on this CPU")
    before = fast.current_isa()
    fast.set_isa(path)
    try:
        for gs in _groups(storage_format(name).group):
            measure(name, gs, path)
    finally:
        fast.set_isa(before)


def test_lookups_find_the_rows_methods_name() -> None:
    assert find_format("codes", 4).name == "int4" and find_format("codes", 4, symmetric=False).name == "uint4"
    assert find_format("offset", 4).gguf == "Q4_1" and find_format("base3", 2).name == "ternary-base3"
    assert storage_format("ternary").gguf == "TQ2_0" and storage_format("int4").onnx == "MatMulNBits"
    assert find_format("side", 1).kind_for("conv") == "pbllm_conv"
    with pytest.raises(Exception, match="supports layer kinds"):
        find_format("offset", 4).kind_for("embedding", "minmax")
    with pytest.raises(Exception, match="no 'offset' storage format at 1 bits"):
        find_format("offset", 1)
