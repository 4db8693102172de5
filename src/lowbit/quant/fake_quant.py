"""Fake quantizers for quantization-aware training: straight-through estimators with learnable scales (LSQ).

Esser, McKinstry, Bablani, Appuswamy, Modha (2020), "Learned Step Size Quantization", arXiv:1902.08153: the
step s is a parameter; ``w_q = clamp(round(w / s), lo, hi) * s`` with the straight-through estimator for the
rounding, which gives ∂w_q/∂w = 1 inside the range (0 outside) and ∂w_q/∂s = round(w/s) - w/s inside (lo or
hi outside); the gradient of s is scaled by g = 1 / sqrt(n_weights_per_scale * Q_P) so its step size keeps
pace with the weights'. Below two bits the same recipe with other level sets:

- ``binary`` (bits 1): ``w_q = s * sign(w)``, sign STE with clipping (∂/∂w = 1 for |w| <= s; Courbariaux et
  al. 2016, "Binarized Neural Networks", arXiv:1602.02830), s initialised at mean |w| (XNOR-Net).
- ``ternary`` (bits 2, method ternary): ``w_q = s * clamp(round(w / s), -1, 1)``, s initialised at the
  BitNet b1.58 absmean, so the zero threshold s/2 starts at half the absmean and is learned with s.
- ``pbllm`` (bits 1): binary as above, plus on a FIXED salient mask (chosen by magnitude at preparation) the
  residual over the binary value quantized to int8 with a learnable per-row step (PB-LLM, arXiv:2310.00034).
- ``pbllm-hessian``: the same, its salient mask by w² diag(H) from the calibration Hessian (``prepare_qat``
  with a calibration provider), as the post-training method.
- ``minmax`` (bits 2..8): ``w_q = clamp(round((w - m) / s), 0, 2^b - 1) * s + m`` with a learnable step s and
  float group minimum m (the offset storage of the ``minmax`` method), initialised on its min/max grid.
- ``lsq`` (bits 2..8; methods rtn, gptq, awq): the uniform grid of lowbit.quant.primitives — symmetric with
  a SIGNED step (levels -2^(b-1) .. 2^(b-1)-1), or asymmetric with a learnable zero point (rounded STE,
  as in LSQ+, Bhalgat et al. 2020, arXiv:2004.09576). Always initialised on the RTN grid: GPTQ's error
  compensation and AWQ's input scaling are post-training procedures with no QAT counterpart here.

Exactness: every quantizer's forward VALUE is computed by the same functions as its packed form (``pack``),
from the fp16-rounded steps the packed format stores, so a folded model computes exactly what the fake-quant
model computed. The differentiable LSQ expression only supplies the gradient:
``out = exact.detach() + (surrogate - surrogate.detach())``.

Example:
    >>> import torch
    >>> from lowbit.quant.primitives import QuantSpec
    >>> q = make_quantizer("binary", torch.randn(4, 16), QuantSpec(1), {}, "linear")
    >>> w = torch.randn(4, 16, requires_grad=True)
    >>> q(w).sum().backward(); w.grad is not None and q.scale.grad is not None
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels.formats import expand_groups
from lowbit.kernels.sparse_side import SIDE_QMAX, side_codes, side_row_scales, side_values_dense
from lowbit.kernels.storage import find_format
from lowbit.quant.binary import binary_codes, binary_scales, binary_values, check_bits, grouped
from lowbit.quant.methods import QuantContext, QuantResult, check_options
from lowbit.quant.minmax import check_spec, minmax_codes, minmax_grid, minmax_pack
from lowbit.quant.pbllm import DEFAULT_FRACTION, check_fraction, pbllm_pack, salient_mask
from lowbit.quant.primitives import (
    MAX_SCALE,
    MIN_SCALE,
    QuantSpec,
    compute_scales,
    dequantize_codes,
    packed_from_codes,
    quantize_codes,
)
from lowbit.quant.ternary import stored_as, ternary_codes, ternary_levels, ternary_scales, ternary_storage
from lowbit.registry import Registry


# --- estimator pieces ---------------------------------------------------------------------------------------
def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Value ``x``, gradient multiplied by ``g`` (LSQ's step-size gradient scaling)."""
    return (x - x * g).detach() + x * g


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """sign(x) forward (zero counts as +1, as the 1-bit codes do), gradient 1 for |x| <= 1 else 0."""
    clipped = x.clamp(-1.0, 1.0)
    return clipped + (torch.where(x >= 0, 1.0, -1.0) - clipped).detach()


