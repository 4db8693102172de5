"""Static activation scales: one pass over the calibration data, min-max or percentile ranges per layer input.

``quantize_`` calls ``calibrate_static`` once every weight of the recipe is quantized, so the ranges are those of
the model as it will run (its quantized weights), with activation quantization itself off during the pass (the
plain "calibrate, then enable" order of post-training static quantization; SmoothQuant arXiv:2211.10438 and
RepQ-ViT arXiv:2212.08254 calibrate the same way). Each layer's input is taken after its ``input_scale``.

- ``minmax``: the smallest and largest value seen (per tensor, or per group of input channels);
- ``percentile``: the ``percentile``-th percentile of |x| (symmetric grids) or of x from both ends
  (asymmetric), over a seeded sample of at most ``MAX_SAMPLES`` values per scale: clips rare outliers.

The grid and the stored buffers are ``lowbit.kernels.act_quant``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels import act_quant, attn_quant
from lowbit.kernels.act_quant import ActSpec
from lowbit.kernels.attn_quant import AttnSpec
from lowbit.kernels.quant_linear import QuantConv2d1x1

STATIC_ACTIVATIONS = "static activations"  # what needs calibration data, as workflows.quantize lists methods
MAX_SAMPLES = 1 << 20  # values kept per scale for percentiles


class _Range:
    """Running per-scale min/max of a layer's input (and a seeded sample of values for percentiles)."""

    def __init__(self, spec: ActSpec, k: int, seed: int) -> None:
        self.spec = spec
        self.k = k
        self.n = spec.num_scales(k)
        self.lo = torch.zeros(self.n)
        self.hi = torch.zeros(self.n)
        self.samples: list[torch.Tensor] = []
        self.kept = 0
        self.seen = 0
        self.gen = torch.Generator().manual_seed(seed)

    def _groups(self, x: torch.Tensor) -> torch.Tensor:
        """x [S, K] -> [n, S * group] (zero padded: zeros never widen a range that contains 0)."""
        if self.n == 1:
            return x.reshape(1, -1)
        g = self.spec.group_size
        assert g is not None
        xp = torch.nn.functional.pad(x, (0, -self.k % g))
        return xp.reshape(x.shape[0], self.n, g).transpose(0, 1).reshape(self.n, -1)

    def add(self, x: torch.Tensor) -> None:
        v = self._groups(x.detach().to(torch.float32).reshape(-1, self.k))
        if v.shape[1] == 0:
            return
        self.seen += v.shape[1]
        self.lo = torch.minimum(self.lo, v.amin(dim=1))
        self.hi = torch.maximum(self.hi, v.amax(dim=1))
        if self.spec.calibration == "percentile" and self.kept < MAX_SAMPLES:
            take = min(v.shape[1], MAX_SAMPLES - self.kept)
            idx = torch.randperm(v.shape[1], generator=self.gen)[:take]
            self.samples.append(v[:, idx])
            self.kept += take

    def ranges(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.spec.calibration == "minmax" or not self.samples:
            return self.lo, self.hi
        v = torch.cat(self.samples, dim=1)
        q = float(self.spec.percentile) / 100.0
        if self.spec.symmetric:
            mag = torch.quantile(v.abs(), q, dim=1) if v.shape[1] <= 1 << 24 else v.abs().amax(dim=1)
            return -mag, mag
        return torch.quantile(v, 1.0 - q, dim=1), torch.quantile(v, q, dim=1)


def _paths_of(calibration: Any, tower: str) -> list[tuple[str, Callable[[Any], Any], list[Any]]]:
    paths = getattr(calibration, "_paths", None)
    if not callable(paths):
        raise LowbitError(f"static activation scales need a calibrator that runs the model "
                          f"(lowbit.quant.calibration.ActivationCalibrator and its kinds); received "
                          f"{type(calibration).__name__}; use dynamic activations (e.g. a8dk) instead")
    return paths(tower)


def run_calibration(calibration: Any, towers: Sequence[str], mask: list[torch.Tensor | None] | None = None) -> None:
    """Run the calibration batches of every input path reaching ``towers`` once (``mask[0]``: the attention mask
    of the text batch in flight, for hooks that leave padding out)."""
    done: set[str] = set()
    for tower in dict.fromkeys(towers):
        for kind, forward, batches in _paths_of(calibration, tower):
            if kind in done:  # one pass per input path feeds every tower on it
                continue
            done.add(kind)
            for batch in batches:
                if mask is not None:
                    mask[0] = batch.get("attention_mask") if kind == "text" and isinstance(batch, dict) else None
                forward(batch)


@torch.no_grad()
def collect_ranges(calibration: Any, targets: Sequence[tuple[str, str, nn.Module]],
                   specs: Sequence[ActSpec] | None = None, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(lo, hi) [S] of each target layer's input (after its ``input_scale``) over the calibration data, with the
    activation quantization of every target off during the pass. ``specs`` default to the layers' own."""
    specs = list(specs) if specs is not None else [m.act_spec for _, _, m in targets]
    ranges = [_Range(spec, int(m.in_features), seed + i)
              for i, (spec, (_, _, m)) in enumerate(zip(specs, targets, strict=True))]
    saved = [m.__dict__.get("act_spec") for _, _, m in targets]
    mask: list[torch.Tensor | None] = [None]

    def hook_for(i: int) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            m = mask[0]
            if m is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(m.shape):
                x = x[m.bool()]  # padding tokens carry no signal
            if isinstance(mod, QuantConv2d1x1):  # [B, C, H, W]: channels last, as its matmul sees them
                x = x.permute(0, 2, 3, 1)
            s = mod._buffers.get("input_scale")
            ranges[i].add(x if s is None else x / s.to(x.dtype))

        return hook

    handles = []
    model = getattr(calibration, "model", None)
    was_training = bool(model is not None and model.training)
    try:
        if model is not None:
            model.eval()
        for i, (_, _, m) in enumerate(targets):
            m.act_spec = None  # calibrate on the float activations (the instance attribute shadows the class's)
            handles.append(m.register_forward_pre_hook(hook_for(i)))
        run_calibration(calibration, [t for t, _, _ in targets], mask)
    finally:
        for h in handles:
            h.remove()
        for (_, _, m), spec in zip(targets, saved, strict=True):
            if spec is None:
                m.__dict__.pop("act_spec", None)
            else:
                m.act_spec = spec
        if model is not None:
            model.train(was_training)
    empty = [f"{t}/{n}" for r, (t, n, _) in zip(ranges, targets, strict=True) if r.seen == 0]
    if empty:
        raise LowbitError(f"{len(empty)} layer(s) with static activation scales saw no calibration input (first: "
                          f"{empty[0]}); give them a rule without activations or dynamic ones (e.g. a8dk)")
    return [r.ranges() for r in ranges]


def calibrate_static(calibration: Any, targets: Sequence[tuple[str, str, nn.Module]], seed: int = 0) -> None:
    """Fill the ``act_scale`` (``act_zero``) buffers of every target layer from one calibration pass."""
    for (_, _, m), (lo, hi) in zip(targets, collect_ranges(calibration, targets, seed=seed), strict=True):
        scale, zero = act_quant.scales_from_range(m.act_spec, lo, hi)
        act_quant.attach(m, m.act_spec, scale, zero)


@torch.no_grad()
def calibrate_attention(calibration: Any, towers: dict[str, nn.Module], spec: AttnSpec) -> list[str]:
    """Give every quantizable attention module of ``towers`` the scheme ``spec`` and calibrate its q/k/v scales
    (max |.| over the calibration data, with the linears' own quantization on); returns their "tower/name"s."""
    quants = [(f"{tower}/{name}", tower, attn_quant.attach(m, spec))
              for tower, root in towers.items() for name, m in attn_quant.attention_modules(root)]
    if not quants:
        raise LowbitError(f"recipe attention={spec.short()}: this model has no attention module lowbit can quantize "
                          f"(accepted classes: {', '.join(attn_quant.QUANTIZABLE_ATTENTION.names()) or 'none'})")
    model = getattr(calibration, "model", None)
    was_training = bool(model is not None and model.training)
    for _, _, q in quants:
        q.calibrating = True
    try:
        if model is not None:
            model.eval()
        run_calibration(calibration, [t for _, t, _ in quants])
    finally:
        for _, _, q in quants:
            q.calibrating = False
        if model is not None:
            model.train(was_training)
    empty = [label for label, _, q in quants if float(q.q_scale) <= 0 or float(q.k_scale) <= 0]
    if empty:
        raise LowbitError(f"{len(empty)} attention module(s) saw no calibration input (first: {empty[0]}); "
                          "drop attention= from the recipe or calibrate with data reaching them")
    return [label for label, _, _ in quants]
