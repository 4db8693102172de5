"""Activation quantization of packed linears: the scheme (``ActSpec``), its stored scales, and the quantizer.

A ``QuantLinear`` with ``act_spec`` rounds its input (after any ``input_scale``) to a ``bits``-bit integer grid
before the matmul:

- **static** (``dynamic=False``): scales calibrated once (``lowbit.quant.act_calibration``) and stored in the
  checkpoint as the float32 buffers ``act_scale`` [S] (and ``act_zero`` [S], integer-valued, when asymmetric);
  S = 1 per tensor, ceil(K / group_size) per group of input channels;
- **dynamic**: scales from each token's (row's) or each group's own maximum at run time (nothing stored).

The grid (one rule for every path, so the kernels, the reference and calibration agree bit for bit)::

    c = clamp(round_half_even(x * inv), lo, hi),   x_hat = a * c,   inv = float32(1 / a)
    symmetric:  lo, hi = -(2^(bits-1) - 1), 2^(bits-1) - 1          (a8: +-127, a4: +-7)
    asymmetric: lo, hi = -z, 2^bits - 1 - z  with the integer zero point z

Static per-tensor schemes whose range fits int8 (a8 symmetric, a2..a7 either way) run natively on the CPU
kernels (``lowbit.kernels.fast``: a precomputed scale, no per-row maximum pass); so do dynamic a8 symmetric
per-token (one kernel scale per row) and per-group schemes (groups a multiple of 32). Every other scheme, and
the ``reference`` backend, applies the quantizer above in float (exact: integer grid values times a scale) and
then the weight matmul.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError

ACT_BITS = (2, 3, 4, 5, 6, 7, 8)
GRANULARITIES = ("tensor", "token", "group")
CALIBRATIONS = ("minmax", "percentile")
ACT_BUFFERS = ("act_scale", "act_zero")
KERNEL_LIMIT = 127  # the kernels' int8 activation codes stay in [-127, 127]


@dataclass(frozen=True)
class ActSpec:
    """How a layer's input activations are quantized (see the module docstring).

    ``calibration`` (static schemes): ``minmax`` (the range seen) or ``percentile`` (the ``percentile``-th
    percentile of |x| for symmetric grids, of x from both ends for asymmetric ones: clips rare outliers).
    """

    bits: int = 8
    dynamic: bool = False
    granularity: str = "tensor"
    group_size: int | None = None
    symmetric: bool = True
    calibration: str = "minmax"
    percentile: float = 99.99

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in ACT_BITS:
            raise LowbitError(f"activation bits {self.bits!r}; accepted: {', '.join(map(str, ACT_BITS))} "
                              "(or no activation quantization, a16)")
        if not isinstance(self.dynamic, bool) or not isinstance(self.symmetric, bool):
            raise LowbitError("activation 'dynamic' and 'symmetric' take true or false")
        if self.granularity not in GRANULARITIES:
            raise LowbitError(f"activation granularity {self.granularity!r}; accepted: {', '.join(GRANULARITIES)}")
        if self.granularity == "token" and not self.dynamic:
            raise LowbitError("activation granularity 'token' is dynamic only (a static scale cannot follow the "
                              "tokens); accepted: dynamic: true, or granularity tensor / group")
        gs = self.group_size
        if (self.granularity == "group") != (gs is not None) or (
                gs is not None and (isinstance(gs, bool) or not isinstance(gs, int) or gs < 1)):
            raise LowbitError(f"activation group_size {gs!r} with granularity {self.granularity!r}; accepted: a "
                              "positive integer exactly when granularity is 'group'")
        if self.calibration not in CALIBRATIONS:
            raise LowbitError(f"activation calibration {self.calibration!r}; accepted: {', '.join(CALIBRATIONS)}")
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) or \
                not 50.0 < float(self.percentile) <= 100.0:
            raise LowbitError(f"activation percentile {self.percentile!r}; accepted: a number in (50, 100]")

    @property
    def qmax(self) -> int:
        """Largest magnitude (symmetric) or code (asymmetric) of the grid."""
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    def short(self) -> str:
        """Short-string form (``lowbit.quant.recipe``): ``a8``, ``a4d`` (dynamic), ``a8dk`` (per token),
        ``a8g64`` (per group), a trailing ``z`` for an asymmetric grid (with a zero point)."""
        gran = {"tensor": "", "token": "k", "group": f"g{self.group_size}"}[self.granularity]
        return f"a{self.bits}{'d' if self.dynamic else ''}{gran}{'' if self.symmetric else 'z'}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> ActSpec:
        """The inverse of ``to_dict`` (LowbitError on unknown keys or bad values)."""
        if not isinstance(data, dict):
            raise LowbitError(f"activations: expected a mapping; received {type(data).__name__}")
        unknown = sorted(map(str, set(data) - set(cls.__dataclass_fields__)))
        if unknown:
            raise LowbitError(f"activations: unknown key {unknown[0]!r}; accepted: "
                              f"{', '.join(cls.__dataclass_fields__)}")
        return cls(**data)

    def num_scales(self, k: int) -> int:
        """Stored scales of a static scheme for K inputs (0 for dynamic ones)."""
        if self.dynamic:
            return 0
        return 1 if self.granularity == "tensor" else math.ceil(k / self.group_size)  # type: ignore[operator]


def grid_limits(spec: ActSpec, zero: torch.Tensor | None = None) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """(lo, hi) of the integer codes: symmetric ``-qmax, qmax``; asymmetric ``-z, qmax - z``."""
    if spec.symmetric:
        return -float(spec.qmax), float(spec.qmax)
    assert zero is not None
    return -zero, spec.qmax - zero


def round_to_grid(x: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor | float,
                  hi: torch.Tensor | float) -> torch.Tensor:
    """``a * clamp(round(x * float32(1/a)), lo, hi)`` (float32; a = 0 gives 0), the one rounding rule."""
    scale = scale.to(torch.float32)
    inv = torch.where(scale > 0, 1.0 / torch.where(scale > 0, scale, torch.ones_like(scale)), torch.zeros_like(scale))
    return torch.round(torch.clamp(x.to(torch.float32) * inv, lo, hi)) * scale


def _grouped(x: torch.Tensor, group: int) -> tuple[torch.Tensor, int]:
    """x [..., K] -> [..., G, group] (zero padded), and K."""
    k = x.shape[-1]
    pad = -k % group
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, group), k


def fake_quant(x: torch.Tensor, spec: ActSpec, scale: torch.Tensor | None = None,
               zero: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] rounded to ``spec``'s grid (static: with ``scale`` / ``zero`` [S]), in x's dtype."""
    dtype = x.dtype
    xf = x.to(torch.float32)
    if spec.granularity == "group":
        xg, k = _grouped(xf, spec.group_size)  # type: ignore[arg-type]
    else:
        xg, k = xf.unsqueeze(-2), xf.shape[-1]  # one group: [..., 1, K]
    if spec.dynamic:
        dims = (-1,) if spec.granularity != "tensor" else tuple(range(-xg.dim(), 0))
        if spec.symmetric:
            scale = xg.abs().amax(dim=dims, keepdim=True) / spec.qmax
            zero = None
        else:
            lo, hi = xg.amin(dim=dims, keepdim=True).clamp(max=0), xg.amax(dim=dims, keepdim=True).clamp(min=0)
            scale = (hi - lo) / spec.qmax
            zero = torch.round(-lo / torch.where(scale > 0, scale, torch.ones_like(scale)))
    else:
        if scale is None:
            raise LowbitError("a static activation scheme needs its calibrated scales (act_scale); calibrate it")
        scale = scale.to(torch.float32).reshape(-1, 1)  # [S, 1] against [..., G, group]
        zero = None if zero is None else zero.to(torch.float32).reshape(-1, 1)
    if spec.granularity == "tensor" and not spec.dynamic and float(scale) > 0:  # the rule, in place
        lo, hi = grid_limits(spec, zero)
        inv = 1.0 / scale.reshape(())  # float32, as the kernels' 1 / a
        return (xf * inv).round_().clamp_(float(lo), float(hi)).mul_(scale.reshape(())).to(dtype)
    lo, hi = grid_limits(spec, zero)
    out = round_to_grid(xg, scale, lo, hi)
    out = out.reshape(*out.shape[:-2], -1)[..., :k]
    return out.to(dtype)


