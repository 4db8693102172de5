"""Per-channel scales folded through a normalisation layer into the linears it feeds (exact in float).

Two methods move a per-input-channel factor out of the activations: RepQ-ViT (lowbit.quant.repq) reparameterises a
LayerNorm's per-channel activation grids into one per-tensor grid, and SmoothQuant (lowbit.quant.smoothquant)
divides outlier channels down by ``s`` and multiplies the weights' columns up by it. Where the activation is a
norm's output read only by linears, the factor needs no run-time op: with the norm's output Y becoming
``Y' = (Y + shift) / r`` (its affine: ``γ' = γ / r``, ``β' = (β + shift) / r``) every linear reading it takes
``W' = W · diag(r)`` and ``b' = b - W · shift``, and computes the same function.

The norm feeding a layer is found from the calibration forward itself (the layer's input tensor is the norm's
output object), so it works on any architecture; a norm output that also feeds something other than linears (a
post-LN residual, as in BERT) cannot take a new affine, which only a forward shows: ``exact`` compares the towers'
outputs on a calibration batch before and after.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.quant.act_calibration import run_calibration

EXACT_TOL = 1e-4  # relative max difference of the towers' outputs allowed after folding (float rounding)


def is_affine_norm(module: nn.Module) -> bool:
    """A LayerNorm with an affine, or an RMSNorm (torch's or a transformers ``*RMSNorm``) with a weight vector."""
    if isinstance(module, nn.LayerNorm):
        return module.elementwise_affine
    weight = getattr(module, "weight", None)
    return type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.Tensor) and weight.dim() == 1


@dataclass
class NormGroup:
    """A norm and every linear reading only its output, with the per-channel range of that output over the
    calibration data and (when asked for) a sample of its rows."""

    tower: str
    name: str
    norm: nn.Module
    linears: list[nn.Linear]
    lo: torch.Tensor
    hi: torch.Tensor
    rows: torch.Tensor | None = None
    saved: list[tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.tower}/{self.name}"


class _Seen:
    def __init__(self, sample_rows: int, seed: int) -> None:
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.sample_rows = sample_rows
        self.rows: list[torch.Tensor] = []
        self.kept = 0
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, y: torch.Tensor) -> None:
        y = y.detach().reshape(-1, y.shape[-1]).float()
        lo, hi = y.amin(0), y.amax(0)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        if self.kept < self.sample_rows:  # the first batches' rows, a random subset of each (deterministic)
            take = torch.randperm(y.shape[0], generator=self.generator)[: self.sample_rows - self.kept]
            self.rows.append(y[take])
            self.kept += len(take)


@torch.no_grad()
def norm_groups(calibration: Any, towers: dict[str, nn.Module], targets: Sequence[nn.Module],
                sample_rows: int = 0, seed: int = 0) -> list[NormGroup]:
    """The norms feeding one or more of ``targets`` (float linears) and nothing else among the linears, found by
    one calibration pass; each group lists every linear fed only by its norm (targets or not: folding must
    change them all)."""
    norms = {id(m): (tower, name, m) for tower, root in towers.items() for name, m in root.named_modules()
             if is_affine_norm(m)}
    # id(output tensor) -> (id(norm), weak reference to that tensor): an id is only a memory address, and once a
    # norm's output is freed a later tensor (an attention output, a residual sum) can get the same one; without
    # the check that the tensor is still the same object, a linear it feeds would count as fed by the norm, and
    # folding the norm into it would change the model (seen: repq "changed the model's outputs (relative 0.43)"
    # in one full test run, depending on what earlier tests left in the allocator)
    outputs: dict[int, tuple[int, weakref.ref[torch.Tensor]]] = {}
    seen = {k: _Seen(sample_rows, seed + i) for i, k in enumerate(norms)}
    linears = {id(m): m for root in towers.values() for m in root.modules() if isinstance(m, nn.Linear)}
    fed: dict[int, set[int]] = {k: set() for k in linears}  # id(linear) -> ids of the norms feeding it (-1: other)

    def norm_hook(key: int) -> Callable[..., None]:
        def hook(mod: nn.Module, args: Any, out: torch.Tensor) -> None:
            outputs[id(out)] = (key, weakref.ref(out))
            seen[key].add(out)
        return hook

    def linear_hook(key: int) -> Callable[..., None]:
        def hook(mod: nn.Module, args: Any) -> None:
            entry = outputs.get(id(args[0]))
            fed[key].add(entry[0] if entry is not None and entry[1]() is args[0] else -1)
        return hook

    handles = [m.register_forward_hook(norm_hook(k)) for k, (_, _, m) in norms.items()]
    handles += [m.register_forward_pre_hook(linear_hook(k)) for k, m in linears.items()]
    try:
        tower_names = [t for t, root in towers.items() if any(_inside(root, m) for m in targets)]
        run_calibration(calibration, tower_names)
    finally:
        for h in handles:
            h.remove()
    keys = dict.fromkeys(next(iter(fed[id(m)])) for m in targets
                         if id(m) in fed and len(fed[id(m)]) == 1 and next(iter(fed[id(m)])) in norms)
    groups = []
    for key in keys:
        tower, name, norm = norms[key]
        st = seen[key]
        assert st.lo is not None and st.hi is not None
        groups.append(NormGroup(tower, name, norm, [linears[k] for k, src in fed.items() if src == {key}],
                                st.lo, st.hi, torch.cat(st.rows) if st.rows else None))
    return groups