def fp16_ste(s: torch.Tensor) -> torch.Tensor:
    """``s`` rounded to the nearest float16 (magnitude clamped to [2^-24, 65504], sign kept), identity gradient."""
    sign = torch.where(s < 0, -1.0, 1.0)
    clamped = sign * s.abs().clamp(MIN_SCALE, MAX_SCALE)
    return clamped + (clamped.detach().to(torch.float16).to(torch.float32) - clamped).detach()


def fp16_value_ste(v: torch.Tensor) -> torch.Tensor:
    """``v`` rounded to the nearest float16 (clamped to +-65504; zero stays zero), identity gradient: a stored
    fp16 value that is not a step (the float minima of the offset format)."""
    clamped = v.clamp(-MAX_SCALE, MAX_SCALE)
    return clamped + (clamped.detach().to(torch.float16).to(torch.float32) - clamped).detach()


def stored_scale(s: torch.Tensor) -> torch.Tensor:
    """The fp16-representable float32 value ``fp16_ste`` gives, without gradient (what gets packed)."""
    return fp16_ste(s.detach())


def _ungroup(t: torch.Tensor, k: int) -> torch.Tensor:
    """[N, G, gs] -> [N, K] (drops the padding of the last group)."""
    return t.reshape(t.shape[0], -1)[:, :k]


# --- quantizers -----------------------------------------------------------------------------------------------
class FakeQuantizer(nn.Module):
    """Base: ``forward(w [N, K]) -> w_q [N, K]`` (exact value, LSQ gradient); ``pack(w)`` folds to storage."""

    name = "?"

    def __init__(self, spec: QuantSpec, k: int, kind: str) -> None:
        super().__init__()
        self.spec = spec
        self.group_size = spec.group_size_for(k)
        self.kind = kind

    def exact(self, w: torch.Tensor) -> torch.Tensor:
        """The quantized weight float32 [N, K], computed as the packed format decodes it (no gradient)."""
        raise NotImplementedError

    def surrogate(self, w: torch.Tensor) -> torch.Tensor:
        """The differentiable LSQ expression (same value up to float rounding)."""
        raise NotImplementedError

    def pack(self, w: torch.Tensor, shape: tuple[int, ...] | None = None) -> QuantResult:
        """The packed weight (and storage kind) whose dequantization equals ``exact(w)``; ``w`` is [N, K],
        ``shape`` the original weight shape (e.g. a conv's [N, C, kh, kw]; default [N, K])."""
        raise NotImplementedError

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            value = self.exact(w.detach().to(torch.float32))
        if not torch.is_grad_enabled():
            return value
        sur = self.surrogate(w.to(torch.float32))
        return value + (sur - sur.detach())

    def extra_repr(self) -> str:
        return f"{self.spec.short()}, group_size={self.group_size}"


