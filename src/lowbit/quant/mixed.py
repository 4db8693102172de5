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
from dataclasses import asdict, dataclass, field, replace
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


class PromptProbe:
    """Next-token KL right after each prompt, against the float model: what the first answer token of a
    question sees (the prompts as the language model's input embeddings, left-padded, e.g. a llava's chat
    prompts with their visual tokens computed once). Only the last position's logits are computed."""

    def __init__(self, lm: nn.Module, embeds: torch.Tensor, mask: torch.Tensor, batch_size: int = 8) -> None:
        self.lm, self.embeds, self.mask, self.batch_size = lm, embeds, mask, batch_size
        with torch.no_grad():
            self.reference = self._logits()

    def _last(self, start: int, stop: int) -> torch.Tensor:
        out = self.lm(inputs_embeds=self.embeds[start:stop], attention_mask=self.mask[start:stop], logits_to_keep=1)
        logits = out.logits[:, -1]  # [B, V]
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def _logits(self) -> torch.Tensor:
        n = self.embeds.shape[0]
        return torch.cat([self._last(s, min(s + self.batch_size, n)) for s in range(0, n, self.batch_size)])

    @torch.no_grad()
    def loss(self, tower: str) -> float:
        return _kl(self.reference, self._logits())

    def forwards(self) -> list[tuple[Callable[[], Any], str]]:
        return [(lambda: self._last(0, 1), "text")]

    def fisher(self, weights: Sequence[torch.Tensor], top_k: int = 4) -> list[torch.Tensor]:
        """The diagonal Fisher of the probe's next-token distributions for each weight (float64, its shape):
        mean over prompts of Σ_y p(y) (∂ log p(y) / ∂w)², y over each prompt's ``top_k`` likeliest tokens (the
        rest of the mass left out; deterministic). At the float model it is the Hessian of the probe's KL, so a
        perturbation δ of one layer raises the KL by about ½ Σ F δ²."""
        acc = [torch.zeros(w.shape, dtype=torch.float64) for w in weights]
        n = self.embeds.shape[0]
        with _gradients_for(self.lm, weights):
            for i in range(n):
                logp = F.log_softmax(self._last(i, i + 1)[0], -1)
                top = logp.detach().exp().topk(top_k)
                for j, (prob, y) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True)):
                    grads = torch.autograd.grad(logp[y], list(weights), retain_graph=j < top_k - 1,
                                                allow_unused=True)
                    for a, g in zip(acc, grads, strict=True):
                        if g is not None:
                            a.add_(g.double() ** 2, alpha=prob / n)
        return acc

    def gradient(self, weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """∂ loss / ∂ w of the probe's KL for each weight (float32) at the weights now in place (e.g. a quantized
        assignment: first order, how a change of one layer there moves the whole model's KL)."""
        acc = [torch.zeros(w.shape, dtype=torch.float32) for w in weights]
        n = self.embeds.shape[0]
        with _gradients_for(self.lm, weights):
            for s in range(0, n, self.batch_size):
                stop = min(s + self.batch_size, n)
                logits = self._last(s, stop)
                kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(self.reference[s:stop], -1), log_target=True,
                              reduction="sum") / n
                for a, g in zip(acc, torch.autograd.grad(kl, list(weights), allow_unused=True), strict=True):
                    if g is not None:
                        a.add_(g.float())
        return acc


class _gradients_for:
    """Gradients enabled for ``weights`` only (every other parameter of ``module`` frozen), restored after."""

    def __init__(self, module: nn.Module, weights: Sequence[torch.Tensor]) -> None:
        self.module, self.weights = module, weights

    def __enter__(self) -> None:
        self.saved = {p: p.requires_grad for p in self.module.parameters()}
        targets = {id(w) for w in self.weights}
        for p in self.module.parameters():
            p.requires_grad_(id(p) in targets)
        for w in self.weights:
            w.requires_grad_(True)
        self.grad = torch.enable_grad()
        self.grad.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.grad.__exit__(*exc)
        for p, flag in self.saved.items():
            p.requires_grad_(flag)


