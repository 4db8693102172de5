"""The packed weight format of docs/PACKED_FORMAT.md: bit packing of integer codes and ``PackedWeight``.

This module is the single source of truth for turning stored buffers back into float weights: both the
fake-quantization path (``lowbit.quant.primitives``) and every quantized module dequantize through
``codes_to_values``/``dequantize_grouped`` here, so the two are bit-identical by construction.

Format summary (see the doc for the contract): codes q in [0, 2^bits - 1] are packed LSB-first along each
row (code j occupies bit positions j*bits .. j*bits+bits-1, bit p lives in bit p % 8 of byte p // 8), rows
padded with zero bits to whole bytes. Dequantization is ``(q - z) * s`` per (row, group) in float32; symmetric
formats store no zero point and use z = 2^(bits-1), except 1-bit, which is the binary format
``(q - 1/2) * 2 * s`` (i.e. sign * s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError

SUPPORTED_BITS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8)


def check_bits(bits: int) -> int:
    """Return ``bits`` if it is a supported width, else raise LowbitError."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise LowbitError(
            f"unsupported bit width {bits!r}; bits must be one of {','.join(map(str, SUPPORTED_BITS))}"
        )
    return bits


def packed_row_bytes(k: int, bits: int) -> int:
    """Bytes per packed row of ``k`` codes: ceil(k * bits / 8)."""
    return (k * bits + 7) // 8


def num_groups(k: int, group_size: int) -> int:
    """Number of groups G = ceil(k / group_size) along the input dimension (the last may be shorter)."""
    return (k + group_size - 1) // group_size


def _bit_weights(n: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([1 << i for i in range(n)], dtype=torch.int32, device=device)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes [N, K] (each < 2^bits) into the LSB-first bitstream uint8 [N, ceil(K*bits/8)]."""
    check_bits(bits)
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise LowbitError(f"pack_codes expects a 2-D uint8 tensor; received {codes.dtype} {tuple(codes.shape)}")
    n, k = codes.shape
    if codes.numel() and int(codes.max()) >= (1 << bits):
        raise LowbitError(f"pack_codes: code {int(codes.max())} does not fit in {bits} bits")
    nbytes = packed_row_bytes(k, bits)
    if bits == 8:
        return codes.clone()
    if 8 % bits == 0:
        # 1/2/4 bits: whole codes per byte; OR the codes of each byte slot in, in uint8 (no wider copy).
        per = 8 // bits
        grouped = codes if k == nbytes * per else torch.nn.functional.pad(codes, (0, nbytes * per - k))
        grouped = grouped.view(n, nbytes, per)  # [N, B, per]
        out = grouped[..., 0].clone()
        for slot in range(1, per):
            out |= grouped[..., slot] << (slot * bits)
        return out
    # 3 bits (codes straddle bytes): explode to a bit stream, then regroup by 8.
    bitpos = torch.arange(bits, dtype=torch.int32, device=codes.device)  # [bits]
    stream_bits = (codes.to(torch.int32).unsqueeze(-1) >> bitpos) & 1  # [N, K, bits]
    stream = torch.zeros(n, nbytes * 8, dtype=torch.int32, device=codes.device)
    stream[:, : k * bits] = stream_bits.reshape(n, k * bits)  # [N, K*bits] LSB-first bitstream
    return (stream.view(n, nbytes, 8) * _bit_weights(8, codes.device)).sum(dim=-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: uint8 [N, ceil(K*bits/8)] -> uint8 codes [N, K]."""
    check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise LowbitError(
            f"unpack_codes expects a 2-D uint8 tensor; received {packed.dtype} {tuple(packed.shape)}"
        )
    n, nbytes = packed.shape
    if nbytes != packed_row_bytes(k, bits):
        raise LowbitError(
            f"unpack_codes: {nbytes} bytes per row do not hold K={k} codes of {bits} bits "
            f"(expected {packed_row_bytes(k, bits)})"
        )
    if bits == 8:
        return packed.clone()
    p = packed.to(torch.int32)
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=packed.device)  # [per]
        codes = (p.unsqueeze(-1) >> shifts) & mask  # [N, B, per]
        return codes.reshape(n, nbytes * per)[:, :k].to(torch.uint8)
    bitpos = torch.arange(8, dtype=torch.int32, device=packed.device)
    stream = ((p.unsqueeze(-1) >> bitpos) & 1).reshape(n, nbytes * 8)  # [N, B*8]
    code_bits = stream[:, : k * bits].reshape(n, k, bits)  # [N, K, bits]
    return (code_bits * _bit_weights(bits, packed.device)).sum(dim=-1).to(torch.uint8)