class UniformLSQ(FakeQuantizer):
    """LSQ on the uniform grid of lowbit.quant.primitives (bits 2..8), initialised at RTN."""

    name = "lsq"

    def __init__(self, w: torch.Tensor, spec: QuantSpec, kind: str) -> None:
        super().__init__(spec, w.shape[1], kind)
        scales, zeros = compute_scales(w, spec)  # [N, G]; the RTN grid (symmetric steps are signed)
        self.scale = nn.Parameter(scales.clone())
        self.zero = None if spec.symmetric else nn.Parameter(zeros.clone())
        q_p = (1 << (spec.bits - 1)) - 1 if spec.symmetric else spec.maxq
        self.g = 1.0 / math.sqrt(self.group_size * max(q_p, 1))

    def _zero_codes(self) -> torch.Tensor | None:
        return None if self.zero is None else torch.round(self.zero.detach()).clamp(0, self.spec.maxq)

    def exact(self, w: torch.Tensor) -> torch.Tensor:
        s, z = stored_scale(self.scale), self._zero_codes()
        return dequantize_codes(quantize_codes(w, s, z, self.spec), s, z, self.spec)

    def surrogate(self, w: torch.Tensor) -> torch.Tensor:
        s = fp16_ste(grad_scale(self.scale, self.g)).unsqueeze(-1)  # [N, G, 1]
        wg = grouped(w, self.group_size)  # [N, G, gs]
        if self.zero is None:
            half = 1 << (self.spec.bits - 1)
            return _ungroup(torch.clamp(round_ste(wg / s), -half, half - 1) * s, w.shape[1])
        z = torch.clamp(round_ste(grad_scale(self.zero, self.g)), 0, self.spec.maxq).unsqueeze(-1)  # [N, G, 1]
        q = torch.clamp(round_ste(wg / s) + z, 0, self.spec.maxq)
        return _ungroup((q - z) * s, w.shape[1])

    def pack(self, w: torch.Tensor, shape: tuple[int, ...] | None = None) -> QuantResult:
        s, z = stored_scale(self.scale), self._zero_codes()
        codes = quantize_codes(w, s, z, self.spec)
        return QuantResult(packed=packed_from_codes(codes, s, z, self.spec, shape or tuple(w.shape)))


class BinaryLSQ(FakeQuantizer):
    """sign(w) * s with a learnable positive per-group s (mean |w| at start)."""

    name = "binary"

    def __init__(self, w: torch.Tensor, spec: QuantSpec, kind: str, exclude: torch.Tensor | None = None) -> None:
        super().__init__(spec, w.shape[1], kind)
        self.scale = nn.Parameter(binary_scales(w, self.group_size, exclude))  # [N, G]
        self.g = 1.0 / math.sqrt(self.group_size)

    def _binary_surrogate(self, w: torch.Tensor) -> torch.Tensor:
        s = fp16_ste(grad_scale(self.scale.abs(), self.g)).unsqueeze(-1)  # [N, G, 1]
        return _ungroup(s * sign_ste(grouped(w, self.group_size) / s), w.shape[1])

    def exact(self, w: torch.Tensor) -> torch.Tensor:
        return binary_values(binary_codes(w), stored_scale(self.scale.abs()), self.group_size)

    def surrogate(self, w: torch.Tensor) -> torch.Tensor:
        return self._binary_surrogate(w)

    def pack(self, w: torch.Tensor, shape: tuple[int, ...] | None = None) -> QuantResult:
        s = stored_scale(self.scale.abs())
        packed = packed_from_codes(binary_codes(w), s, None, self.spec, shape or tuple(w.shape))
        return QuantResult(packed=packed)


