"""Modules that hold packed weights (docs/PACKED_FORMAT.md) and compute with them.

- ``QuantLinear`` replaces ``nn.Linear``; ``QuantConv2d1x1`` replaces 1x1 stride-1 convs (a linear over
  channels). Their matmul goes through ``LINEAR_BACKENDS``: ``"cpu"`` (the default, ``DEFAULT_BACKEND``) is
  lowbit's fast kernels (``lowbit.kernels.fast``: int8 activations per row, error bound stated there), which
  fall back to ``"reference"`` (dequantize once + ``F.linear``, exact up to float32 rounding) wherever they
  cannot run (no compiler: one warning per process; inputs that require grad; non-CPU tensors). Pin a model
  to ``"reference"`` with ``set_backend`` where bit-exact float equality matters.
- ``QuantWeightParam`` keeps any other module (depthwise/3x3 convs, including subclasses with their own
  forward such as efficientnet's ``Conv2dDynamicSamePadding``) and swaps its ``weight`` Parameter for a
  read-only property that dequantizes the packed buffers — the same class-swap trick as
  ``torch.nn.utils.parametrize``, without keeping the float original.

``QUANT_KINDS`` maps the manifest ``kind`` (linear, conv1x1, conv) to how a float module becomes a quantized
one (``build``) and how an empty one of the right shapes is made for loading a checkpoint (``empty``).

Methods: see lowbit.quant.methods (RTN, GPTQ arXiv:2210.17323, AWQ arXiv:2306.00978); the storage format
follows GPTQ-style group-wise uniform quantization.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels import act_quant
from lowbit.kernels.class_swap import mixed_class
from lowbit.kernels.formats import PackedWeight, check_bits, num_groups, packed_row_bytes
from lowbit.kernels.lowering import PlanWatched
from lowbit.registry import Registry

# act_scale / act_zero: calibrated static activation scales (lowbit.kernels.act_quant), stored float32 as they are
PACKED_BUFFERS: tuple[str, ...] = ("qweight", "scales", "zeros", "input_scale", "act_scale", "act_zero")

LinearBackend = Callable[["QuantLinear", torch.Tensor], torch.Tensor]
LINEAR_BACKENDS: Registry[LinearBackend] = Registry("linear backend")
DEFAULT_BACKEND = "cpu"  # registered by lowbit.kernels.fast (imported by lowbit.kernels/__init__)
GROUP_ATTR = "_lowbit_shared"  # attribute of a fused sibling: (SharedInputGroup, index), set by kernels.fusion


def clamp_output(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """``y`` clamped to the layer's ``output_clamp`` (an activation fused into it, ``lowbit.kernels.fuse_act``),
    unchanged when it has none: what every path that does not clamp inside its kernel applies."""
    clamp = getattr(layer, "output_clamp", None)
    return y if clamp is None else y.clamp(*clamp)


@LINEAR_BACKENDS.register("reference")
def reference_backend(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """x [..., K] (already divided by ``input_scale``) -> x @ W_q^T + bias [..., N], via the cached dequant
    (then the layer's fused ``output_clamp``, if any)."""
    if layer.act_spec is not None:  # the activation grid in float: exact (integers times a scale)
        x = act_quant.input_quant(layer, x)
    w = layer.dequantized_weight()  # [N, K] float32
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return clamp_output(layer, F.linear(x, w.to(x.dtype), bias))


ONNX_EXPORT_HINT = "lowbit export MODEL --format onnx --out DIR (lowbit.export)"


def refuse_onnx_trace(module: nn.Module) -> None:
    """Raise while torch's tracer runs (``torch.onnx.export(dynamo=False)``, ``torch.jit.trace``): the kernels
    run outside it, so a traced packed module would be recorded as a constant (torch.onnx.export of a packed
    lit-fashion wrote a graph of one Constant node). The tracing-state check costs ~60 ns a call
    (``torch.onnx.is_in_onnx_export`` costs 1.5 us, too much for a decode step's ~200 calls)."""
    if torch._C._get_tracing_state() is not None:
        raise LowbitError(f"{type(module).__name__}: a packed module cannot be traced by torch.onnx.export / "
                          f"torch.jit.trace (it would be recorded as a constant); export packed models with "
                          f"`{ONNX_EXPORT_HINT}`")


# --- packed-buffer helpers shared by all quantized modules ----------------------------------------------
def _version(t: torch.Tensor) -> int:
    # Inference tensors have no version counter (and cannot be modified in place outside inference mode).
    return -1 if t.is_inference() else t._version


def _cache_key(module: nn.Module) -> tuple[Any, ...]:
    """Identity of the packed buffers: a new tensor (load, .to()) or an in-place write changes it."""
    key: list[Any] = []
    for name in PACKED_BUFFERS:
        t = getattr(module, name, None)
        key.append(None if t is None else (t.data_ptr(), t.device, t.dtype, _version(t)))
    return tuple(key)


def _register_packed(module: nn.Module, packed_shapes: dict[str, tuple[tuple[int, ...], torch.dtype] | None]) -> None:
    """Register zero-filled packed buffers (None = absent, so not in the state dict)."""
    for name in PACKED_BUFFERS:
        spec = packed_shapes.get(name)
        module.register_buffer(name, None if spec is None else torch.zeros(spec[0], dtype=spec[1]))


def _packed_shapes(
    shape: tuple[int, ...], bits: int, group_size: int, symmetric: bool, has_input_scale: bool
) -> dict[str, tuple[tuple[int, ...], torch.dtype] | None]:
    """Buffer shapes/dtypes of the packed format for a weight of ``shape``."""
    n, k = shape[0], math.prod(shape[1:])
    g = num_groups(k, group_size)
    return {
        "qweight": ((n, packed_row_bytes(k, bits)), torch.uint8),
        "scales": ((n, g), torch.float16),
        "zeros": None if symmetric else ((n, g), torch.uint8),
        "input_scale": ((k,), torch.float32) if has_input_scale else None,
    }


def _copy_packed(module: nn.Module, packed: PackedWeight, input_scale: torch.Tensor | None) -> None:
    module.qweight.copy_(packed.qweight)
    module.scales.copy_(packed.scales)
    if packed.zeros is not None:
        module.zeros.copy_(packed.zeros)
    if input_scale is not None:
        module.input_scale.copy_(input_scale.reshape(-1).to(torch.float32))


class _PackedMixin:
    """Packed-buffer bookkeeping: ``packed``, cached ``dequantized_weight`` and effective ``weight``."""

    bits: int
    group_size: int
    symmetric: bool
    weight_shape: tuple[int, ...]
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    input_scale: torch.Tensor | None

    def _init_meta(self, shape: tuple[int, ...], bits: int, group_size: int, symmetric: bool) -> None:
        self.bits = check_bits(bits)
        self.group_size = int(group_size)
        self.symmetric = bool(symmetric)
        self.weight_shape = tuple(int(d) for d in shape)
        self._lowbit_cache: dict[str, tuple[tuple[Any, ...], torch.Tensor]] = {}

    @property
    def packed(self) -> PackedWeight:
        """The stored buffers as a ``PackedWeight`` (shares memory)."""
        return PackedWeight(self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.weight_shape)

    def _cached(self, what: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        key = _cache_key(self)  # type: ignore[arg-type]
        hit = self._lowbit_cache.get(what)
        if hit is not None and hit[0] == key:
            return hit[1]
        # Build outside inference mode so the cached tensor is usable from both modes; never track grads.
        with torch.inference_mode(False), torch.no_grad():
            value = compute()
        self._lowbit_cache[what] = (key, value)
        return value

    def dequantized_weight(self) -> torch.Tensor:
        """W_q float32 [N, K] (without ``input_scale``), cached until the buffers change."""
        return self._cached("w", lambda: self.packed.dequantize())

    def effective_weight(self) -> torch.Tensor:
        """The float weight the layer computes with, in the original ``weight_shape`` (``input_scale`` folded)."""

        def compute() -> torch.Tensor:
            w = self.packed.dequantize()  # [N, K]
            if self.input_scale is not None:
                w = w / self.input_scale.to(torch.float32)  # (x / s) @ W_q^T == x @ (W_q / s)^T
            return w.reshape(self.weight_shape)

        return self._cached("weight", compute)

    @property
    def weight(self) -> torch.Tensor:
        """Read-only float view of the quantized weight, for code that reads ``.weight`` directly
        (e.g. ``nn.MultiheadAttention`` reading ``out_proj.weight``)."""
        refuse_onnx_trace(self)  # type: ignore[arg-type]
        return self.effective_weight()

    def _drop_cache(self) -> None:
        self._lowbit_cache.clear()

    def __getstate__(self) -> dict[str, Any]:
        # deepcopy / pickle carry the packed buffers, not the caches built from them (the fast kernels' prepared
        # weights are extension objects); a copy rebuilds them on first use.
        state = dict(super().__getstate__())  # type: ignore[misc]
        state["_lowbit_cache"] = {}
        return state

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        # .half()/.double()/.to(dtype) must not touch the stored format (fp16 scales, fp32 input_scale; a
        # bf16 round trip would corrupt scales): packed buffers follow device moves only.
        kept = ("scales", "input_scale", *act_quant.ACT_BUFFERS)
        keep = {n: t for n in kept if (t := getattr(self, n, None)) is not None}
        out = super()._apply(fn, recurse)  # type: ignore[misc]
        for name, old in keep.items():
            new = self._buffers[name]  # type: ignore[attr-defined]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)  # type: ignore[attr-defined]
        self._drop_cache()
        return out

    def _quant_repr(self) -> str:
        g = "per-channel" if self.group_size >= math.prod(self.weight_shape[1:]) else f"g{self.group_size}"
        return f"bits={self.bits}, {g}, {'sym' if self.symmetric else 'asym'}"


# --- linear and pointwise conv ----------------------------------------------------------------------------
class QuantLinear(PlanWatched, _PackedMixin, nn.Module):
    """A linear layer with a packed low-bit weight.

    Buffers (state-dict keys under the module prefix):
        qweight:     uint8 [N, ceil(K*bits/8)] — codes in [0, 2^bits-1], LSB-first bitstream per row.
        scales:      float16 [N, G], G = ceil(K / group_size) — one scale per (row, group); may be negative.
        zeros:       uint8 [N, G] — integer zero points (asymmetric only; absent when symmetric, z = 2^(bits-1)).
        bias:        float32 [N] (only if the float layer had one).
        input_scale: float32 [K] (optional, AWQ) — the layer computes (x / input_scale) @ W_q^T + bias.
    W_q[n, k] = (q[n, k] - z[n, k // group_size]) * s[n, k // group_size], in float32.

    Attributes: ``bits``, ``group_size`` (effective; K when per-channel), ``symmetric``, ``in_features``,
    ``out_features``, ``weight_shape`` (original weight shape), ``backend`` (a ``LINEAR_BACKENDS`` name;
    ``DEFAULT_BACKEND`` unless set), ``output_clamp`` ((lo, hi) of an activation fused into the layer by
    ``lowbit.kernels.fuse_act``, which every backend applies after the bias; None unless set), ``act_block``
    (inputs per activation quantization block of the fast CPU kernels, see ``set_act_block``; None: their
    default of 128).
    """

    backend: str = DEFAULT_BACKEND
    output_clamp: tuple[float, float] | None = None
    act_block: int | str | None = None
    act_spec: act_quant.ActSpec | None = None  # activation quantization (lowbit.kernels.act_quant), None: a16
    # what its lowering (fast.lowered_linear) captures: setting one invalidates planned forwards
    _plan_reads = frozenset({"backend", "act_spec", "output_clamp", "act_block"})  # input_scale: a buffer (watched)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        symmetric: bool = True,
        bias: bool = True,
        has_input_scale: bool = False,
        weight_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        shape = weight_shape or (out_features, in_features)
        if (shape[0], math.prod(shape[1:])) != (out_features, in_features):
            raise LowbitError(f"weight_shape {shape} does not match [out, in] = [{out_features}, {in_features}]")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self._init_meta(shape, bits, group_size, symmetric)
        _register_packed(self, _packed_shapes(shape, bits, group_size, symmetric, has_input_scale))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_packed(
        cls, packed: PackedWeight, bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None
    ) -> QuantLinear:
        """A layer holding ``packed`` (copied), with optional float ``bias`` [N] and ``input_scale`` [K]."""
        layer = cls(
            packed.in_features, packed.out_features, packed.bits, packed.group_size, packed.symmetric,
            bias=bias is not None, has_input_scale=input_scale is not None, weight_shape=packed.shape,
        )
        with torch.no_grad():
            _copy_packed(layer, packed, input_scale)
            if bias is not None:
                layer.bias.copy_(bias.detach().to(torch.float32))
        return layer

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] including bias; dispatches to ``LINEAR_BACKENDS[self.backend]``."""
        return LINEAR_BACKENDS.get(self.backend)(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        refuse_onnx_trace(self)
        s = self._buffers["input_scale"]  # direct: this runs ~200 times per decoded token
        if s is not None:
            x = x / s.to(x.dtype)
        return self._matmul(x)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._drop_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        acts = "" if self.act_spec is None else f", acts={self.act_spec.short()}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._quant_repr()}{acts}"


class QuantConv2d1x1(QuantLinear):
    """A 1x1, stride-1, unpadded, ungrouped conv as a linear over channels: [B, C, H, W] -> [B, N, H, W].

    Same buffers as ``QuantLinear`` with K = C; ``weight_shape`` is the conv's [N, C, 1, 1].
    """

    def __init__(self, in_channels: int, out_channels: int, bits: int, group_size: int, symmetric: bool = True,
                 bias: bool = True, has_input_scale: bool = False) -> None:
        super().__init__(in_channels, out_channels, bits, group_size, symmetric, bias, has_input_scale,
                         weight_shape=(out_channels, in_channels, 1, 1))
        # Conv attributes, for code that introspects convs.
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.dilation, self.groups = (1, 1), (1, 1), (0, 0), (1, 1), 1

    @classmethod
    def from_packed(
        cls, packed: PackedWeight, bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None
    ) -> QuantConv2d1x1:
        layer = cls(packed.in_features, packed.out_features, packed.bits, packed.group_size, packed.symmetric,
                    bias=bias is not None, has_input_scale=input_scale is not None)
        with torch.no_grad():
            _copy_packed(layer, packed, input_scale)
            if bias is not None:
                layer.bias.copy_(bias.detach().to(torch.float32))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise LowbitError(f"QuantConv2d1x1 expects input [B, C, H, W]; received shape {tuple(x.shape)}")
        # Keep the input's memory format, as a conv does: a channels_last input is already [B, H, W, C] rows in
        # memory (no copy in), and its output stays channels_last (no copy out). Converting it to NCHW made the
        # depthwise convs that follow in EfficientNet 2-4x slower (measured on lit-fashion, batch 32).
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        y = super().forward(x.permute(0, 2, 3, 1))  # [B, H, W, C] -> [B, H, W, N]
        y = y.permute(0, 3, 1, 2)  # [B, N, H, W], channels_last strides
        return y if channels_last else y.contiguous()


# --- any other module: keep it, swap its weight for a dequantizing property ------------------------------
class QuantWeightParam(_PackedMixin):
    """Mixin that turns a module's ``weight`` Parameter into packed buffers plus a dequantizing property.

    ``QuantWeightParam.attach(module, packed)`` re-classes ``module`` in place to ``Quant<OriginalClass>`` (a
    subclass of both), so its own forward (padding logic etc.) runs unchanged and reads ``self.weight``,
    which now returns the cached dequantized tensor in the original weight shape.

    Buffers added (state-dict keys under the module prefix; the float ``weight`` key disappears):
        qweight:     uint8 [N, ceil(K*bits/8)], K = prod(weight.shape[1:]) (a conv kernel flattened C*kh*kw).
        scales:      float16 [N, G];  zeros: uint8 [N, G] (asymmetric only).
        input_scale: float32 [K] (optional), folded into the dequantized weight (W_q / input_scale).
    The module's own ``bias`` and other parameters/buffers are untouched.
    ``backend`` (``set_backend``): "cpu" lets the kernel transforms run such a conv on the kernels' int8 forms
    (``depthwise``, ``conv_gemm``); any other value keeps them on the dequantized weight in float.
    """

    backend: str = DEFAULT_BACKEND

    @classmethod
    def quant_class(cls, base: type) -> type:
        """The (cached) ``Quant<base>`` class."""
        return mixed_class(cls, base, f"Quant{base.__name__}")

    @classmethod
    def attach_empty(
        cls, module: nn.Module, bits: int, group_size: int, symmetric: bool = True, has_input_scale: bool = False
    ) -> nn.Module:
        """Re-class ``module`` in place with zero packed buffers shaped after its current ``weight``."""
        if isinstance(module, QuantWeightParam):
            raise LowbitError(f"module {type(module).__name__} is already quantized")
        weight = module._parameters.get("weight")
        if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
            raise LowbitError(f"cannot quantize {type(module).__name__}: it has no 2-D+ 'weight' parameter")
        shape = tuple(weight.shape)
        del module.weight  # the float Parameter goes; the property below takes its place
        module.__class__ = cls.quant_class(type(module))
        module._init_meta(shape, bits, group_size, symmetric)
        _register_packed(module, _packed_shapes(shape, bits, group_size, symmetric, has_input_scale))
        return module

    @classmethod
    def attach(cls, module: nn.Module, packed: PackedWeight, input_scale: torch.Tensor | None = None) -> nn.Module:
        """Re-class ``module`` in place to hold ``packed`` (whose ``shape`` must be the weight's shape)."""
        weight = module._parameters.get("weight")
        if weight is not None and tuple(weight.shape) != packed.shape:
            raise LowbitError(f"packed shape {packed.shape} does not match weight {tuple(weight.shape)}")
        cls.attach_empty(module, packed.bits, packed.group_size, packed.symmetric, input_scale is not None)
        with torch.no_grad():
            _copy_packed(module, packed, input_scale)
        return module

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._drop_cache()
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[misc]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._quant_repr()}"  # type: ignore[misc]


def is_quantized(module: nn.Module) -> bool:
    """True for modules holding packed weights (linears, convs, embedding tables)."""
    return isinstance(module, _PackedMixin)


def set_backend(model: nn.Module, backend: str) -> None:
    """Route every ``QuantLinear`` in ``model`` through ``LINEAR_BACKENDS[backend]`` (and tell packed convs:
    ``QuantWeightParam.backend``)."""
    LINEAR_BACKENDS.get(backend)  # validate the name once, with the standard error
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantWeightParam)):
            m.backend = backend


