"""Mixed precision under a budget: per-layer sensitivity, per-layer costs and a multiple-choice knapsack.

HAWQ (arXiv:1905.03696 / 1911.03852) picks a bit-width per layer from a sensitivity and a cost; here the
sensitivity is *measured*: the increase of a probe loss (``DualEncoderProbe``: KL between the image->text and
text->image softmaxes of the float and perturbed model; ``LanguageProbe``: next-token KL) when only that layer
is quantized at width w (by the real method, GPTQ on the float model's own calibration Hessian) and every other
layer stays float. The Hessian-weighted output error GPTQ minimises, tr(dW H dWᵀ), is recorded beside it as a
proxy (HAWQ-style) so the two can be compared on the measured results (benchmarks/bench_mixed.py).

Costs per (layer, width): nominal bits (bits x weights), stored bytes (codes + fp16 scales, the sizes
``PackedWeight`` stores: the storage table's row must exist for that width) and kernel milliseconds at
batch 1 measured on this machine (``measure_layer_ms``). ``solve`` picks one width per layer minimising the
summed sensitivity with the summed cost at most the budget: an exact dynamic program over the cost above the
cheapest choice, rounded *up* to 1/``resolution`` of the spare budget (so the exact cost never exceeds the
budget), then a greedy pass spending what rounding left. Ties go to the earlier layer / narrower width, so one
set of sensitivities gives one answer.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels.formats import num_groups, packed_row_bytes
from lowbit.kernels.quant_linear import QUANT_KINDS
from lowbit.kernels.storage import find_format
from lowbit.quant.methods import QuantContext, get_method
from lowbit.quant.primitives import QuantSpec

COST_METRICS = ("bits", "bytes", "ms")
SEARCHABLE_KINDS = ("linear", "conv1x1")  # the matmul layers the calibrated methods and the kernels cover


@dataclass
class Choice:
    """One layer at one width: its measured sensitivity and its costs."""

    bits: int
    loss: float  # probe loss increase with only this layer quantized at ``bits``
    proxy: float  # tr(dW H dWᵀ) on the calibration Hessian (NaN without one)
    nbytes: int
    ms: float | None = None


@dataclass
class SearchLayer:
    """A searched layer and its choices (narrowest width first)."""

    tower: str
    name: str
    kind: str
    params: int
    shape: list[int]
    input_shape: list[int] | None
    choices: list[Choice] = field(default_factory=list)

    def cost(self, i: int, metric: str) -> float:
        c = self.choices[i]
        if metric == "bits":
            return float(c.bits * self.params)
        if metric == "bytes":
            return float(c.nbytes)
        if c.ms is None:
            raise LowbitError(f"layer {self.tower}/{self.name} has no kernel timing; accepted budgets without "
                              "timings: --budget-bits, --budget-mb")
        return float(c.ms)

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k != "choices"},
                "choices": [asdict(c) for c in self.choices]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchLayer:
        return cls(**{**d, "choices": [Choice(**c) for c in d["choices"]]})


class InfeasibleBudget(LowbitError):
    """No assignment of widths meets the budget; ``smallest`` is the smallest budget that can."""

    def __init__(self, message: str, smallest: float) -> None:
        super().__init__(message)
        self.smallest = smallest


def layer_nbytes(shape: Sequence[int], spec: QuantSpec) -> int:
    """Stored bytes of a weight of ``shape`` at ``spec``: packed codes, fp16 scales, uint8 zero points (the
    tensors ``PackedWeight`` holds; the storage table must have a row for the width)."""
    find_format("codes", spec.bits, spec.symmetric)
    n, k = int(shape[0]), math.prod(int(d) for d in shape[1:])
    groups = num_groups(k, spec.group_size or k)
    return n * packed_row_bytes(k, spec.bits) + n * groups * 2 + (0 if spec.symmetric else n * groups)


# --- probes: the loss whose increase is a layer's sensitivity ------------------------------------------------
class DualEncoderProbe:
    """KL of the image->text and text->image softmaxes (the model's own logit scale) of a perturbed model against
    the float one, on fixed calibration images and texts. Only the towers a layer feeds are re-run."""

    IMAGE_TOWERS, TEXT_TOWERS = ("vision",), ("text",)

    def __init__(self, model: Any, pixels: torch.Tensor, tokens: dict[str, torch.Tensor]) -> None:
        self.model, self.pixels, self.tokens = model, pixels, tokens
        with torch.no_grad():
            self.image, self.text = model.encode_image(pixels), model.encode_text(tokens)
            self.reference = model.similarity(self.image, self.text).float()

    @torch.no_grad()
    def loss(self, tower: str) -> float:
        image = self.image if tower in self.TEXT_TOWERS else self.model.encode_image(self.pixels)
        text = self.text if tower in self.IMAGE_TOWERS else self.model.encode_text(self.tokens)
        logits = self.model.similarity(image, text).float()
        return 0.5 * (_kl(self.reference, logits) + _kl(self.reference.T, logits.T))

    def forwards(self) -> list[tuple[Callable[[], Any], str]]:
        """(forward, tower kind) pairs that run every layer once (input shapes at batch 1 are read from them)."""
        return [(lambda: self.model.encode_image(self.pixels[:1]), "image"),
                (lambda: self.model.encode_text({k: v[:1] for k, v in self.tokens.items()}), "text")]


class LanguageProbe:
    """Mean next-token KL of a causal language model (``model.language`` or the model itself) against its float
    logits on fixed token windows (right-padded ``input_ids`` + ``attention_mask``; padding left out)."""

    def __init__(self, lm: nn.Module, tokens: dict[str, torch.Tensor]) -> None:
        self.lm, self.tokens = lm, tokens
        with torch.no_grad():
            self.reference = self._logits()

    def _logits(self) -> torch.Tensor:
        logits = self.lm(**self.tokens).logits.float()
        return logits[self.tokens["attention_mask"].bool()]

    @torch.no_grad()
    def loss(self, tower: str) -> float:
        return _kl(self.reference, self._logits())

    def forwards(self) -> list[tuple[Callable[[], Any], str]]:
        return [(lambda: self.lm(**{k: v[:1] for k, v in self.tokens.items()}), "text")]


def _kl(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over rows of KL(softmax(reference) || softmax(logits))."""
    return float(F.kl_div(F.log_softmax(logits, -1), F.log_softmax(reference, -1), log_target=True,
                          reduction="batchmean"))


# --- sensitivity -------------------------------------------------------------------------------------------------
def input_shapes(probe: Any, modules: dict[int, nn.Module]) -> dict[int, list[int]]:
    """The input shape of each module (by id) at batch 1, from one pass of the probe's forwards."""
    shapes: dict[int, list[int]] = {}

    def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor):
            shapes.setdefault(id(mod), list(args[0].shape))

    handles = [m.register_forward_pre_hook(hook) for m in modules.values()]
    try:
        with torch.no_grad():
            for forward, _ in probe.forwards():
                forward()
    finally:
        for h in handles:
            h.remove()
    return shapes


