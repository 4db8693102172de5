"""Bit packing round trips and the PackedWeight container."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.kernels.formats import PackedWeight, pack_codes, unpack_codes
from lowbit.kernels.reference import reference_linear

BITS = (1, 2, 3, 4, 5, 6, 8)
SHAPES = ((7, 13), (3, 1), (5, 130), (1, 8), (4, 0))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES)
def test_pack_unpack_round_trip(bits: int, shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    n, k = shape
    assert packed.dtype == torch.uint8
    assert tuple(packed.shape) == (n, (k * bits + 7) // 8)
    assert torch.equal(unpack_codes(packed, bits, k), codes)


def test_bit_layout_matches_the_contract() -> None:
    # 4 bits: code 0 is the low nibble of byte 0.
    assert pack_codes(torch.tensor([[1, 2]], dtype=torch.uint8), 4).tolist() == [[0x21]]
    # 2 bits: byte 0 holds codes 0..3, code 0 in bits 0-1.
    assert pack_codes(torch.tensor([[1, 2, 3, 0, 1]], dtype=torch.uint8), 2).tolist() == [[0b00111001, 1]]
    # 3 bits straddle bytes: codes 7,0,5 -> bits 111 000 101 -> 0b01000111, 0b1 (LSB-first).
    assert pack_codes(torch.tensor([[7, 0, 5]], dtype=torch.uint8), 3).tolist() == [[0b01000111, 0b1]]
    # 1 bit: code j is bit j.
    assert pack_codes(torch.tensor([[1, 0, 0, 1, 0, 0, 0, 0, 1]], dtype=torch.uint8), 1).tolist() == [[9, 1]]


def test_pack_rejects_out_of_range_and_bad_bits() -> None:
    with pytest.raises(LowbitError, match="does not fit"):
        pack_codes(torch.tensor([[4]], dtype=torch.uint8), 2)
    with pytest.raises(LowbitError, match="bits must be one of"):
        pack_codes(torch.zeros(1, 1, dtype=torch.uint8), 7)


def test_packed_weight_dequantize_and_reference_linear() -> None:
    codes = torch.tensor([[0, 15, 8, 9, 1]], dtype=torch.uint8)  # K = 5, groups of 2 -> G = 3
    scales = torch.tensor([[1.0, 0.5, 2.0]], dtype=torch.float16)
    pw = PackedWeight(pack_codes(codes, 4), scales, None, bits=4, group_size=2, shape=(1, 5))
    assert pw.dequantize().tolist() == [[-8.0, 7.0, 0.0, 0.5, -14.0]]
    assert pw.nbytes == 3 + 6
    zeros = torch.tensor([[0, 15, 1]], dtype=torch.uint8)
    pa = PackedWeight(pack_codes(codes, 4), scales, zeros, bits=4, group_size=2, shape=(1, 5))
    assert pa.dequantize().tolist() == [[0.0, 15.0, -3.5, -3.0, 0.0]]
    x = torch.randn(3, 5)
    bias = torch.tensor([0.25])
    torch.testing.assert_close(reference_linear(x, pa, bias), x @ pa.dequantize().T + bias)


def test_packed_weight_validates_shapes() -> None:
    with pytest.raises(LowbitError, match="scales"):
        PackedWeight(torch.zeros(2, 4, dtype=torch.uint8), torch.zeros(2, 2, dtype=torch.float16), None,
                     bits=4, group_size=8, shape=(2, 8))