ROW_ACT_BLOCK = "row"  # act_block: one activation scale per row (the whole K), as ONNX Runtime / fbgemm use


def check_act_block(act_block: int | str | None) -> None:
    """Raise ``LowbitError`` unless ``act_block`` is None, ``"row"`` or a positive multiple of 32."""
    if act_block is None or act_block == ROW_ACT_BLOCK:
        return
    if isinstance(act_block, bool) or not isinstance(act_block, int) or act_block <= 0 or act_block % 32:
        raise LowbitError(f"act_block {act_block!r} is not accepted: use a positive multiple of 32, "
                          f"{ROW_ACT_BLOCK!r} or None (the kernels' default, 128)")


def set_act_block(model: nn.Module, act_block: int | str | None) -> None:
    """Set how finely the fast CPU kernels quantize activations, for every ``QuantLinear`` in ``model``.

    The kernels round each row of x to int8 with one scale per block of ``act_block`` inputs. Finer blocks follow
    outliers more closely; coarser blocks let the large-batch GEMM sum more integer products per float
    conversion. ``None`` (default) means 128; ``"row"`` means one scale per row over the whole K, as fast CPU
    runtimes do (ONNX Runtime and fbgemm dynamic int8 even use one scale per tensor). For grouped weights a
    block must divide the group or span the row. The stated error bound (``lowbit.kernels.fast``) holds for
    every choice, with its ``a_b`` taken over the chosen blocks. The reference backend is exact and ignores it.
    """
    check_act_block(act_block)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.act_block = act_block