class TernaryLSQ(FakeQuantizer):
    """s * clamp(round(w / s), -1, 1) with a learnable positive per-group s (absmean at start)."""

    name = "ternary"

    def __init__(self, w: torch.Tensor, spec: QuantSpec, kind: str, storage: str = "codes") -> None:
        super().__init__(spec, w.shape[1], kind)
        self.scale = nn.Parameter(ternary_scales(w, self.group_size))  # [N, G]
        self.g = 1.0 / math.sqrt(self.group_size)
        self.storage = storage
        self.row = ternary_storage(storage, kind)  # the storage table's row of the ``storage`` option

    def _codes(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = stored_scale(self.scale.abs())
        return ternary_codes(ternary_levels(w, s, self.group_size)), s

    def exact(self, w: torch.Tensor) -> torch.Tensor:
        codes, s = self._codes(w)
        return dequantize_codes(codes, s, None, self.spec)

    def surrogate(self, w: torch.Tensor) -> torch.Tensor:
        s = fp16_ste(grad_scale(self.scale.abs(), self.g)).unsqueeze(-1)  # [N, G, 1]
        return _ungroup(torch.clamp(round_ste(grouped(w, self.group_size) / s), -1, 1) * s, w.shape[1])

    def pack(self, w: torch.Tensor, shape: tuple[int, ...] | None = None) -> QuantResult:
        codes, s = self._codes(w)
        return stored_as(self.row, packed_from_codes(codes, s, None, self.spec, shape or tuple(w.shape)), self.kind)


class PBLLMLSQ(BinaryLSQ):
    """Binary everywhere + int8 residual (learnable per-row step) on a fixed salient mask."""

    name = "pbllm"

    def __init__(self, w: torch.Tensor, spec: QuantSpec, kind: str, fraction: float,
                 hessian: torch.Tensor | None = None) -> None:
        mask = salient_mask(w, fraction, hessian)  # by |w|, or by w^2 diag(H) (pbllm-hessian)
        super().__init__(w, spec, kind, exclude=mask)
        self.stored_kind = find_format("side", 1).kind_for(kind, "pbllm")
        self.register_buffer("mask", mask)  # persistent: a resumed run must keep the same salient set
        residual = w - binary_values(binary_codes(w), self.scale.detach(), self.group_size)
        self.row_step = nn.Parameter(side_row_scales(residual, mask))  # [N]
        self.g_row = 1.0 / math.sqrt(w.shape[1] * SIDE_QMAX)

    def exact(self, w: torch.Tensor) -> torch.Tensor:
        wb = super().exact(w)
        rs = stored_scale(self.row_step.abs())
        return wb + side_values_dense(side_codes(w - wb, rs), rs, self.mask)

    def surrogate(self, w: torch.Tensor) -> torch.Tensor:
        wb = self._binary_surrogate(w)
        rs = fp16_ste(grad_scale(self.row_step.abs(), self.g_row)).unsqueeze(-1)  # [N, 1]
        rq = torch.clamp(round_ste((w - wb) / rs), -SIDE_QMAX, SIDE_QMAX) * rs
        return wb + rq * self.mask

    def pack(self, w: torch.Tensor, shape: tuple[int, ...] | None = None) -> QuantResult:
        packed = pbllm_pack(w, self.spec, self.mask, shape or tuple(w.shape), scales=stored_scale(self.scale.abs()),
                            row_scale=stored_scale(self.row_step.abs()))
        return QuantResult(packed=packed, kind=self.stored_kind)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, salient={int(self.mask.sum())}"


class MinMaxLSQ(FakeQuantizer):
    """``q * s + m`` on the min/max grid with float group minima (``minmax``, offset storage): a learnable
    positive step s and minimum m per group, both starting on ``minmax``'s grid. The minimum's gradient comes
    from clipped weights only (LSQ+'s offset, Bhalgat et al. 2020, arXiv:2004.09576)."""

    name = "minmax"

    def __init__(self, w: torch.Tensor, spec: QuantSpec, kind: str) -> None:
        check_spec(spec)
        super().__init__(spec, w.shape[1], kind)
        self.stored_kind = find_format("offset", spec.bits).kind_for(kind, "minmax")
        s, m = minmax_grid(w, spec)  # fp16 [N, G]
        self.scale = nn.Parameter(s.float())
        self.minimum = nn.Parameter(m.float())
        self.g = 1.0 / math.sqrt(self.group_size * spec.maxq)

    def _grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fp16 steps and minima [N, G] the packed format stores."""
        return stored_scale(self.scale.abs()).to(torch.float16), fp16_value_ste(self.minimum.detach()).to(torch.float16)

    def exact(self, w: torch.Tensor) -> torch.Tensor:
        s, m = self._grid()
        k = w.shape[1]
        # codes * s + m with the same float32 operations as OffsetPacked.dequantize
        return (minmax_codes(w, s, m, self.spec) * expand_groups(s.float(), k, self.group_size)
                + expand_groups(m.float(), k, self.group_size))

    def surrogate(self, w: torch.Tensor) -> torch.Tensor:
        s = fp16_ste(grad_scale(self.scale.abs(), self.g)).unsqueeze(-1)  # [N, G, 1]
        m = fp16_value_ste(grad_scale(self.minimum, self.g)).unsqueeze(-1)
        q = torch.clamp(round_ste((grouped(w, self.group_size) - m) / s), 0, self.spec.maxq)
        return _ungroup(q * s + m, w.shape[1])

    def pack(self, w: torch.Tensor, shape: tuple[int, ...] | None = None) -> QuantResult:
        packed = minmax_pack(w.reshape(shape) if shape else w, self.spec, self._grid())
        return QuantResult(packed=packed, kind=self.stored_kind)


# --- registry: recipe method -> fake quantizer ----------------------------------------------------------------
QuantizerFactory = Callable[[torch.Tensor, QuantSpec, dict[str, Any], str, QuantContext], FakeQuantizer]


@dataclass(frozen=True)
class QATQuantizer:
    """How a recipe method trains: ``make(w [N, K], spec, options, kind, ctx)`` builds its fake quantizer;
    ``needs_calibration``: ``make`` reads the layer's calibration statistics in ``ctx`` (``prepare_qat`` then
    needs a calibration provider)."""

    make: QuantizerFactory
    needs_calibration: bool = False


QAT_QUANTIZERS: Registry[QATQuantizer] = Registry("QAT quantizer (recipe method)")


def _uniform(w: torch.Tensor, spec: QuantSpec, options: dict[str, Any], kind: str, ctx: QuantContext) -> FakeQuantizer:
    # rtn/gptq/awq options configure post-training procedures; QAT starts from the RTN grid regardless.
    return BinaryLSQ(w, spec, kind) if spec.bits == 1 else UniformLSQ(w, spec, kind)


def _binary(w: torch.Tensor, spec: QuantSpec, options: dict[str, Any], kind: str, ctx: QuantContext) -> FakeQuantizer:
    check_options("binary", options, ())
    check_bits("binary", spec, 1, "'vision=w1:binary'")
    return BinaryLSQ(w, spec, kind)


def _ternary(w: torch.Tensor, spec: QuantSpec, options: dict[str, Any], kind: str, ctx: QuantContext) -> FakeQuantizer:
    check_options("ternary", options, ("rule", "storage"))
    check_bits("ternary", spec, 2, "'vision=w1.58'")
    return TernaryLSQ(w, spec, kind, options.get("storage", "codes"))


def _pbllm_factory(name: str, use_hessian: bool) -> QATQuantizer:
    def make(w: torch.Tensor, spec: QuantSpec, options: dict[str, Any], kind: str,
             ctx: QuantContext) -> FakeQuantizer:
        check_options(name, options, ("fraction",))
        check_bits(name, spec, 1, f"'text=w1:{name}'")
        # As in post-training pbllm-hessian: a layer no calibration row reached is ranked by magnitude.
        hessian = ctx.hessian if use_hessian else None
        return PBLLMLSQ(w, spec, kind, check_fraction(options.get("fraction", DEFAULT_FRACTION)), hessian)

    return QATQuantizer(make, needs_calibration=use_hessian)


def _minmax(w: torch.Tensor, spec: QuantSpec, options: dict[str, Any], kind: str, ctx: QuantContext) -> FakeQuantizer:
    check_options("minmax", options, ())
    return MinMaxLSQ(w, spec, kind)


for _name, _entry in (("rtn", QATQuantizer(_uniform)), ("gptq", QATQuantizer(_uniform)),
                      ("awq", QATQuantizer(_uniform)), ("binary", QATQuantizer(_binary)),
                      ("ternary", QATQuantizer(_ternary)), ("pbllm", _pbllm_factory("pbllm", False)),
                      ("pbllm-hessian", _pbllm_factory("pbllm-hessian", True)), ("minmax", QATQuantizer(_minmax))):
    QAT_QUANTIZERS.register(_name)(_entry)


def make_quantizer(method: str, w: torch.Tensor, spec: QuantSpec, options: dict[str, Any], kind: str,
                   ctx: QuantContext | None = None) -> FakeQuantizer:
    """The fake quantizer for a recipe rule's ``method`` on weight ``w`` [N, K] of layer ``kind``; ``ctx``
    carries the layer's calibration statistics for methods that read them (``QATQuantizer.needs_calibration``).

    Example:
        >>> make_quantizer("rtn", torch.randn(8, 32), QuantSpec(4, 16), {}, "linear").name
        'lsq'
    """
    entry = QAT_QUANTIZERS.get(method)
    if entry.needs_calibration and ctx is None:
        raise LowbitError(f"the QAT quantizer of method {method!r} needs calibration statistics (e.g. its "
                          "Hessian); pass a QuantContext (prepare_qat: calibration=...)")
    return entry.make(w.detach().to(torch.float32), spec, dict(options), kind, ctx or QuantContext(kind=kind))