def _kl(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over rows of KL(softmax(reference) || softmax(logits))."""
    return float(F.kl_div(F.log_softmax(logits, -1), F.log_softmax(reference, -1), log_target=True,
                          reduction="batchmean"))


# --- sensitivity -------------------------------------------------------------------------------------------------
SENSITIVITIES = ("kl", "fisher")


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


class LayerWeights:
    """The searched layers' weights at every width, quantized once by the real method (calibration statistics
    of the float model) and kept packed; ``apply`` puts a whole assignment in place (dequantized), ``restore``
    puts the float weights back."""

    def __init__(self, planned: Sequence[Any], widths: Sequence[int], method: str, group_size: int | None,
                 options: dict[str, Any], calibration: Any, chunk: int = 42,
                 progress: Callable[[str], None] | None = None) -> None:
        self.planned, self.widths = list(planned), sorted(widths)
        self.original = [p.module.weight.detach().clone() for p in self.planned]
        self.packed: list[dict[int, Any]] = []
        self.proxy: list[dict[int, float]] = []
        self.applied: list[int | None] = [None] * len(self.planned)  # width in place (None: float)
        self.fisher: list[torch.Tensor] | None = None  # the probe's diagonal Fisher per layer, when computed
        quantizer = get_method(method)
        for start in range(0, len(self.planned), chunk):  # statistics a chunk at a time: bounded memory
            part = self.planned[start : start + chunk]
            contexts = _contexts(part, calibration) if quantizer.needs_calibration else {}
            for p in part:
                ctx = contexts.get((p.tower, p.name)) or QuantContext()
                ctx.tower, ctx.name, ctx.kind = ctx.tower or p.tower, ctx.name or p.name, p.kind
                weight = p.module.weight.detach().float().reshape(p.module.weight.shape[0], -1)
                packed, proxy = {}, {}
                for bits in self.widths:
                    result = quantizer.quantize_weight(weight.clone(), QuantSpec(bits, group_size, True), ctx,
                                                       dict(options))
                    packed[bits] = (result.packed, result.input_scale)
                    diff = weight - self._dequantized(packed[bits])
                    proxy[bits] = (float(((diff @ ctx.hessian.float()) * diff).sum()) if ctx.hessian is not None
                                   else float("nan"))
                self.packed.append(packed)
                self.proxy.append(proxy)
            if progress is not None:
                progress(f"quantized {len(self.packed)}/{len(self.planned)} layers at widths {self.widths}")

    @staticmethod
    def _dequantized(entry: tuple[Any, torch.Tensor | None]) -> torch.Tensor:
        packed, input_scale = entry
        wq = packed.dequantize().float()
        if input_scale is not None:  # y = (x / s) @ Wqᵀ: the effective weight is Wq / s
            wq = wq / input_scale.float()[None, :]
        return wq

    def weight(self, i: int, bits: int) -> torch.Tensor:
        """Layer ``i``'s effective weight at ``bits`` [N, K] (float32)."""
        return self._dequantized(self.packed[i][bits])

    @torch.no_grad()
    def set(self, i: int, bits: int | None) -> None:
        """Layer ``i`` at ``bits`` (None: float)."""
        if self.applied[i] == bits:
            return
        module, original = self.planned[i].module, self.original[i]
        value = original if bits is None else self.weight(i, bits).reshape(original.shape).to(original.dtype)
        module.weight.copy_(value)
        self.applied[i] = bits

    def apply(self, bits: Sequence[int | None]) -> None:
        for i, b in enumerate(bits):
            self.set(i, b)

    def restore(self) -> None:
        self.apply([None] * len(self.planned))


def _contexts(planned: Sequence[Any], calibration: Any) -> dict[tuple[str, str], QuantContext]:
    """Calibration contexts of ``planned`` (one pass per tower where the provider can; else layer by layer)."""
    out: dict[tuple[str, str], QuantContext] = {}
    towers = sorted({p.tower for p in planned})
    for tower in towers:
        mine = [p for p in planned if p.tower == tower]
        if hasattr(calibration, "stats_for_all"):
            got = calibration.stats_for_all(tower, {p.name: p.module for p in mine})
            out.update({(tower, name): ctx for name, ctx in got.items()})
        else:
            out.update({(tower, p.name): calibration.stats_for(tower, p.name, p.module) for p in mine})
    return out


