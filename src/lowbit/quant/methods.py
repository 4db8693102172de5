"""Quantization method interface and registry (``METHODS``), plus the calibration-provider protocol.

A method turns one float weight [N, K] into a ``QuantResult`` (a ``PackedWeight`` and, optionally, a
per-input-channel scale). Built-in methods register themselves on import: ``rtn`` (lowbit.quant.rtn),
``gptq`` (lowbit.quant.gptq), ``awq`` (lowbit.quant.awq); ``get_method`` imports them first.

Example:
    >>> from lowbit.quant.methods import get_method, QuantContext
    >>> from lowbit.quant.primitives import QuantSpec
    >>> import torch
    >>> result = get_method("rtn").quantize_weight(torch.randn(8, 32), QuantSpec(4, 16), QuantContext(), {})
    >>> result.packed.qweight.shape
    torch.Size([8, 16])
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels.formats import PackedWeight
from lowbit.quant.primitives import QuantSpec
from lowbit.registry import Registry

# Modules whose import registers a built-in method; a missing one (not written yet) is simply absent.
BUILTIN_METHOD_MODULES: tuple[str, ...] = (
    "lowbit.quant.rtn", "lowbit.quant.gptq", "lowbit.quant.awq",
    "lowbit.quant.binary", "lowbit.quant.ternary", "lowbit.quant.pbllm", "lowbit.quant.minmax",
    "lowbit.quant.kquant", "lowbit.quant.smoothquant", "lowbit.quant.repq",
)


@dataclass
class QuantContext:
    """Calibration statistics of one layer, as seen by its weight [N, K].

    Attributes:
        inputs: sampled input rows [S, K] of the layer (for convs: unfolded patches, C*kh*kw per row), or None.
        hessian: H = 2/S * X^T X [K, K] accumulated over the calibration set, or None.
        tower / name / kind: where the layer lives (``kind`` in linear, conv1x1, conv).
        extra: anything else a provider wants to hand its method (e.g. activation abs-means for AWQ).
    """

    inputs: torch.Tensor | None = None
    hessian: torch.Tensor | None = None
    tower: str = ""
    name: str = ""
    kind: str = "linear"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class QuantResult:
    """A method's output for one weight.

    ``input_scale`` [K] (float32), when set, means the layer computes ``y = (x / input_scale) @ W_q^T`` where
    ``packed`` holds W_q = quant(W * input_scale) (AWQ's per-input-channel scaling that could not be folded
    into the previous op). ``kind``, when set, builds the layer as that ``QUANT_KINDS`` entry instead of the
    standard one for its module type (formats with extra buffers: ``lowbit.kernels.variants``).
    """

    packed: PackedWeight
    input_scale: torch.Tensor | None = None
    kind: str | None = None  # a QUANT_KINDS name overriding the layer's (storage variants, e.g. pbllm_linear)


@runtime_checkable
class QuantMethod(Protocol):
    """What ``METHODS`` holds: a ``needs_calibration`` flag and ``quantize_weight``."""

    needs_calibration: bool

    def quantize_weight(
        self, weight: torch.Tensor, spec: QuantSpec, ctx: QuantContext, options: dict[str, Any]
    ) -> QuantResult:
        """Quantize ``weight`` float32 [N, K] (conv kernels flattened) according to ``spec``."""
        ...


@runtime_checkable
class CalibrationProvider(Protocol):
    """Supplies per-layer statistics to methods with ``needs_calibration``.

    ``quantize_`` calls ``stats_for`` for each such layer in definition order, *before* replacing it; the
    provider may run the (partially quantized) model to collect that layer's inputs. If the provider also
    defines ``on_quantized(tower, module_name, new_module)``, it is called right after each layer's
    replacement (calibrated or not), so a sequential method (GPTQ) can feed the quantized layer's outputs to
    the next one.
    """

    def stats_for(self, tower: str, module_name: str, module: nn.Module) -> QuantContext:
        """Calibration statistics for ``module`` (named ``module_name`` inside ``tower``)."""
        ...


METHODS: Registry[QuantMethod] = Registry("quantization method")


def load_builtin_methods() -> None:
    """Import the built-in method modules so they register (idempotent)."""
    for mod in BUILTIN_METHOD_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as err:
            if err.name != mod:  # a real missing dependency inside the module: surface it
                raise


def get_method(name: str) -> QuantMethod:
    """The registered method ``name`` (LowbitError listing the registered ones if unknown)."""
    load_builtin_methods()
    return METHODS.get(name)


def method_names() -> list[str]:
    """Names of all registered methods (built-ins included)."""
    load_builtin_methods()
    return METHODS.names()


def check_options(method: str, options: dict[str, Any], accepted: Iterable[str]) -> None:
    """Raise LowbitError if ``options`` holds keys a method does not accept."""
    accepted = sorted(accepted)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise LowbitError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for method {method!r}; "
            f"accepted: {', '.join(accepted) or '(none)'}"
        )