@torch.no_grad()
def measure_sensitivity(planned: Sequence[Any], probe: Any, calibration: Any, widths: Sequence[int],
                        method: str, group_size: int | None, options: dict[str, Any],
                        progress: Callable[[str], None] | None = None) -> list[SearchLayer]:
    """A ``SearchLayer`` per planned layer (``quant.apply.plan_quantization`` entries): for each width, the
    layer alone is quantized by ``method`` (its calibration statistics from the float model), its dequantized
    weight put in place, the probe's loss measured and the float weight restored."""
    quantizer = get_method(method)
    shapes = input_shapes(probe, {id(p.module): p.module for p in planned})
    layers: list[SearchLayer] = []
    for n, p in enumerate(planned):
        module = p.module
        ctx = calibration.stats_for(p.tower, p.name, module) if quantizer.needs_calibration else QuantContext()
        ctx.tower, ctx.name, ctx.kind = ctx.tower or p.tower, ctx.name or p.name, p.kind
        shape = tuple(module.weight.shape)
        original = module.weight.detach().clone()
        weight = original.float().reshape(shape[0], -1)
        layer = SearchLayer(p.tower, p.name, p.kind, weight.numel(), list(shape), shapes.get(id(module)))
        for bits in sorted(widths):
            spec = QuantSpec(bits, group_size, True)
            result = quantizer.quantize_weight(weight.clone(), spec, ctx, dict(options))
            wq = result.packed.dequantize()
            if result.input_scale is not None:  # y = (x / s) @ Wqᵀ: the effective weight is Wq / s
                wq = wq / result.input_scale.float()[None, :]
            diff = weight - wq
            proxy = float(((diff @ ctx.hessian.float()) * diff).sum()) if ctx.hessian is not None else float("nan")
            module.weight.copy_(wq.reshape(shape).to(original.dtype))
            loss = probe.loss(p.tower)
            module.weight.copy_(original)
            layer.choices.append(Choice(bits, loss, proxy, layer_nbytes(shape, spec)))
        layers.append(layer)
        if progress is not None:
            progress(f"{n + 1}/{len(planned)} {p.tower}/{p.name}: " + ", ".join(
                f"w{c.bits} {c.loss:.2e}" for c in layer.choices))
    return layers