@torch.no_grad()
def measure_sensitivity(planned: Sequence[Any], probe: Any, calibration: Any, widths: Sequence[int],
                        method: str, group_size: int | None, options: dict[str, Any],
                        progress: Callable[[str], None] | None = None, sensitivity: str = "kl",
                        weights: LayerWeights | None = None) -> list[SearchLayer]:
    """A ``SearchLayer`` per planned layer (``quant.apply.plan_quantization`` entries): each layer is quantized at
    each width by ``method`` (its calibration statistics from the float model, ``LayerWeights``) and its
    sensitivity taken with every other layer float: ``kl``, the probe's measured loss with that weight in place;
    ``fisher``, the second-order estimate of the same loss, ½ Σ F (W - Wq)², F the probe's diagonal Fisher
    (``probe.fisher``: one backward pass per probe sample and likely token, instead of a forward per layer and
    width)."""
    if sensitivity not in SENSITIVITIES:
        raise LowbitError(f"sensitivity {sensitivity!r}; accepted: {', '.join(SENSITIVITIES)}")
    weights = weights or LayerWeights(planned, widths, method, group_size, options, calibration)
    shapes = input_shapes(probe, {id(p.module): p.module for p in planned})
    fisher = None
    if sensitivity == "fisher":
        if not hasattr(probe, "fisher"):
            raise LowbitError(f"sensitivity 'fisher' needs a probe with a Fisher pass (prompts: probe_data); this "
                              f"probe is a {type(probe).__name__}; accepted: sensitivity='kl'")
        fisher = probe.fisher([p.module.weight for p in planned])
        weights.fisher = [f.float() for f in fisher]  # kept for a refinement's anchored estimates
    layers: list[SearchLayer] = []
    for n, p in enumerate(planned):
        shape = tuple(p.module.weight.shape)
        weight = weights.original[n].float().reshape(shape[0], -1)
        layer = SearchLayer(p.tower, p.name, p.kind, weight.numel(), list(shape), shapes.get(id(p.module)))
        for bits in weights.widths:
            if fisher is not None:
                diff = weight - weights.weight(n, bits)
                loss = 0.5 * float((fisher[n].reshape(diff.shape) * diff.double() ** 2).sum())
            else:
                weights.set(n, bits)
                loss = probe.loss(p.tower)
                weights.set(n, None)
            spec = QuantSpec(bits, group_size, True)
            layer.choices.append(Choice(bits, loss, weights.proxy[n][bits], layer_nbytes(shape, spec)))
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


# --- measured refinement ---------------------------------------------------------------------------------------
REJECTS = 2  # refine: a layer's change that was part of this many rejected moves is not proposed again


def _moves(layers: Sequence[SearchLayer], chosen: Sequence[int], metric: str, left: float
           ) -> list[tuple[float, tuple[tuple[int, int], ...]]]:
    """Moves from ``chosen`` that fit ``left`` (the unspent budget), with their predicted loss decrease from the
    per-layer sensitivities, best first (ties: earlier layers, narrower widths): one layer widened, or one widened
    and another narrowed to pay for it. Only moves predicted to help."""
    ups: list[tuple[float, float, int, int]] = []  # (gain, cost, layer, choice)
    downs: list[tuple[float, float, int, int]] = []  # (loss increase, freed cost, layer, choice)
    for li, layer in enumerate(layers):
        i = chosen[li]
        here, cost = layer.choices[i].loss, layer.cost(i, metric)
        for j in range(len(layer.choices)):
            delta, more = here - layer.choices[j].loss, layer.cost(j, metric) - cost
            if more > 0 and delta > 0:
                ups.append((delta, more, li, j))
            elif more < 0:
                downs.append((-delta, -more, li, j))
    out: list[tuple[float, tuple[tuple[int, int], ...]]] = [
        (g, ((li, j),)) for g, c, li, j in ups if c <= left]
    if ups and downs:
        gain = np.array([u[0] for u in ups])[:, None] - np.array([d[0] for d in downs])[None, :]
        net = np.array([u[1] for u in ups])[:, None] - np.array([d[1] for d in downs])[None, :]
        same = np.array([u[2] for u in ups])[:, None] == np.array([d[2] for d in downs])[None, :]
        ok = (gain > 0) & (net <= left) & ~same
        for a, b in zip(*np.nonzero(ok), strict=True):
            out.append((float(gain[a, b]), ((ups[a][2], ups[a][3]), (downs[b][2], downs[b][3]))))
    out.sort(key=lambda m: (-m[0], m[1]))
    return out


