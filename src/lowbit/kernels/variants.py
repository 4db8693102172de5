"""Storage variants of the packed modules: extra (or replaced) buffers beside those of docs/PACKED_FORMAT.md.

Two formats below two bits need tensors the v1 contract does not have: PB-LLM's sparse 8-bit side structure
(``lowbit.kernels.sparse_side``) and dense base-3 ternary storage (``lowbit.kernels.base3``). Each format is
a ``PackedWeight`` subclass (the standard fields plus its own; ``nbytes`` counts what is stored, so reports
give the effective bits per weight) and a mixin of ``ExtraPackedMixin`` combined with the three standard
module shapes below (linear, 1x1 conv, any other conv). The mixin handles what the standard modules cannot
know about:

- the extra buffers take part in the dequantization cache key (an in-place write or a load invalidates it);
- buffers whose length depends on the data (the number of salient weights) are resized to the incoming
  tensor on ``load_state_dict``, so ``QUANT_KINDS[kind].empty`` can build a module from shapes alone;
- ``.half()``/``.float()`` leave the stored dtypes alone (as ``_PackedMixin`` does for ``scales``);
- ``stored_nbytes`` counts every stored tensor.

``variant_family(prefix, Mixin, ClassPrefix, what)`` builds a format's three module classes (``<ClassPrefix>Linear``,
``<ClassPrefix>Conv2d1x1``, ``<ClassPrefix>WeightParam``) and registers ``<prefix>_linear``, ``<prefix>_conv1x1``,
``<prefix>_conv`` in ``QUANT_KINDS`` (``register_variant_kinds``); the map from the standard kind to the
variant's is what a method hands back in ``QuantResult.kind``.

Example:
    >>> from lowbit.kernels.sparse_side import PBLLM_KINDS
    >>> PBLLM_KINDS["linear"]
    'pbllm_linear'
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels.class_swap import mixed_class
from lowbit.kernels.formats import PackedWeight
from lowbit.kernels.quant_linear import (
    QUANT_KINDS,
    QuantConv2d1x1,
    QuantKind,
    QuantLinear,
    QuantWeightParam,
    _cache_key,
    _float_bias,
    _version,
)

ShapeSpec = tuple[tuple[int, ...], torch.dtype]
_STANDARD_STORED = ("qweight", "scales", "zeros")  # what PackedWeight.nbytes counts


def _tensor_key(t: torch.Tensor | None) -> Any:
    return None if t is None else (t.data_ptr(), t.device, t.dtype, _version(t), tuple(t.shape))


class ExtraPackedMixin:
    """Mix in BEFORE a standard packed module class.

    Subclasses set ``EXTRA_FIELDS`` (buffer name -> attribute of ``PACKED_TYPE`` holding it), ``RESIZABLE``
    (extra buffers of data-dependent shape), ``DROPPED`` (standard buffers the format does not store) and
    implement ``_extra_shapes`` and the ``packed`` property.
    """

    EXTRA_FIELDS: dict[str, str] = {}
    RESIZABLE: tuple[str, ...] = ()
    DROPPED: tuple[str, ...] = ()
    PACKED_TYPE: type[PackedWeight] = PackedWeight
    weight_shape: tuple[int, ...]
    _lowbit_cache: dict[str, tuple[tuple[Any, ...], torch.Tensor]]

    def _extra_shapes(self) -> dict[str, ShapeSpec]:
        raise NotImplementedError

    def _setup_extra(self) -> None:
        """Register zero extra buffers (after the standard ones) and drop the standard ones not stored."""
        for name, (shape, dtype) in self._extra_shapes().items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype))  # type: ignore[attr-defined]
        for name in self.DROPPED:
            self.register_buffer(name, None)  # type: ignore[attr-defined]

    def _fill(self, packed: PackedWeight, input_scale: torch.Tensor | None) -> None:
        """Copy ``packed`` (a ``PACKED_TYPE``) into the buffers; extra buffers take its tensors' shapes."""
        if not isinstance(packed, self.PACKED_TYPE):
            raise LowbitError(f"{type(self).__name__} needs a {self.PACKED_TYPE.__name__}; "
                              f"received {type(packed).__name__}")
        with torch.no_grad():
            for name in _STANDARD_STORED:
                dst, src = getattr(self, name, None), getattr(packed, name)
                if dst is not None and src is not None:
                    dst.copy_(src)
            if input_scale is not None:
                self.input_scale.copy_(input_scale.reshape(-1).to(torch.float32))  # type: ignore[attr-defined]
            for name, field in self.EXTRA_FIELDS.items():
                self._buffers[name] = getattr(packed, field).detach().clone().contiguous()  # type: ignore[attr-defined]
        self._lowbit_cache.clear()

    def _cached(self, what: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        # Same policy as _PackedMixin._cached, with the extra buffers in the key.
        extra = tuple(_tensor_key(getattr(self, n, None)) for n in self.EXTRA_FIELDS)
        key = (_cache_key(self), extra)  # type: ignore[arg-type]
        hit = self._lowbit_cache.get(what)
        if hit is not None and hit[0] == key:
            return hit[1]
        with torch.inference_mode(False), torch.no_grad():
            value = compute()
        self._lowbit_cache[what] = (key, value)
        return value

    def _load_from_state_dict(self, state_dict: dict[str, torch.Tensor], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        # Data-dependent lengths (e.g. nnz of a side structure) are only known from the checkpoint.
        for name in self.RESIZABLE:
            incoming = state_dict.get(prefix + name)
            current = self._buffers.get(name)  # type: ignore[attr-defined]
            if isinstance(incoming, torch.Tensor) and isinstance(current, torch.Tensor) and (
                incoming.shape != current.shape or incoming.dtype != current.dtype
            ):
                self._buffers[name] = torch.empty(  # type: ignore[attr-defined]
                    incoming.shape, dtype=incoming.dtype, device=current.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        # Extra buffers are storage format too: only device moves apply (fp16 row scales stay fp16).
        keep = {n: t for n in self.EXTRA_FIELDS if (t := self._buffers.get(n)) is not None}  # type: ignore[attr-defined]
        out = super()._apply(fn, recurse)  # type: ignore[misc]
        for name, old in keep.items():
            new = self._buffers[name]  # type: ignore[attr-defined]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)  # type: ignore[attr-defined]
        self._lowbit_cache.clear()
        return out

    def stored_nbytes(self) -> int:
        """Bytes of the stored quantization tensors (standard ones kept + extra), as ``PACKED_TYPE.nbytes``."""
        total = 0
        for name in _STANDARD_STORED + tuple(self.EXTRA_FIELDS):
            t = getattr(self, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        return total


# --- the three module shapes, parameterised by a format mixin -------------------------------------------
class VariantLinear(QuantLinear):
    """``QuantLinear`` with a format's extra buffers (combine as ``class X(FormatMixin, VariantLinear)``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._setup_extra()  # type: ignore[attr-defined]

    @classmethod
    def from_packed(
        cls, packed: PackedWeight, bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None
    ) -> VariantLinear:
        layer = cls(packed.in_features, packed.out_features, packed.bits, packed.group_size, packed.symmetric,
                    bias=bias is not None, has_input_scale=input_scale is not None, weight_shape=packed.shape)
        layer._fill(packed, input_scale)  # type: ignore[attr-defined]
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias.detach().to(torch.float32))
        return layer


class VariantConv2d1x1(QuantConv2d1x1):
    """``QuantConv2d1x1`` with a format's extra buffers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._setup_extra()  # type: ignore[attr-defined]

    @classmethod
    def from_packed(
        cls, packed: PackedWeight, bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None
    ) -> VariantConv2d1x1:
        layer = cls(packed.in_features, packed.out_features, packed.bits, packed.group_size, packed.symmetric,
                    bias=bias is not None, has_input_scale=input_scale is not None)
        layer._fill(packed, input_scale)  # type: ignore[attr-defined]
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias.detach().to(torch.float32))
        return layer


class VariantWeightParam(QuantWeightParam):
    """``QuantWeightParam`` (any conv keeps its own forward) with a format's extra buffers."""

    @classmethod
    def quant_class(cls, base: type) -> type:
        # one class per (format, base): PBLLM<Conv> and Base3<Conv> must differ
        return mixed_class(cls, base, f"{cls.__name__.removesuffix('WeightParam')}{base.__name__}")

    @classmethod
    def attach_empty(cls, module: nn.Module, bits: int, group_size: int, symmetric: bool = True,
                     has_input_scale: bool = False) -> nn.Module:
        module = super().attach_empty(module, bits, group_size, symmetric, has_input_scale)
        module._setup_extra()  # type: ignore[operator]
        return module

    @classmethod
    def attach(cls, module: nn.Module, packed: PackedWeight, input_scale: torch.Tensor | None = None) -> nn.Module:
        weight = module._parameters.get("weight")
        if weight is not None and tuple(weight.shape) != packed.shape:
            raise LowbitError(f"packed shape {packed.shape} does not match weight {tuple(weight.shape)}")
        cls.attach_empty(module, packed.bits, packed.group_size, packed.symmetric, input_scale is not None)
        module._fill(packed, input_scale)  # type: ignore[operator]
        return module


def register_variant_kinds(
    prefix: str, linear: type[VariantLinear], conv1x1: type[VariantConv2d1x1], conv: type[VariantWeightParam]
) -> dict[str, str]:
    """Register ``<prefix>_linear/_conv1x1/_conv`` in ``QUANT_KINDS``; returns {standard kind: variant kind}."""
    kinds = {
        "linear": QuantKind(
            f"{prefix}_linear",
            build=lambda m, p, s: linear.from_packed(p, _float_bias(m), s),
            empty=lambda m, b, g, sym, has_s: linear(
                m.in_features, m.out_features, b, g, sym, _float_bias(m) is not None, has_s),
        ),
        "conv1x1": QuantKind(
            f"{prefix}_conv1x1",
            build=lambda m, p, s: conv1x1.from_packed(p, _float_bias(m), s),
            empty=lambda m, b, g, sym, has_s: conv1x1(
                m.in_channels, m.out_channels, b, g, sym, _float_bias(m) is not None, has_s),
        ),
        "conv": QuantKind(
            f"{prefix}_conv",
            build=lambda m, p, s: conv.attach(m, p, s),
            empty=lambda m, b, g, sym, has_s: conv.attach_empty(m, b, g, sym, has_s),
        ),
    }
    for kind in kinds.values():
        QUANT_KINDS.register(kind.name)(kind)
    return {base: kind.name for base, kind in kinds.items()}


VariantFamily = tuple[type[VariantLinear], type[VariantConv2d1x1], type[VariantWeightParam], dict[str, str]]


def variant_family(prefix: str, mixin: type, class_prefix: str, what: str) -> VariantFamily:
    """A storage format's linear, 1x1-conv and any-conv module classes (``mixin`` first in each MRO), registered
    as ``<prefix>_*`` kinds; returns the three classes and {standard kind: variant kind}. ``what`` completes
    their docstrings ("... with <what>")."""
    module = mixin.__module__
    shapes = (("Linear", VariantLinear, "``QuantLinear``"), ("Conv2d1x1", VariantConv2d1x1, "``QuantConv2d1x1``"),
              ("WeightParam", VariantWeightParam, "Any conv, own forward kept,"))
    kinds = ("linear", "conv1x1", "conv")
    classes = [type(f"{class_prefix}{suffix}", (mixin, base),
                    {"__module__": module, "__doc__": f"{doc} with {what} (kind ``{prefix}_{kind}``)."})
               for (suffix, base, doc), kind in zip(shapes, kinds, strict=True)]
    linear, conv1x1, conv = classes
    return linear, conv1x1, conv, register_variant_kinds(prefix, linear, conv1x1, conv)  # type: ignore[arg-type]