def symmetric_zero(bits: int) -> float:
    """The implied zero point of symmetric formats: 2^(bits-1) (1/2 for the 1-bit binary format)."""
    return 0.5 if bits == 1 else float(1 << (bits - 1))


def codes_to_values(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """Elementwise (broadcasting) dequantization in float32: ``(q - z) * s``.

    ``zero=None`` means symmetric (z = 2^(bits-1)); symmetric 1-bit is ``(q - 1/2) * 2 * s``.
    ``scale`` is used as float32 of whatever it holds — pass fp16-representable values for the packed format.
    """
    q = codes.to(torch.float32)
    s = scale.to(torch.float32)
    if zero is None:
        if bits == 1:
            return (q - 0.5) * 2.0 * s
        return (q - symmetric_zero(bits)) * s
    return (q - zero.to(torch.float32)) * s


def expand_groups(t: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """Repeat per-group values [N, G] along K -> [N, K] (column k uses group k // group_size)."""
    return t.repeat_interleave(group_size, dim=1)[:, :k]


def dequantize_grouped(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int
) -> torch.Tensor:
    """Codes [N, K] + scales/zeros [N, G] -> float32 [N, K]."""
    k = codes.shape[1]
    s = expand_groups(scales.to(torch.float32), k, group_size)  # [N, K]
    z = None if zeros is None else expand_groups(zeros.to(torch.float32), k, group_size)  # [N, K]
    return codes_to_values(codes, s, z, bits)


@dataclass
class PackedWeight:
    """One quantized weight in the stored format.

    Attributes:
        qweight: uint8 [N, ceil(K*bits/8)], codes packed LSB-first along K.
        scales: float16 [N, G], G = ceil(K / group_size).
        zeros: uint8 [N, G] integer zero points (asymmetric), or None (symmetric, implied 2^(bits-1)).
        bits: code width, one of 1, 2, 3, 4, 5, 6, 8.
        group_size: effective group size along K (K itself for per-channel).
        shape: the original weight shape, e.g. (N, K) for linear or (N, C, kh, kw) for conv; K = prod(shape[1:]).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        check_bits(self.bits)
        self.shape = tuple(int(d) for d in self.shape)
        n, k = self.out_features, self.in_features
        g = num_groups(k, self.group_size)
        expected = {
            "qweight": ((n, packed_row_bytes(k, self.bits)), torch.uint8, self.qweight),
            "scales": ((n, g), torch.float16, self.scales),
        }
        if self.zeros is not None:
            expected["zeros"] = ((n, g), torch.uint8, self.zeros)
        for name, (shape, dtype, t) in expected.items():
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise LowbitError(
                    f"PackedWeight.{name}: received {t.dtype} {tuple(t.shape)}; expected {dtype} {shape} "
                    f"for weight shape {self.shape}, bits={self.bits}, group_size={self.group_size}"
                )

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def nbytes(self) -> int:
        """Stored bytes: qweight + scales + zeros."""
        tensors = [self.qweight, self.scales] + ([self.zeros] if self.zeros is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def codes(self) -> torch.Tensor:
        """Unpacked uint8 codes [N, K]."""
        return unpack_codes(self.qweight, self.bits, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """Float32 [N, K] weight (conv weights stay flattened; reshape with ``.shape`` if needed)."""
        return dequantize_grouped(self.codes(), self.scales, self.zeros, self.bits, self.group_size)