# --- kinds: float module -> quantized module, and empty modules for loading ------------------------------
def _float_bias(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return bias.detach() if isinstance(bias, torch.Tensor) else None


@dataclass(frozen=True)
class QuantKind:
    """How one manifest ``kind`` is built from a float module, and rebuilt empty for loading."""

    name: str
    build: Callable[[nn.Module, PackedWeight, torch.Tensor | None], nn.Module]
    empty: Callable[[nn.Module, int, int, bool, bool], nn.Module]  # (float module, bits, gs, sym, has_in_scale)


QUANT_KINDS: Registry[QuantKind] = Registry("quantized module kind")

QUANT_KINDS.register("linear")(QuantKind(
    "linear",
    build=lambda m, p, s: QuantLinear.from_packed(p, _float_bias(m), s),
    empty=lambda m, b, g, sym, has_s: QuantLinear(
        m.in_features, m.out_features, b, g, sym, _float_bias(m) is not None, has_s),
))
QUANT_KINDS.register("conv1x1")(QuantKind(
    "conv1x1",
    build=lambda m, p, s: QuantConv2d1x1.from_packed(p, _float_bias(m), s),
    empty=lambda m, b, g, sym, has_s: QuantConv2d1x1(
        m.in_channels, m.out_channels, b, g, sym, _float_bias(m) is not None, has_s),
))
QUANT_KINDS.register("conv")(QuantKind(
    "conv",
    build=lambda m, p, s: QuantWeightParam.attach(m, p, s),
    empty=lambda m, b, g, sym, has_s: QuantWeightParam.attach_empty(m, b, g, sym, has_s),
))