def scales_from_range(spec: ActSpec, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Static (scale, zero) [S] from calibrated per-scale ranges ``lo <= 0 <= hi`` (symmetric: max |.|)."""
    lo, hi = lo.to(torch.float32).clamp(max=0), hi.to(torch.float32).clamp(min=0)
    if spec.symmetric:
        return torch.maximum(-lo, hi) / spec.qmax, None
    scale = (hi - lo) / spec.qmax
    zero = torch.round(-lo / torch.where(scale > 0, scale, torch.ones_like(scale))).clamp(0, spec.qmax)
    return scale, zero


# --- the layer side -----------------------------------------------------------------------------------------
def attach(layer: nn.Module, spec: ActSpec | None, scale: torch.Tensor | None = None,
           zero: torch.Tensor | None = None) -> nn.Module:
    """Give ``layer`` (a ``QuantLinear``) the activation scheme ``spec``; a static one gets its ``act_scale``
    (and ``act_zero``) buffers, from ``scale`` / ``zero`` or zero-filled (filled later by calibration or by a
    checkpoint's tensors). ``spec=None`` removes activation quantization."""
    for name in ACT_BUFFERS:
        layer._buffers.pop(name, None)
    layer.act_spec = spec
    if spec is None:
        return layer
    n = spec.num_scales(int(layer.in_features))
    if n:
        device = layer.qweight.device
        layer.register_buffer("act_scale", torch.zeros(n, device=device) if scale is None
                              else scale.detach().reshape(n).to(torch.float32).clone())
        if not spec.symmetric:
            layer.register_buffer("act_zero", torch.zeros(n, device=device) if zero is None
                                  else zero.detach().reshape(n).to(torch.float32).clone())
    # Dynamic a8 symmetric per token / per group is what the kernels do natively with these blocks.
    if spec.dynamic and spec.bits == 8 and spec.symmetric:
        if spec.granularity == "token":
            layer.act_block = "row"
        elif spec.granularity == "group" and spec.group_size % 32 == 0:  # type: ignore[operator]
            layer.act_block = spec.group_size
    return layer


def input_quant(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input rounded to its activation grid (float emulation; identity without ``act_spec``)."""
    spec = getattr(layer, "act_spec", None)
    if spec is None:
        return x
    return fake_quant(x, spec, layer._buffers.get("act_scale"), layer._buffers.get("act_zero"))


def kernel_static(layer: nn.Module) -> tuple[float, float, float] | None:
    """(scale, lo, hi) for the kernels' static entry when the layer's scheme runs there natively, else None.

    Cached on the layer until its scale buffers change (reading a tensor element per call costs microseconds,
    a tenth of a small layer's kernel call)."""
    spec = getattr(layer, "act_spec", None)
    if spec is None or spec.dynamic or spec.granularity != "tensor":
        return None
    bufs = layer._buffers
    key = (spec, *[(id(t), -1 if t.is_inference() else t._version) for n in ACT_BUFFERS
                   if (t := bufs.get(n)) is not None])
    hit = layer.__dict__.get("_lowbit_static")
    if hit is not None and hit[0] == key:
        return hit[1]
    args = _static_args(layer, spec)
    layer.__dict__["_lowbit_static"] = (key, args, [bufs.get(n) for n in ACT_BUFFERS])  # keep ids alive
    return args


def _static_args(layer: nn.Module, spec: ActSpec) -> tuple[float, float, float] | None:
    scale = float(layer._buffers["act_scale"][0])
    if spec.symmetric:
        lo, hi = -float(spec.qmax), float(spec.qmax)
    else:
        z = float(layer._buffers["act_zero"][0])
        lo, hi = -z, spec.qmax - z
    if lo < -KERNEL_LIMIT or hi > KERNEL_LIMIT or not scale > 0:
        return None
    return scale, lo, hi


def kernel_dynamic(layer: nn.Module) -> bool:
    """True when the kernels' own dynamic int8 quantization IS the layer's scheme (a8 symmetric, per token with
    ``act_block`` "row" or per group with ``act_block`` its group)."""
    spec = getattr(layer, "act_spec", None)
    if spec is None or not spec.dynamic or spec.bits != 8 or not spec.symmetric:
        return False
    block = getattr(layer, "act_block", None)
    return (spec.granularity == "token" and block == "row") or (
        spec.granularity == "group" and block == spec.group_size)


def parse_short(text: str) -> ActSpec:
    """``aBITS[d][k|gGROUP][z]`` -> ``ActSpec`` (``ActSpec.short`` is the inverse): ``a8`` static per tensor,
    ``a8d`` dynamic per tensor, ``a8dk`` dynamic per token, ``a8g64`` static per group of 64 inputs, ``a4z``
    asymmetric (zero point). ``a16`` means none: it is handled by the caller (returns no spec)."""
    form = "aBITS[d][k|gGROUP][z] (e.g. a8, a4z, a8dk, a8g64)"
    if not text.startswith("a"):
        raise LowbitError(f"activation scheme {text[:40]!r}; accepted: {form}")
    i = 1
    while i < len(text) and text[i] in "0123456789":
        i += 1
    if i == 1 or i - 1 > 2:
        raise LowbitError(f"activation scheme {text[:40]!r}: missing bits; accepted: {form}")
    bits = int(text[1:i])
    dynamic = text[i:i + 1] == "d"
    i += dynamic
    granularity, group = "tensor", None
    if text[i:i + 1] == "k":
        granularity, i = "token", i + 1
    elif text[i:i + 1] == "g":
        j = i + 1
        while j < len(text) and text[j] in "0123456789":
            j += 1
        if j == i + 1 or j - i - 1 > 7:
            raise LowbitError(f"activation scheme {text[:40]!r}: group size after 'g'; accepted: {form}")
        granularity, group, i = "group", int(text[i + 1:j]), j
    symmetric = text[i:i + 1] != "z"
    i += not symmetric
    if i != len(text):
        raise LowbitError(f"activation scheme {text[:40]!r}: unexpected {text[i:][:20]!r}; accepted: {form}")
    return ActSpec(bits=bits, dynamic=dynamic, granularity=granularity, group_size=group, symmetric=symmetric)


def spec_from_rule_value(value: Any) -> ActSpec | None:
    """A recipe rule's ``activations``: a short string (``a8``, ``a16`` = none) or a mapping of ``ActSpec``."""
    if value is None or value == "a16":
        return None
    if isinstance(value, ActSpec):
        return value
    if isinstance(value, str):
        return parse_short(value)
    return ActSpec.from_dict(value)
