"""Fast packed low-bit linear layers on x86 CPUs (C++ kernels, JIT-built at first use).

``prepare(packed)`` repacks a :class:`~lowbit.kernels.formats.PackedWeight` once (at load time) into the kernel
layout described in ``cpu/lowbit_kernels.h``; ``linear(x, handle, bias)`` then computes ``x @ W^T + bias``.

How it computes: activations are quantized on the fly per row and per activation block of ``act_block``
inputs (``FastWeight.act_block``: by default 128, or the largest multiple of 32 up to 128 that divides the
weight group; ``QuantLinear.act_block`` / ``quant_linear.set_act_block`` choose other blocks or one per row)
to symmetric int8 (``x ~= a_b * xq``, ``a_b = max|x_b| / 127``), weight codes (unsigned) are multiplied with
them in integer arithmetic (AVX-512 VNNI ``vpdpbusd``, or AVX2 ``vpmaddubsw``/``vpmaddwd``, or portable C++),
and the activation scales, weight scales and zero points are applied in float32 per activation block / group.
For M > 4 rows a register-blocked GEMM (``cpu/kernels_gemm_impl.h``) unpacks the weights once per panel
(48 (AVX-512) or 16 (AVX2) outputs x a chunk of K) and streams them against blocks of activation rows.
Threads: ``torch.get_num_threads()`` of torch's OpenMP team, claiming chunks of work dynamically
(``cpu/work_pool.h``: a late or preempted thread takes fewer chunks instead of stalling the call). The
extension is compiled once per machine into ``$LOWBIT_HOME/torch_extensions`` (about a minute, at the first
``prepare``/``linear``).

Error bound (the only approximation is the activation rounding, ``|x - a_b*xq| <= a_b / 2`` elementwise)::

    |y_fast[m, n] - y_ref[m, n]| <= sum_b (a_b[m] / 2) * sum_{k in b} |W[n, k]|   (+ float32 rounding)

over the activation blocks b, where ``y_ref`` uses the exactly dequantized weight. For activations without
extreme outliers this gives a relative error ``||y_fast - y_ref|| / ||y_ref||`` of about 0.5-0.7% (tested
below 1e-2 in ``tests/kernels/test_fast.py``); an outlier channel coarsens only its own activation block.
The bound holds for every ``act_block`` (``tests/kernels/test_act_block.py``), with ``a_b`` over its blocks:
one scale per row (``"row"``) gives about 0.75-0.9% on Gaussian inputs, and an outlier channel then coarsens the
whole row. In exchange the large-M GEMM converts its integer sums to float 2x less often (per-channel) and,
for grouped symmetric weights on AVX-512 VNNI, needs no zero-point work per row (``cpu/kernels_gemm_impl.h``).

Small weights at many rows: a weight of at most ``DENSE_MAX_WEIGHTS`` entries (a mobile CNN's first 1x1 convs:
K and N of 16-144 at thousands of pixels) also keeps its dequantized float32 copy in its handle's ``call`` (what
the layers, fused groups and planned forwards run; ``linear`` keeps the int8 path), and calls of at least
``DENSE_MIN_ROWS`` rows compute in float on it (``cpu/kernels_dense_impl.h``): at those shapes the int8 path's
per-row quantization and per-output conversions cost more than the products (lit-fashion's blocks 0-5 at 96 px,
1 thread: 0.35-0.85x of the int8 GEMM's time), and the result is the reference's to float32 rounding (no
activation rounding). A static activation scale (activation quantization) always takes the int8 path.

Supported: bits 1 (binary), 2 (int2 / ternary), 3 (run in a 4-bit container), 4, 5 and 6 (run in an 8-bit container)
and 8, symmetric or with zero
points, per-channel or group sizes that are multiples of 32; any K (tails are zero padded) and any N. Other
group sizes, an empty weight, or inputs that require grad use the reference path. If the extension cannot be
built (no compiler, ...) or ``LOWBIT_DISABLE_KERNELS=1`` is set, everything still works through
``lowbit.kernels.reference`` and a single warning says so. ``LOWBIT_KERNEL_ISA`` (``scalar``/``avx2``/
``avx512vnni``) forces an instruction set; by default the best one the CPU supports is chosen at run time.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.kernels import act_quant
from lowbit.kernels.formats import PackedWeight, symmetric_zero, unpack_codes
from lowbit.kernels.lowering import Lowered, register_lowering
from lowbit.kernels.quant_linear import (
    GROUP_ATTR,
    LINEAR_BACKENDS,
    ROW_ACT_BLOCK,
    QuantConv2d1x1,
    QuantLinear,
    check_act_block,
    reference_backend,
)
from lowbit.kernels.reference import reference_linear
from lowbit.paths import lowbit_home
from lowbit.runtime.native import (  # the torch-free layout constants, sources and flags (one copy)
    BLOCK,
    COMPILE_FLAGS,
    CORE_SOURCES,
    FALLBACK_FLAGS,
    ISA_ENV,
    SOURCE_DIR,
    TILE_ROWS,
    container_bits,
    default_act_blocks,
    source_digest,
)

log = logging.getLogger(__name__)

DISABLE_ENV = "LOWBIT_DISABLE_KERNELS"
SOURCES = ("binding.cpp", *CORE_SOURCES)  # the torch binding over the torch-free core (lowbit.runtime.native)
_EXT_NAME = "lowbit_cpu_kernels"
# The float path of small weights (cpu/kernels_dense_impl.h): weights of at most DENSE_MAX_WEIGHTS entries keep a
# dequantized float32 copy (K x N x 4 bytes) and calls of at least DENSE_MIN_ROWS rows run on it.
DENSE_MAX_WEIGHTS = 1 << 14
DENSE_MIN_ROWS = 128

_lock = threading.Lock()
_state: dict[str, object] = {"loaded": False, "ext": None, "reason": None}


def _build_dir() -> Path:
    # One directory per interpreter / torch version (the extension's ABI depends on both) and per version of
    # the sources: checkouts of different lowbit versions sharing one $LOWBIT_HOME would otherwise rebuild
    # over each other's extension (and could load the other's). The source directory is in the key too: ninja
    # rebuilds whenever build.ninja names other source paths, so two checkouts alternating on one build
    # directory would recompile at every switch.
    tag = (f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__.replace('+', '_')}"
           f"_{source_digest()}")
    path = lowbit_home() / "torch_extensions" / f"{_EXT_NAME}_{tag}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _compile() -> ModuleType:
    import fcntl

    from torch.utils.cpp_extension import load

    sources = [str(SOURCE_DIR / s) for s in SOURCES]
    build_dir = _build_dir()
    # torch's own build lock is a plain file: a builder killed mid-build leaves it, and every later process
    # waits on it forever. An flock is released by the kernel when its holder dies, so under it a leftover
    # torch lock can only be stale.
    with open(build_dir / "lowbit.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        stale = build_dir / "lock"
        if stale.exists():
            log.info("lowbit kernels: removing the build lock a killed build left in %s", build_dir)
            stale.unlink(missing_ok=True)
        # -fopenmp: the parallel loops run on torch's own OpenMP team (the extension links the libgomp torch
        # already loaded), see cpu/work_pool.h.
        try:
            return load(name=_EXT_NAME, sources=sources, extra_cflags=list(COMPILE_FLAGS),
                        extra_ldflags=["-fopenmp"], build_directory=str(build_dir), verbose=False)
        except Exception as first:  # e.g. no OpenMP, or an old compiler without AVX-512: retry plainly
            log.info("lowbit kernels: build failed (%s); retrying without OpenMP and AVX-512", first)
            return load(name=f"{_EXT_NAME}_basic", sources=sources,
                        extra_cflags=list(FALLBACK_FLAGS),
                        build_directory=str(build_dir), verbose=False)


def _say_fallback_once(reason: str, category: type[Warning] | None) -> None:
    """Called once per process: a warning for failures, an info log line when the user disabled the kernels."""
    msg = f"lowbit: fast CPU kernels unavailable ({reason}); using the reference (dequantize + matmul) path"
    if category is None:
        log.info(msg)
    else:
        log.warning(msg)
        warnings.warn(msg, category, stacklevel=3)


def _extension() -> ModuleType | None:
    """The compiled extension, building it on first use; None (after one warning) if it cannot be had."""
    if _state["loaded"]:
        return _state["ext"]  # type: ignore[return-value]
    with _lock:
        if _state["loaded"]:
            return _state["ext"]  # type: ignore[return-value]
        ext: ModuleType | None = None
        if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
            _state["reason"] = f"disabled by {DISABLE_ENV}"
            _say_fallback_once(str(_state["reason"]), None)
        else:
            try:
                ext = _compile()
            except Exception as err:  # no compiler, no ninja, headers missing, ...
                _state["reason"] = f"build failed: {type(err).__name__}: {str(err).strip().splitlines()[-1:]}"
                _say_fallback_once(str(_state["reason"]), RuntimeWarning)
            if ext is not None and os.environ.get(ISA_ENV):
                wanted = os.environ[ISA_ENV]
                try:
                    ext.set_isa(wanted)
                except RuntimeError:
                    warnings.warn(f"lowbit: {ISA_ENV}={wanted!r} is not available here; using {ext.get_isa()!r} "
                                  f"(available: {ext.available_isas()})", RuntimeWarning, stacklevel=2)
        _state["ext"] = ext
        _state["loaded"] = True
        return ext


def extension() -> ModuleType | None:
    """The compiled extension (built on first call), or None where it cannot be had (after one warning)."""
    return _state["ext"] if _state["loaded"] else _extension()  # type: ignore[return-value]


def is_available() -> bool:
    """True if the compiled kernels can be used (builds them on first call)."""
    return _extension() is not None


def unavailable_reason() -> str | None:
    """Why the kernels are not used (None when they are)."""
    _extension()
    return _state["reason"]  # type: ignore[return-value]


def available_isas() -> list[str]:
    """Instruction sets the kernels can use on this CPU, best last ([] without the extension)."""
    ext = _extension()
    return list(ext.available_isas()) if ext is not None else []


def current_isa() -> str | None:
    """The instruction set in use, or None without the extension."""
    ext = _extension()
    return ext.get_isa() if ext is not None else None


def set_isa(name: str) -> None:
    """Force an instruction set (``scalar``, ``avx2``, ``avx512vnni``); for tests and benchmarks."""
    ext = _extension()
    if ext is None:
        raise RuntimeError(f"lowbit kernels are unavailable ({_state['reason']})")
    ext.set_isa(name)


@dataclass(frozen=True)
class FastWeight:
    """A packed weight prepared for the kernels (the opaque handle of ``prepare``).

    Attributes:
        packed: the stored weight; the reference fallback uses it.
        tiles: uint8 [T, KB, 32*cb] codes in the kernel layout, or None when the fast path is not used.
        scales: float16 [T, G, 8] effective scales s (binary: 2*s).
        zeros: uint8 [T, G, 8] zero points (asymmetric formats), or None.
        mins: float16 [T, G, 8] group minima of offset storage (``kernels.offsets``: w = q * s + m), or None;
            the kernels add their term ``m * sum x`` in the write-out (zero_const is then 1).
        zero_const: the constant zero point of symmetric formats (2^(bits-1); 1/2 for binary).
        cb: container bits of ``tiles`` (3-bit codes use 4, 5 and 6-bit codes 8).
        full_byte: codes use all 8 bits (selects the saturation-safe AVX2 dot product).
        n, k: output and input features.
        group_blocks: 32-input blocks per group.
        act_blocks: 32-input blocks per activation quantization block (divides ``group_blocks``).
        reason: why the reference path is used, None when the kernels are.
        call: the extension's validated ``Prepared`` weight (with the bias given to ``prepare``):
            ``call(x)`` -> y, ``call.split(x)`` -> per-sibling views (fused groups); None without tiles.
    """

    packed: PackedWeight
    tiles: torch.Tensor | None
    scales: torch.Tensor | None
    zeros: torch.Tensor | None
    zero_const: float
    cb: int
    full_byte: bool
    n: int
    k: int
    group_blocks: int
    reason: str | None
    act_blocks: int = 1
    call: Any = None
    mins: torch.Tensor | None = None

    @property
    def act_block(self) -> int:
        """Inputs per activation quantization block (one int8 scale per row and block)."""
        return self.act_blocks * BLOCK

    @property
    def fast(self) -> bool:
        return self.tiles is not None and is_available()

    @property
    def nbytes(self) -> int:
        """Bytes the kernels stream per call (tiles + scales + zeros or minima)."""
        ts = [t for t in (self.tiles, self.scales, self.zeros, self.mins) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)


def _unsupported_reason(packed: PackedWeight) -> str | None:
    n, k = packed.out_features, packed.in_features
    if n == 0 or k == 0:
        return "empty weight"
    g = packed.scales.shape[1]
    if g > 1 and packed.group_size % BLOCK != 0:
        return f"group_size {packed.group_size} is not a multiple of {BLOCK}"
    return None


def _tile_codes(codes: torch.Tensor, cb: int) -> torch.Tensor:
    """Codes uint8 [N, K] -> uint8 [T, KB, 32*cb] in the layout of cpu/lowbit_kernels.h.

    The readable (slow) twin of the C++ ``repack`` that ``prepare`` uses; the tests hold them equal.
    """
    n, k = codes.shape
    t, kb = -(-n // TILE_ROWS), -(-k // BLOCK)
    c = torch.zeros(t * TILE_ROWS, kb * BLOCK, dtype=torch.uint8)
    c[:n, :k] = codes
    # u[t, kb, j, r, i] = code[8t + r, 32kb + 4j + i]: one 4-byte lane per row, 8 vectors j per block.
    u = c.view(t, TILE_ROWS, kb, 8, 4).permute(0, 2, 3, 1, 4).reshape(t, kb, 8 // cb, cb, 32)
    # Unpacked vector j = p + cb*s sits in bits [s*cb, s*cb + cb) of packed vector p.
    w = u[:, :, 0].clone()
    for s in range(1, 8 // cb):
        w |= u[:, :, s] << (s * cb)
    return w.reshape(t, kb, cb * 32).contiguous()


def _tile_rows(v: torch.Tensor, n: int) -> torch.Tensor:
    """Per-(row, group) values [N, G] -> [T, G, 8] of the same dtype (rows padded with zeros)."""
    t = -(-n // TILE_ROWS)
    out = torch.zeros(t * TILE_ROWS, v.shape[1], dtype=v.dtype)
    out[:n] = v
    return out.view(t, TILE_ROWS, v.shape[1]).permute(0, 2, 1).contiguous()


def act_blocks_for(group_blocks: int, per_channel: bool, act_block: int | str | None = None,
                   k_blocks: int = 0) -> int:
    """K-blocks per activation block. By default (``act_block`` None): MAX_ACT_BLOCKS for per-channel weights,
    else the largest d <= it dividing ``group_blocks`` (an activation block never straddles a weight group).
    ``act_block`` (inputs, see ``quant_linear.set_act_block``): ``"row"`` gives ``k_blocks`` (the whole row);
    a multiple of 32 gives its blocks, which for grouped weights must divide the group or span the row.

    Larger blocks let the GEMM sum more integer products per float conversion (measured 9% faster at
    M = 197, K = 4096 with AVX-512 than 32-input blocks); 128 inputs keep the rounding error near theirs
    (relative error ~0.65% vs ~0.53% for Gaussian activations).
    """
    check_act_block(act_block)
    if act_block == ROW_ACT_BLOCK:
        return max(1, k_blocks)
    if act_block is not None:
        blocks = int(act_block) // BLOCK
        if per_channel or group_blocks % blocks == 0 or blocks >= k_blocks:
            return min(blocks, max(1, k_blocks)) if k_blocks else blocks
        raise LowbitError(f"act_block {act_block} neither divides the weight group ({group_blocks * BLOCK} inputs) "
                         f"nor spans the row ({k_blocks * BLOCK}): use a divisor of the group or {ROW_ACT_BLOCK!r}")
    return default_act_blocks(group_blocks, per_channel)


def activation_block(packed: PackedWeight, act_block: int | str | None = None) -> int | None:
    """Inputs per int8 activation block (one scale per row and block) the kernels use for ``packed`` with a
    layer's ``act_block`` setting, or None where they do not run it (the reference path: float activations).
    What another runtime must reproduce to round activations as lowbit does (``workflows/export/onnx.py``)."""
    if _unsupported_reason(packed) is not None or not is_available():
        return None
    g = packed.scales.shape[1]
    kb = -(-packed.in_features // BLOCK)
    return act_blocks_for(kb if g == 1 else packed.group_size // BLOCK, g == 1, act_block, kb) * BLOCK


def repack(qweight: torch.Tensor, bits: int, n: int, k: int) -> torch.Tensor:
    """The stored bitstream [N, ceil(K*bits/8)] as kernel tiles (``_tile_codes``'s layout), once at load time.
    The C++ repack reads 1/2/3/4/8-bit streams: 5 and 6-bit codes are widened to bytes first."""
    ext = _extension()
    if bits in (5, 6):
        return ext.repack(unpack_codes(qweight, bits, k), 8, n, k, 8)  # type: ignore[union-attr]
    return ext.repack(qweight, bits, n, k, container_bits(bits))  # type: ignore[union-attr]


def release_packed(packed: PackedWeight) -> int:
    """Drop the resident pages of ``packed``'s stored tensors where they are an unmodified memory map of a
    checkpoint (``lowbit.io.release_pages``): once repacked into tiles the kernels never read them, so a loaded
    model does not hold its weights twice. Bytes released."""
    from lowbit.io import release_pages

    stored = (packed.qweight, packed.scales, packed.zeros, getattr(packed, "offsets", None))
    return sum(release_pages(t) for t in stored if t is not None)


def prepare(packed: PackedWeight, bias: torch.Tensor | None = None, splits: list[int] | None = None,
            act_block: int | str | None = None) -> FastWeight:
    """Repack ``packed`` once into the kernel layout (call at load time, not per forward).

    ``bias`` [N] goes into the handle's ``call``; ``splits`` (output widths summing to N) are the siblings of
    a fused group (``lowbit.kernels.fusion``); ``act_block``: the activation quantization blocks
    (``act_blocks_for``; None: the default).
    """
    check_act_block(act_block)
    reason = _unsupported_reason(packed)
    bits = packed.bits
    scales = packed.scales
    if reason is None and bits == 1 and packed.zeros is None:
        scales = scales * 2  # binary (q - 1/2) * 2s: effective scale 2s (exact in fp16 unless it overflows)
        if not bool(torch.isfinite(scales).all()):
            reason = "binary scale 2*s overflows float16"
    if reason is None and not is_available():
        reason = unavailable_reason()
    cb = container_bits(bits)
    n, k = packed.out_features, packed.in_features
    offsets = getattr(packed, "offsets", None)  # offset storage (kernels.offsets, w = q * s + m): fp16 [N, G]
    zero_const = symmetric_zero(bits) if packed.zeros is None and offsets is None else 1.0
    if reason is not None:
        return FastWeight(packed, None, None, None, zero_const, cb, cb == 8, n, k, 0, reason)
    g = packed.scales.shape[1]
    kb = -(-k // BLOCK)
    group_blocks = kb if g == 1 else packed.group_size // BLOCK
    ext = _extension()
    tiles = repack(packed.qweight, bits, n, k)
    tiled_scales = _tile_rows(scales.to(torch.float16), n)
    zeros = None if packed.zeros is None else _tile_rows(packed.zeros, n)
    mins = None if offsets is None else _tile_rows(offsets.to(torch.float16), n)
    act_blocks = act_blocks_for(group_blocks, g == 1, act_block, kb)
    dense = packed.dequantize().float() if n * k <= DENSE_MAX_WEIGHTS else None
    call = ext.Prepared(tiles, tiled_scales, zeros, zero_const, bias, cb, cb == 8, n, k,  # type: ignore[union-attr]
                        group_blocks, act_blocks, list(splits or []), mins=mins, dense=dense,
                        dense_min_rows=DENSE_MIN_ROWS)
    release_packed(packed)  # the tiles hold the codes now; the reference fallback maps the rows again if needed
    return FastWeight(packed=packed, tiles=tiles, scales=tiled_scales, zeros=zeros, zero_const=zero_const, cb=cb,
                      full_byte=cb == 8, n=n, k=k, group_blocks=group_blocks, reason=None, act_blocks=act_blocks,
                      call=call, mins=mins)


def linear(
    x: torch.Tensor,
    handle: FastWeight,
    bias: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [..., N] = (x [..., K] / input_scale) @ W^T + bias with the prepared weight ``handle``.

    Inference only: when ``x`` requires grad (or the weight is unsupported, or the kernels are unavailable)
    the reference path is used, so results are correct everywhere.
    """
    if input_scale is not None:
        x = x / input_scale.to(x.dtype)
    ext = extension()
    if ext is None or handle.tiles is None or x.requires_grad or not x.is_cpu:
        return reference_linear(x, handle.packed, bias)
    # Reshaping to [M, K], dtype conversions and the output view all happen in C++ (cheaper per call).
    return ext.linear(x, handle.tiles, handle.scales, handle.zeros, handle.zero_const,  # type: ignore[attr-defined]
                      bias, handle.cb, handle.full_byte, handle.n, handle.k, handle.group_blocks, handle.act_blocks,
                      mins=handle.mins)

def error_bound(x: torch.Tensor, w: torch.Tensor, act_block: int) -> torch.Tensor:
    """The stated elementwise bound of the kernels (module docstring), float64 [M, N]:
    ``sum_b (a_b / 2) * sum_{k in b} |W[n, k]|`` for x [M, K] (already divided by any ``input_scale``),
    the dequantized weight w [N, K] and activation blocks of ``act_block`` inputs (``FastWeight.act_block``).
    Float32 accumulation rounding comes on top (a few ulps of ``|x| @ |W|^T``).
    """
    m, k = x.shape
    kp = -(-k // act_block) * act_block
    xp = torch.zeros(m, kp, dtype=torch.float64)
    xp[:, :k] = x.double()
    wp = torch.zeros(w.shape[0], kp, dtype=torch.float64)
    wp[:, :k] = w.double().abs()
    a = xp.view(m, -1, act_block).abs().amax(-1) / 127.0  # [M, KA] activation scales a_b
    wsum = wp.view(w.shape[0], -1, act_block).sum(-1)  # [N, KA]
    return (a / 2.0) @ wsum.T


_FAST_KEY = "fast_cpu"


def buffer_state(layer: QuantLinear) -> tuple[Any, ...]:
    """Identity and version of each of the layer's buffers (packed weight, bias, any variant's extras).

    Cheaper per call than ``quant_linear._cache_key`` (this is on the M = 1 decode path): a load or ``.to()``
    makes new tensors (new ids), an in-place write bumps the version. The cache entry keeps the tensors alive,
    so an id cannot be reused while it is compared.
    """
    return tuple([tensor_state(t) for t in layer._buffers.values()])


def tensor_state(t: torch.Tensor | None) -> tuple[int, int] | None:
    """(identity, version) of a tensor (-1 for inference tensors, which have none), None for None: a cache key that
    changes when the tensor is replaced or written in place."""
    return None if t is None else (id(t), -1 if t.is_inference() else t._version)


def prepared(layer: QuantLinear) -> FastWeight:
    """The layer's weight (and bias) prepared for the kernels, cached on it until its buffers change."""
    cache: dict[str, Any] = layer._lowbit_cache  # cleared by load_state_dict / .to() (_drop_cache)
    state = (buffer_state(layer), layer.act_block)
    hit = cache.get(_FAST_KEY)
    if hit is not None and hit[0] == state:
        return hit[1]
    with torch.inference_mode(False), torch.no_grad():
        handle = prepare(layer.packed, layer._buffers.get("bias"), act_block=layer.act_block)
    cache[_FAST_KEY] = (state, handle, list(layer._buffers.values()))
    return handle


def cpu_backend(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """``LINEAR_BACKENDS["cpu"]`` (the default backend): the layer's packed weight through the fast kernels.

    ``x`` arrives already divided by ``input_scale``. Siblings linked by ``lowbit.kernels.fusion`` share one
    call. Where the kernels cannot run (extension unavailable, unsupported group size, ``x`` requires grad or
    is not on the CPU) the layer's ``reference`` backend is used, with its cached dequantized weight. A fused
    activation (``layer.output_clamp``) is applied in the kernel's write-out.
    """
    if x.requires_grad or not x.is_cpu:
        return reference_backend(layer, x)
    shared = layer.__dict__.get(GROUP_ATTR)
    if shared is not None:
        y = shared[0].output(shared[1], x)
        if y is not None:
            return y
    call = prepared(layer).call
    if call is None:
        return reference_backend(layer, x)
    clamp = layer.output_clamp  # a fused activation: clamped in the kernel's write-out
    if layer.act_spec is not None:  # activation quantization (lowbit.kernels.act_quant)
        static = act_quant.kernel_static(layer)
        if static is not None:  # the precomputed scale: no per-row maximum pass
            scale, lo, hi = static
            return call(x, clamp is not None, *(clamp or (0.0, 0.0)), act_scale=scale, act_lo=lo, act_hi=hi)
        if not act_quant.kernel_dynamic(layer):
            x = act_quant.input_quant(layer, x)  # emulated grid; the kernels' dynamic int8 rounding on top
    return call(x) if clamp is None else call(x, True, *clamp)


LINEAR_BACKENDS.register("cpu")(cpu_backend)


@register_lowering(QuantLinear)
def lowered_linear(layer: QuantLinear) -> Lowered | None:
    """The layer's forward on the "cpu" backend as one call of its prepared weight (``lowbit.kernels.lowering``):
    the call ``cpu_backend`` makes, with the input scale, clamp and (for ``QuantConv2d1x1``) the channels-last
    view and memory format of its forward (what it captures: ``QuantLinear._plan_reads``). None for what
    ``cpu_backend`` routes elsewhere (variants with their own matmul, activation quantization, fused siblings,
    another backend, the reference fallback)."""
    cls = type(layer)
    if cls._matmul is not QuantLinear._matmul or cls.forward not in (QuantLinear.forward, QuantConv2d1x1.forward) \
            or layer.backend != "cpu" or layer.act_spec is not None or GROUP_ATTR in layer.__dict__:
        return None
    call = prepared(layer).call
    if call is None or not is_available():
        return None
    clamp = layer.output_clamp
    scale = layer._buffers["input_scale"]
    if not isinstance(layer, QuantConv2d1x1):
        extra = () if clamp is None else (True, *clamp)

        def linear_call(x: torch.Tensor) -> torch.Tensor:
            return call(x if scale is None else x / scale, *extra)

        return Lowered(linear_call)
    conv_args = (scale, clamp is not None, *(clamp or (0.0, 0.0)))

    def conv1x1_call(x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return layer.forward(x)  # its error
        return call.conv1x1(x, *conv_args)  # QuantConv2d1x1.forward's permutes and memory format, in C++

    return Lowered(conv1x1_call)