def _inside(root: nn.Module, module: nn.Module) -> bool:
    return any(m is module for m in root.modules())


@torch.no_grad()
def fold(group: NormGroup, r: torch.Tensor, shift: torch.Tensor | None = None) -> None:
    """Make the norm output ``(Y + shift) / r`` and its linears ``W · diag(r)``, ``b - W · shift`` (the same
    function in float); the previous tensors are kept on the group for ``unfold``."""
    norm = group.norm
    group.saved = [(norm.weight.detach().clone(), None if getattr(norm, "bias", None) is None
                    else norm.bias.detach().clone())]
    group.saved += [(lin.weight.detach().clone(), None if lin.bias is None else lin.bias.detach().clone())
                    for lin in group.linears]
    has_shift = shift is not None and bool(shift.any())
    if has_shift:
        if not hasattr(norm, "bias"):
            raise LowbitError(f"{group.label}: a {type(norm).__name__} has no bias to take a shift")
        if norm.bias is None:
            norm.bias = nn.Parameter(torch.zeros_like(norm.weight))
    r = r.to(norm.weight.dtype)
    if getattr(norm, "bias", None) is not None:
        norm.bias.copy_(((norm.bias + shift) if has_shift else norm.bias) / r)
    norm.weight.copy_(norm.weight / r)
    for lin in group.linears:
        if has_shift:
            if lin.bias is None:
                lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype))
            lin.bias.copy_(lin.bias - lin.weight @ shift.to(lin.weight.dtype))
        lin.weight.copy_(lin.weight * r.to(lin.weight.dtype))


@torch.no_grad()
def unfold(group: NormGroup) -> None:
    """Put back the tensors ``fold`` replaced (a bias it created stays, at its old value: zero)."""
    (w, b), *lins = group.saved
    group.norm.weight.copy_(w)
    if getattr(group.norm, "bias", None) is not None:
        group.norm.bias.copy_(b if b is not None else torch.zeros_like(group.norm.bias))
    for lin, (lw, lb) in zip(group.linears, lins, strict=True):
        lin.weight.copy_(lw)
        if lin.bias is not None:
            lin.bias.copy_(lb if lb is not None else torch.zeros_like(lin.bias))


@torch.no_grad()
def tower_outputs(calibration: Any, towers: dict[str, nn.Module]) -> list[torch.Tensor]:
    """The towers' outputs on the first calibration batch of each input path (for the exactness check)."""
    outs: list[torch.Tensor] = []
    for tower in towers:
        try:
            paths = calibration._paths(tower)
        except LowbitError:
            continue
        for _, forward, batches in paths[:1]:
            if batches:
                out = forward(batches[0])
                outs.append(out if isinstance(out, torch.Tensor) else torch.as_tensor(out))
    return outs


def relative_change(after: Sequence[torch.Tensor], before: Sequence[torch.Tensor]) -> float:
    """The largest ``max|a - b| / max|b|`` over the towers' outputs."""
    return max((float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))
                for a, b in zip(after, before, strict=True)), default=0.0)