@torch.no_grad()
def measure_layer_ms(module: nn.Module, kind: str, input_shape: Sequence[int], spec: QuantSpec,
                     repeats: int = 7) -> float:
    """Median milliseconds of the packed layer (default ``cpu`` backend: the kernels) on a random input of
    ``input_shape`` (batch 1), the weight packed by RTN at ``spec`` (the kernel's time does not depend on the
    codes)."""
    import copy

    weight = module.weight.detach().float().reshape(module.weight.shape[0], -1)
    packed = get_method("rtn").quantize_weight(weight, spec, QuantContext(), {}).packed
    layer = QUANT_KINDS.get(kind).build(copy.deepcopy(module), packed, None)
    x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        layer(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        layer(x)
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


# --- the knapsack ------------------------------------------------------------------------------------------------
def cheapest_cost(layers: Sequence[SearchLayer], metric: str) -> float:
    """The smallest summed cost any assignment reaches (every layer at its cheapest width)."""
    return sum(min(layer.cost(i, metric) for i in range(len(layer.choices))) for layer in layers)


def solve(layers: Sequence[SearchLayer], metric: str, budget: float, resolution: int = 20000) -> list[int]:
    """The choice index per layer minimising the summed loss with the summed ``metric`` cost <= ``budget``.

    Raises ``InfeasibleBudget`` (with the smallest feasible budget) when even the cheapest widths cost more."""
    if metric not in COST_METRICS:
        raise LowbitError(f"cost metric {metric!r}; accepted: {', '.join(COST_METRICS)}")
    costs = [np.array([layer.cost(i, metric) for i in range(len(layer.choices))]) for layer in layers]
    losses = [np.array([c.loss for c in layer.choices]) for layer in layers]
    floor = float(sum(c.min() for c in costs))
    if budget < floor:
        raise InfeasibleBudget(f"budget {budget:g} is below the smallest feasible {floor:g}", floor)
    base = [int(np.argmin(c)) for c in costs]  # first cheapest: narrowest width
    best = [int(np.argmin(loss)) for loss in losses]
    if math.fsum(float(c[i]) for c, i in zip(costs, best, strict=False)) <= budget:
        return best  # everything at its most accurate width fits
    spare = budget - floor
    extra = [c - c.min() for c in costs]
    if spare <= 0:
        return base
    unit = spare / resolution
    units = [np.ceil(e / unit - 1e-9).astype(np.int64) for e in extra]  # rounded up: the exact cost fits too
    cap = resolution
    dp = np.full(cap + 1, np.inf)
    dp[0] = 0.0
    picks = np.zeros((len(layers), cap + 1), dtype=np.int8)
    for li, (u, loss) in enumerate(zip(units, losses, strict=False)):
        new = np.full(cap + 1, np.inf)
        pick = np.zeros(cap + 1, dtype=np.int8)
        for ci in range(len(u)):
            if u[ci] > cap:
                continue
            shifted = np.full(cap + 1, np.inf)
            shifted[u[ci]:] = dp[: cap + 1 - u[ci]] + loss[ci]
            better = shifted < new
            new[better], pick[better] = shifted[better], ci
        dp, picks[li] = new, pick
    at = int(np.argmin(dp))  # the fewest units among the lowest losses
    chosen = [0] * len(layers)
    for li in range(len(layers) - 1, -1, -1):
        chosen[li] = int(picks[li, at])
        at -= int(units[li][chosen[li]])
    return _spend_rest(chosen, costs, losses, budget)


def _spend_rest(chosen: list[int], costs: list[np.ndarray], losses: list[np.ndarray], budget: float) -> list[int]:
    """Greedy upgrades (largest loss decrease per unit of cost first) that still fit the exact budget: what the
    rounding of the dynamic program left unspent."""
    while True:
        left = budget - math.fsum(float(c[i]) for c, i in zip(costs, chosen, strict=False))
        best: tuple[float, int, int] | None = None
        for li, (c, loss) in enumerate(zip(costs, losses, strict=False)):
            i = chosen[li]
            for j in range(len(c)):
                gain, more = float(loss[i] - loss[j]), float(c[j] - c[i])
                if gain > 0 and 0 < more <= left:
                    rate = gain / more
                    if best is None or rate > best[0]:
                        best = (rate, li, j)
        if best is None:
            return chosen
        chosen[best[1]] = best[2]


def summarize(layers: Sequence[SearchLayer], chosen: Sequence[int]) -> dict[str, Any]:
    """Totals of an assignment: average bits per searched weight, bytes, ms, predicted loss, bits histogram."""
    params = sum(layer.params for layer in layers)
    picked = [layer.choices[i] for layer, i in zip(layers, chosen, strict=False)]
    histogram: dict[str, int] = {}
    for layer, c in zip(layers, picked, strict=False):
        histogram[f"w{c.bits}"] = histogram.get(f"w{c.bits}", 0) + layer.params
    ms = [c.ms for c in picked]
    return {"layers": len(layers), "params": params,
            "avg_bits": sum(c.bits * layer.params for layer, c in zip(layers, picked, strict=False)) / max(params, 1),
            "bytes": sum(c.nbytes for c in picked), "ms": None if None in ms else sum(ms),  # type: ignore[arg-type]
            "predicted_loss": sum(c.loss for c in picked), "params_by_width": dict(sorted(histogram.items()))}
