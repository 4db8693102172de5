"""The table of storage formats: one row per way lowbit stores a quantized weight (ggml's ``type_traits`` idea).

Each row (``StorageFormat``) says how the codes of a format are laid out, which module class and manifest kinds
hold it, which CPU path runs it, how far that path may be from the float64 reference (the stated bound), and
which GGUF / ONNX construct stores the same numbers (for export). Quantization methods and QAT reach a layout
through this table (``find_format``, ``StorageFormat.kind_for``) instead of importing a format's module;
``tests/kernels/test_storage.py`` walks it: every row round-trips its codes, runs on the reference and on every
CPU kernel path, and stays within its bound.

| row             | bits | layout | codes        | stored bits/weight   | GGUF          | ONNX              |
|-----------------|------|--------|--------------|----------------------|---------------|-------------------|
| int8 / uint8    | 8    | codes  | 0..255       | 8 + scales (+ zeros) | Q8_0 (g32)    | DequantizeLinear  |
| int4 / uint4    | 4    | codes  | 0..15        | 4 + ...              | Q4_0 (g32)    | MatMulNBits       |
| int3 / uint3    | 3    | codes  | 0..7         | 3 + ...              | -             | -                 |
| int5/6, uint5/6 | 5, 6 | codes  | 0..31, 0..63 | 5, 6 + ...           | -             | -                 |
| int2 / uint2    | 2    | codes  | 0..3         | 2 + ...              | -             | -                 |
| ternary         | 2    | codes  | 1..3         | 2 + scales           | TQ2_0 (g256)  | -                 |
| ternary-base3   | 2    | base3  | 1..3, 5/byte | 1.6 + scales         | TQ1_0 (g256)  | -                 |
| binary          | 1    | codes  | 0..1         | 1 + scales           | -             | -                 |
| pbllm           | 1    | side   | 0..1 + CSR   | 1 + scales + side    | -             | -                 |
| offset2..8      | b    | offset | 0..2^b-1     | b + scales + minima  | Q4_1 (b4 g32) | -                 |
| superblock2..8  | b    | superblock | 0..2^b-1 | b + 12/g + 32/(8g)   | (Q4_K layout) | -                 |

``int<b>`` is symmetric (implied zero point 2^(b-1); the GGUF Q8_0 / Q4_0 decoding ``d * (q - z)`` with signed
steps), ``uint<b>`` stores uint8 zero points. A GGUF equivalence holds at the group it names; every row also
stores per-channel or any group size (the kernels run multiples of 32, others take the reference path).

Adding a format: a module in ``kernels/`` with its packing, its ``PackedWeight`` subclass and its module
classes (``variants.variant_family``), then one ``register_format(StorageFormat(...))`` row below.

Example:
    >>> storage_format("int4").gguf
    'Q4_0'
    >>> find_format("offset", 4).kind_for("linear", "minmax")
    'offset_linear'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.kernels import fast
from lowbit.kernels.base3 import BASE3_KINDS, Base3Linear, Base3Packed, pack_trits, unpack_trits
from lowbit.kernels.formats import PackedWeight, num_groups, pack_codes, unpack_codes
from lowbit.kernels.offsets import OFFSET_KINDS, OffsetLinear, OffsetPacked
from lowbit.kernels.quant_linear import QuantLinear
from lowbit.kernels.sparse_side import PBLLM_KINDS, PBLLMLinear, SparseSidePacked, side_from_dense
from lowbit.kernels.superblock import SUB_MAX, SUPERBLOCK_KINDS, SuperBlockLinear, SuperBlockPacked, num_super
from lowbit.registry import Registry

STANDARD_KINDS: tuple[str, ...] = ("linear", "conv1x1", "conv")  # the kinds every row can hold
ErrorBound = Callable[[torch.Tensor, PackedWeight, int], torch.Tensor]
Sampler = Callable[[int, int, int, torch.Generator], PackedWeight]


@dataclass(frozen=True)
class StorageFormat:
    """One storage format.

    Attributes:
        name: the row's key, e.g. ``int4``, ``ternary-base3``, ``offset4``.
        bits: width of the codes the quantizers produce and the kernels read (base-3 holds 2-bit codes).
        symmetric: True when no integer zero points are stored (the implied 2^(bits-1); binary: 1/2).
        layout: ``codes`` (docs/PACKED_FORMAT.md), ``base3``, ``offset`` (float group minima), ``superblock``
            (the offset grid with 6-bit group steps and minima, k-quants) or ``side`` (PB-LLM's CSR residuals);
            with ``bits`` and ``symmetric`` it identifies the row (``find_format``).
        code_range: the smallest and largest code used (ternary: 1..3).
        bits_per_weight: stored bits per weight of the codes alone (scales, zeros, minima, side come on top).
        pack: codes uint8 [N, K] -> the stored code tensor (uint8 [N, bytes per row]).
        unpack: (stored code tensor, K) -> codes uint8 [N, K]; the exact inverse of ``pack``.
        module: the linear module class holding the format (``from_packed``); convs use ``kinds``.
        kinds: standard kind (linear, conv1x1, conv) -> manifest ``kind`` of the variant's module in
            ``QUANT_KINDS``; empty for the standard modules, where a layer keeps its own kind.
        kernel: the CPU path that runs it (the ``cpu`` backend of ``module``).
        bound: the stated error bound of that path against the exactly dequantized weight, in words.
        error_bound: the bound as numbers: (x [M, K], packed, act_block) -> float64 [M, N] (float32
            accumulation rounding comes on top).
        sample: (N, K, group_size, generator) -> a random weight in this format, codes uniform over
            ``code_range`` (tests, benchmarks).
        gguf: the GGUF ggml type storing the same numbers (at ``group``), or None.
        onnx: the ONNX operator storing the same numbers, or None.
        group: the group size the GGUF equivalence needs, or None.
        repack: a standard ``PackedWeight`` of the same codes -> this layout, or None where it is stored as is
            (how a method choosing a layout, e.g. ternary's ``storage`` option, reaches it).
    """

    name: str
    bits: int
    symmetric: bool
    layout: str
    code_range: tuple[int, int]
    bits_per_weight: float
    pack: Callable[[torch.Tensor], torch.Tensor]
    unpack: Callable[[torch.Tensor, int], torch.Tensor]
    module: type[QuantLinear]
    kinds: dict[str, str]
    kernel: str
    bound: str
    error_bound: ErrorBound
    sample: Sampler
    gguf: str | None = None
    onnx: str | None = None
    group: int | None = None
    repack: Callable[[PackedWeight], PackedWeight] | None = None

    def kind_for(self, kind: str, who: str | None = None) -> str:
        """The manifest kind holding this format in a layer of standard ``kind``; LowbitError naming ``who``
        (a method, or the format) when the format has no module of that kind."""
        if not self.kinds:
            return kind
        if kind not in self.kinds:
            raise LowbitError(f"{who or self.name + ' storage'} supports layer kinds {', '.join(self.kinds)}; "
                              f"received {kind!r}")
        return self.kinds[kind]


STORAGE_FORMATS: Registry[StorageFormat] = Registry("storage format")


def register_format(row: StorageFormat) -> StorageFormat:
    """Add ``row`` to ``STORAGE_FORMATS`` under its name."""
    return STORAGE_FORMATS.register(row.name)(row)


def storage_format(name: str) -> StorageFormat:
    """The row ``name`` (LowbitError listing the rows if unknown)."""
    return STORAGE_FORMATS.get(name)


def storage_formats() -> list[StorageFormat]:
    """Every row, by name."""
    return [STORAGE_FORMATS.get(n) for n in STORAGE_FORMATS.names()]


def find_format(layout: str, bits: int, symmetric: bool = True) -> StorageFormat:
    """The row of ``layout`` at ``bits`` (symmetric or with zero points); LowbitError listing what exists.

    For layout ``codes`` at 2 bits this is ``int2``/``uint2`` (the ternary row reads the same bytes)."""
    rows = [r for r in storage_formats() if (r.layout, r.bits, r.symmetric) == (layout, bits, symmetric)]
    if rows:  # the widest code range: int2, not the ternary row reading the same bytes
        return max(rows, key=lambda r: r.code_range[1] - r.code_range[0])
    have = sorted({(r.layout, r.bits) for r in storage_formats()})
    raise LowbitError(f"no {layout!r} storage format at {bits} bits{'' if symmetric else ' with zero points'}; "
                      f"the table has {', '.join(f'{lay}/{b}' for lay, b in have)}")


def format_of(packed: PackedWeight) -> StorageFormat:
    """The row ``packed`` is stored in: its class, bits and zero points, and the narrowest code range holding its
    codes (so 2-bit codes in {1, 2, 3} are ``ternary``, which exports as TQ2_0, rather than ``int2``)."""
    codes = packed.codes()
    lo, hi = (int(codes.min()), int(codes.max())) if codes.numel() else (0, 0)
    rows = [r for r in storage_formats()
            if type(packed) is getattr(r.module, "PACKED_TYPE", PackedWeight) and r.bits == packed.bits
            and r.symmetric == packed.symmetric and r.code_range[0] <= lo and hi <= r.code_range[1]]
    if not rows:
        raise LowbitError(f"no storage format holds a {type(packed).__name__} of {packed.bits} bits "
                          f"({'symmetric' if packed.symmetric else 'zero points'}, codes {lo}..{hi})")
    return min(rows, key=lambda r: r.code_range[1] - r.code_range[0])


def default_act_block(packed: PackedWeight) -> int:
    """Inputs per activation quantization block the kernels use by default for ``packed`` (``fast.prepare``)."""
    kb = -(-packed.in_features // fast.BLOCK)
    per_channel = packed.scales.shape[1] == 1
    group_blocks = kb if per_channel else packed.group_size // fast.BLOCK
    return fast.act_blocks_for(group_blocks, per_channel, None, kb) * fast.BLOCK


# --- error bounds ----------------------------------------------------------------------------------------------
INT8_ACT_BOUND = "sum_b (a_b / 2) * sum_{k in b} |W[n, k]|: int8 activations per block b (lowbit.kernels.fast)"


def act_int8_bound(x: torch.Tensor, packed: PackedWeight, act_block: int) -> torch.Tensor:
    """``fast.error_bound`` on the dequantized weight: the kernels' only approximation is the activations."""
    return fast.error_bound(x, packed.dequantize(), act_block)


def exact_bound(x: torch.Tensor, packed: PackedWeight, act_block: int) -> torch.Tensor:
    """Zero: the path is dequantize + float matmul, equal to the reference up to float32 rounding."""
    return torch.zeros(x.shape[0], packed.out_features, dtype=torch.float64)


# --- random weights of each layout (codes uniform over the row's range) ----------------------------------------
def _random_grid(n: int, k: int, gs: int, g: torch.Generator) -> torch.Tensor:
    """Positive fp16 steps [N, G] of a plausible magnitude."""
    return (torch.rand(n, num_groups(k, gs), generator=g) * 0.05 + 0.005).to(torch.float16)


def _uniform_sampler(bits: int, symmetric: bool, lo: int) -> Sampler:
    def sample(n: int, k: int, gs: int, g: torch.Generator) -> PackedWeight:
        codes = torch.randint(lo, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
        scales = _random_grid(n, k, gs, g)
        zeros = None if symmetric else torch.randint(0, 1 << bits, tuple(scales.shape), generator=g,
                                                     dtype=torch.uint8)
        return PackedWeight(pack_codes(codes, bits), scales, zeros, bits, gs, (n, k))

    return sample


def _base3_sample(n: int, k: int, gs: int, g: torch.Generator) -> PackedWeight:
    return Base3Packed.from_packed(_uniform_sampler(2, True, 1)(n, k, gs, g))


def _offset_sampler(bits: int) -> Sampler:
    def sample(n: int, k: int, gs: int, g: torch.Generator) -> PackedWeight:
        base = _uniform_sampler(bits, True, 0)(n, k, gs, g)
        minima = (-(torch.rand(tuple(base.scales.shape), generator=g) * 0.1) * (1 << (bits - 1))).to(torch.float16)
        return OffsetPacked(base.qweight, base.scales, None, bits, gs, (n, k), minima)

    return sample


def _superblock_sampler(bits: int) -> Sampler:
    def sample(n: int, k: int, gs: int, g: torch.Generator) -> PackedWeight:
        groups = num_groups(k, gs)
        codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
        sc = torch.randint(1, SUB_MAX + 1, (n, groups), generator=g, dtype=torch.uint8)
        mn = torch.randint(0, SUB_MAX + 1, (n, groups), generator=g, dtype=torch.uint8)
        d = (torch.rand(n, num_super(groups), generator=g) * 1e-3 + 1e-4).to(torch.float16)  # steps up to ~0.07
        dmin = (torch.rand(n, num_super(groups), generator=g) * 2e-3 * (1 << (bits - 1)) / 8).to(torch.float16)
        return SuperBlockPacked.from_codes(codes, sc, mn, d, dmin, bits, gs, (n, k))

    return sample


def _side_sample(n: int, k: int, gs: int, g: torch.Generator) -> PackedWeight:
    base = _uniform_sampler(1, True, 0)(n, k, gs, g)
    mask = torch.rand(n, k, generator=g) < 0.1  # PB-LLM's default salient fraction
    residual = torch.randn(n, k, generator=g) * 0.05
    row_ptr, cols, values, row_scale = side_from_dense(residual, mask)
    return SparseSidePacked(base.qweight, base.scales, None, 1, gs, (n, k), row_ptr, cols, values, row_scale)


# --- the rows ------------------------------------------------------------------------------------------------
def _pack_bits(bits: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda codes: pack_codes(codes, bits)


def _unpack_bits(bits: int) -> Callable[[torch.Tensor, int], torch.Tensor]:
    return lambda packed, k: unpack_codes(packed, bits, k)


_FAST = "fast.linear (int8 activations; 3 bits in a 4-bit container, 5 and 6 in an 8-bit one)"
# GGUF / ONNX equivalents of the plain rows: (bits, symmetric) -> (gguf, onnx, group). Q8_0 / Q4_0 are
# d * (q - z) with one fp16 step per 32 weights, our symmetric grid at g32; MatMulNBits holds 4-bit groups
# with or without zero points (its default zero point is 8, ours); DequantizeLinear holds int8 per axis.
_PLAIN_EQUIVALENTS: dict[tuple[int, bool], tuple[str | None, str | None, int | None]] = {
    (8, True): ("Q8_0", "DequantizeLinear", 32),
    (8, False): (None, "DequantizeLinear", None),
    (4, True): ("Q4_0", "MatMulNBits", 32),
    (4, False): (None, "MatMulNBits", None),
}

for _bits in (8, 6, 5, 4, 3, 2):  # 6, 5: embedding tables between 8 and 4 bits (issue 16); run as 8 bits
    for _sym in (True, False):
        _gguf, _onnx, _group = _PLAIN_EQUIVALENTS.get((_bits, _sym), (None, None, None))
        register_format(StorageFormat(
            name=f"{'' if _sym else 'u'}int{_bits}", bits=_bits, symmetric=_sym, layout="codes",
            code_range=(0, (1 << _bits) - 1), bits_per_weight=float(_bits), pack=_pack_bits(_bits),
            unpack=_unpack_bits(_bits), module=QuantLinear, kinds={}, kernel=_FAST,
            bound=INT8_ACT_BOUND, error_bound=act_int8_bound, sample=_uniform_sampler(_bits, _sym, 0),
            gguf=_gguf, onnx=_onnx, group=_group,
        ))

register_format(StorageFormat(
    name="ternary", bits=2, symmetric=True, layout="codes", code_range=(1, 3), bits_per_weight=2.0,
    pack=_pack_bits(2), unpack=_unpack_bits(2), module=QuantLinear, kinds={}, kernel=_FAST,
    bound=INT8_ACT_BOUND, error_bound=act_int8_bound, sample=_uniform_sampler(2, True, 1), gguf="TQ2_0", group=256,
))
register_format(StorageFormat(
    name="ternary-base3", bits=2, symmetric=True, layout="base3", code_range=(1, 3), bits_per_weight=1.6,
    pack=lambda codes: pack_trits(codes - 1), unpack=lambda trits, k: unpack_trits(trits, k) + 1,
    module=Base3Linear, kinds=BASE3_KINDS, kernel=f"{_FAST} on the 2-bit codes rebuilt once",
    bound=INT8_ACT_BOUND, error_bound=act_int8_bound, sample=_base3_sample, gguf="TQ1_0", group=256,
    repack=Base3Packed.from_packed,
))
register_format(StorageFormat(
    name="binary", bits=1, symmetric=True, layout="codes", code_range=(0, 1), bits_per_weight=1.0,
    pack=_pack_bits(1), unpack=_unpack_bits(1), module=QuantLinear, kinds={},
    kernel=f"{_FAST}, effective step 2s", bound=INT8_ACT_BOUND, error_bound=act_int8_bound,
    sample=_uniform_sampler(1, True, 0),
))
register_format(StorageFormat(
    name="pbllm", bits=1, symmetric=True, layout="side", code_range=(0, 1), bits_per_weight=1.0,
    pack=_pack_bits(1), unpack=_unpack_bits(1), module=PBLLMLinear, kinds=PBLLM_KINDS,
    kernel="reference (dequantize binary + side once, cached; F.linear)",
    bound="exact up to float32 rounding", error_bound=exact_bound, sample=_side_sample,
))
for _bits in (8, 4, 3, 2):
    _q41 = _bits == 4  # GGUF Q4_1: d * q + m per 32 weights, fp16 d and m
    register_format(StorageFormat(
        name=f"offset{_bits}", bits=_bits, symmetric=True, layout="offset", code_range=(0, (1 << _bits) - 1),
        bits_per_weight=float(_bits), pack=_pack_bits(_bits), unpack=_unpack_bits(_bits), module=OffsetLinear,
        kinds=OFFSET_KINDS, kernel=f"{_FAST} on base() + float (group sums of x) @ (m + 2^(b-1) s)",
        bound=INT8_ACT_BOUND, error_bound=act_int8_bound,
        sample=_offset_sampler(_bits), gguf="Q4_1" if _q41 else None, group=32 if _q41 else None,
    ))
for _bits in (8, 6, 5, 4, 3, 2):  # k-quants: the offset grid with 6-bit group steps and minima (Q4_K's layout at 4)
    register_format(StorageFormat(
        name=f"superblock{_bits}", bits=_bits, symmetric=True, layout="superblock",
        code_range=(0, (1 << _bits) - 1), bits_per_weight=float(_bits), pack=_pack_bits(_bits),
        unpack=_unpack_bits(_bits), module=SuperBlockLinear, kinds=SUPERBLOCK_KINDS,
        kernel=f"the offset row's path on the group steps and minima rebuilt once ({_FAST})",
        bound=INT8_ACT_BOUND, error_bound=act_int8_bound,
        sample=_superblock_sampler(_bits),
    ))