def anchored(layers: Sequence[SearchLayer], weights: LayerWeights, anchor: Sequence[int],
             gradient: Sequence[torch.Tensor], fisher: Sequence[torch.Tensor]) -> list[SearchLayer]:
    """Copies of ``layers`` whose sensitivities are the probe loss's change from the assignment ``anchor`` (bits
    per layer) when only that layer moves to another width: gᵀδ + ½ Σ F δ², δ = W_b - W_anchor, g the
    loss's gradient there and F the diagonal Fisher. Unlike sensitivities measured from the float model, the
    first-order term sees how a layer's error adds to everyone else's (it is what makes errors compound)."""
    out = []
    for n, layer in enumerate(layers):
        base = weights.weight(n, anchor[n])
        g, f = gradient[n].reshape(base.shape).double(), fisher[n].reshape(base.shape).double()
        choices = []
        for c in layer.choices:
            delta = (weights.weight(n, c.bits) - base).double()
            choices.append(replace(c, loss=float((g * delta).sum() + 0.5 * (f * delta**2).sum())))
        out.append(replace(layer, choices=choices))
    return out


def refine(layers: Sequence[SearchLayer], starts: Sequence[Sequence[int]], metric: str, budget: float,
           measure: Callable[[list[int]], float], max_measures: int,
           progress: Callable[[str], None] | None = None,
           rank: Callable[[list[int]], Sequence[SearchLayer]] | None = None) -> tuple[list[int], dict[str, Any]]:
    """A verified refinement of the knapsack: the per-layer sensitivities are each measured alone and summed, but
    quantization errors of many layers compound, so the whole assignment is measured (``measure``: the probe's
    loss with every layer at its chosen width). The lowest of ``starts`` (e.g. knapsack answers and the uniform
    recipe) is kept, then moves (``_moves``, best predicted first by the sensitivities ``rank(kept start)``
    gives, e.g. ``anchored`` ones around it; default ``layers``) are tried one measurement each and a move is
    accepted only when the measured loss falls; at most ``max_measures`` measurements in all. Every candidate
    fits the budget exactly; the same inputs give the same answer."""
    total = lambda c: math.fsum(layers[li].cost(i, metric) for li, i in enumerate(c))  # noqa: E731
    history: list[dict[str, Any]] = []
    best: list[int] | None = None
    best_loss = math.inf
    for n, start in enumerate(starts):
        start = list(start)
        if total(start) > budget or any(start == list(s) for s in starts[:n]) or len(history) >= max_measures:
            continue
        loss = measure(start)
        history.append({"start": n, "loss": loss})
        if progress is not None:
            progress(f"refine: start {n} measured {loss:.4g}")
        if loss < best_loss:
            best, best_loss = start, loss
    if best is None:
        raise LowbitError("refine: no start fits the budget")
    start_loss, used, tried = best_loss, len(history), set()
    ranking = rank(best) if rank is not None else layers
    failed: dict[tuple[int, int], int] = {}  # (layer, choice) -> rejected moves it was part of
    while used < max_measures:
        accepted = False
        for predicted, move in _moves(ranking, best, metric, budget - total(best)):
            key = (tuple(best), move)
            if key in tried or any(failed.get(part, 0) >= REJECTS for part in move):
                continue  # a change in REJECTS rejected moves is left out: its partners were not the problem
            if used >= max_measures:
                break
            tried.add(key)
            trial = list(best)
            for li, j in move:
                trial[li] = j
            if total(trial) > budget:  # rounding of the summed costs: never over
                continue
            loss = measure(trial)
            used += 1
            ok = loss < best_loss
            history.append({"move": [[layers[li].name, layers[li].choices[best[li]].bits, layers[li].choices[j].bits]
                                     for li, j in move], "predicted_gain": predicted, "loss": loss, "accepted": ok})
            if progress is not None:
                progress(f"refine {used}/{max_measures}: {history[-1]['move']} -> {loss:.4g} "
                         f"({'accepted' if ok else 'rejected'}; best {min(loss, best_loss):.4g})")
            if ok:
                best, best_loss, accepted = trial, loss, True
                break
            for part in move:
                failed[part] = failed.get(part, 0) + 1
        if not accepted:
            break
    return best, {"measures": used, "start_loss": start_loss, "loss": best_loss,
                  "start": next(h["start"] for h in history if "start" in h and h["loss"] == start_loss),
                  "accepted": sum(1 for h in history if h.get("accepted")), "history": history}
