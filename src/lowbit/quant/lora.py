"""LoRA adapters on packed layers (QLoRA): train low-rank updates on top of frozen low-bit weights.

LoRA (Hu et al. 2021, arXiv:2106.09685) adds ``scaling * B(A(dropout(x)))`` to a frozen layer, with A [r, K]
random and B [N, r] zero at the start (so training starts from the quantized model's own outputs), and
``scaling = alpha / r``. QLoRA (Dettmers et al. 2023, arXiv:2305.14314) does this with the frozen weight kept
in low bits. Here the frozen weight stays in lowbit's packed format:

- ``attach_lora(model, LoraConfig(...))`` wraps every layer its targets match in a ``LoraLayer`` (the layer
  becomes ``<path>.base_layer``, the adapter ``<path>.lora_A`` / ``<path>.lora_B``: PEFT's own names), freezes
  everything else and returns the report. Targets use the recipes' pattern language (``lowbit.quant.recipe``)
  without the value: ``TOWER[/PATTERN][@KIND+KIND]`` items, comma separated (``vision@conv1x1,text/*attention*``);
  kinds are ``linear`` and ``conv1x1``. Any packed ``QuantLinear`` / ``QuantConv2d1x1`` (and their storage
  variants) or float ``nn.Linear`` / 1x1 ``nn.Conv2d`` can carry an adapter.
- The forward of a packed layer is its own kernel (int8 activations on the fast CPU path, see
  ``lowbit.kernels.fast``). Its backward (``FrozenPackedMatmul``) reaches the input through the frozen weight
  by dequantizing it in row blocks of at most ``GRAD_BLOCK_ELEMENTS`` floats (``grad_x = sum_b g[:, b] @ W[b]``):
  the float matrix never exists whole. Every packed linear of the model is routed through it while adapters
  are attached (not only the adapted ones: gradients pass through the frozen layers between the adapters and
  the loss, where the kernels' default for inputs that require grad is to cache the whole float weight).
- ``save_adapters(model, dir)`` writes PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``,
  keys ``base_model.model.<path>.lora_A.weight``), so ``peft.PeftModel.from_pretrained(float_model, dir)``
  loads them onto the float model; ``load_adapters`` reads them back onto a packed one.
- ``merge_lora(model)`` folds each adapter into its layer, re-rounded on the layer's own grid (its scales and
  zero points kept: a GPTQ grid stays GPTQ's), and reports the merge error: how far the merged weights are from
  ``W_q + delta`` (relative RMS), against the size of the adapters' update.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels.formats import PackedWeight
from lowbit.kernels.fusion import fuse_shared_inputs, unfuse_shared_inputs
from lowbit.kernels.quant_linear import QuantConv2d1x1, QuantLinear, is_quantized
from lowbit.quant.apply import model_towers, module_paths, replace_module

LORA_KINDS = ("linear", "conv1x1")
TARGET_FORM = "TOWER[/PATTERN][@KIND+KIND] items, comma separated (kinds: linear, conv1x1), e.g. 'vision@conv1x1'"
GRAD_BLOCK_ELEMENTS = 1 << 20  # floats per dequantized row block in the backward (4 MB)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_MATMUL_ATTR = "_matmul"  # instance override of QuantLinear._matmul while adapters are attached


# --- targets ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One target item: layers of ``tower`` whose name matches ``pattern`` (fnmatch), of ``kinds`` (None: both)."""

    tower: str = "*"
    pattern: str = "*"
    kinds: tuple[str, ...] | None = None

    def matches(self, tower: str, name: str, kind: str) -> bool:
        return (fnmatch.fnmatchcase(tower, self.tower) and fnmatch.fnmatchcase(name, self.pattern)
                and (self.kinds is None or kind in self.kinds))

    def describe(self) -> str:
        where = self.tower if self.pattern == "*" else f"{self.tower}/{self.pattern}"
        return where + ("" if self.kinds is None else "@" + "+".join(self.kinds))


def parse_targets(text: str | Target | list[Any] | tuple[Any, ...]) -> tuple[Target, ...]:
    """``"vision@conv1x1,text/*attention*"`` (or a list of such items / ``Target``s) -> targets.

    Example:
        >>> parse_targets("vision/*blocks*@conv1x1")
        (Target(tower='vision', pattern='*blocks*', kinds=('conv1x1',)),)
    """
    if isinstance(text, Target):
        return (text,)
    items = list(text) if isinstance(text, (list, tuple)) else (text.split(",") if isinstance(text, str) else None)
    if not items:
        raise LowbitError(f"LoRA targets: received {text!r}; accepted: {TARGET_FORM}")
    out: list[Target] = []
    for raw in items:
        if isinstance(raw, Target):
            out.append(raw)
            continue
        item = raw.strip() if isinstance(raw, str) else ""
        where, at, kind_text = item.partition("@")
        tower, slash, pattern = where.partition("/")
        kinds = tuple(k.strip() for k in kind_text.split("+")) if at else None
        bad = [k for k in kinds or () if k not in LORA_KINDS]
        if not tower.strip() or "=" in item or (slash and not pattern.strip()) or bad or (at and not kinds):
            why = f"unknown kind {bad[0]!r}" if bad else "malformed item"
            raise LowbitError(f"LoRA target {raw!r}: {why}; accepted: {TARGET_FORM}")
        out.append(Target(tower.strip(), pattern.strip() or "*", kinds))
    return tuple(out)


def lora_kind(module: nn.Module) -> str | None:
    """``linear`` / ``conv1x1`` for a layer that can carry an adapter, else None."""
    if isinstance(module, QuantLinear):
        return "conv1x1" if isinstance(module, QuantConv2d1x1) else ("linear" if len(module.weight_shape) == 2
                                                                     else None)
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and tuple(module.stride) == (1, 1) \
            and module.groups == 1 and tuple(getattr(module, "padding", (0, 0))) in ((0, 0),):
        return "conv1x1"
    return None


# --- the frozen packed matmul -----------------------------------------------------------------------------------
def packed_rows(packed: PackedWeight, start: int, stop: int) -> PackedWeight:
    """Rows ``start:stop`` of a packed weight, of any storage variant, as the same type (views, no copy):
    every field with one row per output is sliced; a CSR side structure (``row_ptr``) is re-based."""
    n = packed.out_features
    changes: dict[str, Any] = {"shape": (stop - start, *packed.shape[1:])}
    row_ptr = getattr(packed, "row_ptr", None)
    for f in dataclasses.fields(packed):
        value = getattr(packed, f.name)
        if f.name == "row_ptr" or not isinstance(value, torch.Tensor):
            continue
        if row_ptr is not None and f.name in ("cols", "values"):
            a, b = int(row_ptr[start]), int(row_ptr[stop])
            changes[f.name] = value[a:b]
        elif value.dim() >= 1 and value.shape[0] == n:
            changes[f.name] = value[start:stop]
    if row_ptr is not None:
        changes["row_ptr"] = row_ptr[start : stop + 1] - row_ptr[start]
    return dataclasses.replace(packed, **changes)


def row_block(n: int, k: int, limit: int = GRAD_BLOCK_ELEMENTS) -> int:
    """Rows per dequantized block of an [n, k] weight: at most ``limit`` floats (at least one row)."""
    return max(1, min(n, limit // max(k, 1)))


def blocked_grad_input(packed: PackedWeight, grad: torch.Tensor, limit: int = GRAD_BLOCK_ELEMENTS) -> torch.Tensor:
    """``grad [..., N] @ W_q [N, K]`` with W_q dequantized ``row_block`` rows at a time (float32 sums)."""
    n, k = packed.out_features, packed.in_features
    g = grad.reshape(-1, n).to(torch.float32)
    out = g.new_zeros(g.shape[0], k)
    step = row_block(n, k, limit)
    for a in range(0, n, step):
        b = min(a + step, n)
        out.addmm_(g[:, a:b], packed_rows(packed, a, b).dequantize())
    return out.reshape(*grad.shape[:-1], k).to(grad.dtype)


MatmulFn = Callable[[QuantLinear, torch.Tensor], torch.Tensor]


class FrozenPackedMatmul(torch.autograd.Function):
    """``y = layer._matmul(x)`` on the packed kernels, with ``grad_x`` by blocked dequantization; the packed
    buffers are constants (no gradient, nothing saved but the layer)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: QuantLinear, matmul: MatmulFn) -> torch.Tensor:
        ctx.layer = layer
        with torch.no_grad():
            return matmul(layer, x.detach())  # detached: the kernels run (they refuse inputs that require grad)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return blocked_grad_input(ctx.layer.packed, grad), None, None


class _GradMatmul:
    """What ``layer._matmul`` is while adapters are attached: the class's own matmul when no gradient is
    wanted, ``FrozenPackedMatmul`` when the input requires one. (A plain object, not a bound method: deepcopy
    and pickling carry it with the layer.)"""

    def __init__(self, layer: QuantLinear) -> None:
        self.layer = layer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        matmul = type(self.layer)._matmul
        if torch.is_grad_enabled() and x.requires_grad:
            return FrozenPackedMatmul.apply(x, self.layer, matmul)
        return matmul(self.layer, x)


def route_packed_grads(model: nn.Module) -> int:
    """Route every packed linear of ``model`` through ``FrozenPackedMatmul``; returns how many. Fused siblings
    are unlinked (each layer's own call is what the backward differentiates); ``unroute_packed_grads`` undoes."""
    unfuse_shared_inputs(model)
    count = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            if m.output_clamp is not None:
                raise LowbitError(f"{type(m).__name__} has an activation fused into its kernel (a model optimized "
                                  "for inference); accepted: a model loaded without optimize=True")
            m.__dict__[_MATMUL_ATTR] = _GradMatmul(m)
            count += 1
    return count


def unroute_packed_grads(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.__dict__.pop(_MATMUL_ATTR, None)
    fuse_shared_inputs(model)


# --- the adapter ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraConfig:
    """Rank ``r``, ``alpha`` (scaling = alpha / r), ``dropout`` on the adapter's input, and ``targets``."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | tuple[Any, ...] = "*"
    seed: int = 0  # initialisation of the A matrices

    def validate(self) -> tuple[Target, ...]:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise LowbitError(f"LoRA rank: received {self.r!r}; accepted: an integer >= 1")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not self.alpha > 0:
            raise LowbitError(f"LoRA alpha: received {self.alpha!r}; accepted: a number > 0")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise LowbitError(f"LoRA dropout: received {self.dropout!r}; accepted: 0 <= dropout < 1")
        return parse_targets(self.targets)

    @property
    def scaling(self) -> float:
        return float(self.alpha) / self.r


class LoraLayer(nn.Module):
    """``base_layer(x) + scaling * lora_B(lora_A(dropout(x)))`` with PEFT's attribute names; for a 1x1 conv the
    adapter matrices are 1x1 convs too (PEFT's layout for ``nn.Conv2d``)."""

    def __init__(self, base_layer: nn.Module, kind: str, r: int, alpha: float, dropout: float,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        n, k = _dims(base_layer)
        self.base_layer, self.kind, self.r, self.scaling = base_layer, kind, r, float(alpha) / r
        if kind == "conv1x1":
            self.lora_A: nn.Module = nn.Conv2d(k, r, 1, bias=False)
            self.lora_B: nn.Module = nn.Conv2d(r, n, 1, bias=False)
        else:
            self.lora_A, self.lora_B = nn.Linear(k, r, bias=False), nn.Linear(r, n, bias=False)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        with torch.no_grad():  # PEFT's default init: A Kaiming-uniform (a = sqrt 5), B zero
            bound = 1.0 / math.sqrt(k)  # kaiming_uniform_(a=sqrt(5)) on fan_in k
            self.lora_A.weight.copy_(torch.rand(self.lora_A.weight.shape, generator=generator) * 2 * bound - bound)
            self.lora_B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        return y + self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))).to(y.dtype) \
            * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` as [N, K] float32."""
        a = self.lora_A.weight.detach().float().flatten(1)
        b = self.lora_B.weight.detach().float().flatten(1)
        return (b @ a) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"


def _dims(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, QuantLinear):
        return layer.out_features, layer.in_features
    w = layer.weight
    return int(w.shape[0]), int(math.prod(w.shape[1:]))


@dataclass
class LoraReport:
    """What ``attach_lora`` did: adapted layers (full path -> (tower, kind, [N, K])), trainable counts."""

    config: LoraConfig
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    trainable_params: int = 0
    frozen_params: int = 0
    packed_routed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"r": self.config.r, "alpha": self.config.alpha, "dropout": self.config.dropout,
                "targets": [t.describe() for t in parse_targets(self.config.targets)],
                "layers": len(self.layers), "trainable_params": self.trainable_params,
                "frozen_params": self.frozen_params, "packed_layers_routed": self.packed_routed}


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Full path of each adapted layer (as the float model names it) -> its ``LoraLayer``."""
    return {path: m for path, m in model.named_modules() if isinstance(m, LoraLayer)}


def attach_lora(model: nn.Module, config: LoraConfig) -> LoraReport:
    """Wrap the layers ``config.targets`` match in ``LoraLayer``s, in place; freeze everything else.

    Raises one line when a target matches no layer (naming real paths) or the rank exceeds a layer's dims.
    """
    targets = config.validate()
    if lora_layers(model):
        raise LowbitError("this model already carries LoRA adapters; accepted: a model without (merge_lora or "
                          "detach_lora first)")
    towers = model_towers(model)
    paths = module_paths(model)
    chosen: list[tuple[str, str, nn.Module, str]] = []
    candidates: list[str] = []
    used = [0] * len(targets)
    seen: set[int] = set()
    for tower, root in towers.items():
        for name, m in root.named_modules():
            kind = lora_kind(m)
            if kind is None or id(m) in seen or not name:
                continue
            seen.add(id(m))
            candidates.append(f"{tower}/{name} ({kind})")
            hits = [i for i, t in enumerate(targets) if t.matches(tower, name, kind)]
            for i in hits:
                used[i] += 1
            if hits:
                chosen.append((tower, name, m, kind))
    unused = [targets[i].describe() for i, n in enumerate(used) if not n]
    if unused:
        shown = ", ".join(candidates[:4]) + (f" and {len(candidates) - 4} more" if len(candidates) > 4 else "")
        raise LowbitError(f"LoRA target {unused[0]!r} matches no linear or 1x1 conv layer of this "
                          f"{type(model).__name__} (towers: {', '.join(towers)}); its layers are {shown or 'none'}")
    for tower, name, m, _ in chosen:
        n, k = _dims(m)
        if config.r > min(n, k):
            raise LowbitError(f"LoRA rank {config.r} exceeds layer {tower}/{name} ([{n}, {k}]); accepted: a rank "
                              f"<= {min(n, k)} (the smallest dimension of every targeted layer)")
    for p in model.parameters():
        p.requires_grad_(False)
    report = LoraReport(config)
    gen = torch.Generator().manual_seed(config.seed)
    for tower, _name, m, kind in chosen:
        wrapped = LoraLayer(m, kind, config.r, config.alpha, config.dropout, gen)
        full = paths[id(m)]
        replace_module(model, full, wrapped)
        n, k = _dims(m)
        report.layers[full[0]] = {"tower": tower, "kind": kind, "shape": [n, k], "packed": is_quantized(m)}
    report.packed_routed = route_packed_grads(model)
    report.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report.frozen_params = sum(p.numel() for p in model.parameters() if not p.requires_grad) + sum(
        b.numel() for b in model.buffers())
    return report


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (the only ones that train)."""
    return [p for m in lora_layers(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``<path>.lora_A.weight`` / ``lora_B.weight`` -> tensor (what training checkpoints and PEFT files hold)."""
    out: dict[str, torch.Tensor] = {}
    for path, m in lora_layers(model).items():
        out[f"{path}.lora_A.weight"] = m.lora_A.weight
        out[f"{path}.lora_B.weight"] = m.lora_B.weight
    return out


def load_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors in (every key must name an adapter of ``model`` with the same shape)."""
    own = lora_state(model)
    if set(own) != set(state):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise LowbitError(f"LoRA adapters do not match this model: missing {missing[:2]}, unexpected {extra[:2]}; "
                          "accepted: adapters saved from the same model with the same targets")
    with torch.no_grad():
        for k, t in own.items():
            src = state[k]
            if src.numel() != t.numel():
                raise LowbitError(f"LoRA tensor {k}: received shape {tuple(src.shape)}; expected {tuple(t.shape)}")
            t.copy_(src.reshape(t.shape).to(t.dtype))


def detach_lora(model: nn.Module) -> None:
    """Put the base layers back (adapters dropped) and the packed layers on their ordinary path."""
    paths = module_paths(model)
    for m in list(lora_layers(model).values()):
        replace_module(model, paths[id(m)], m.base_layer)
    unroute_packed_grads(model)


# --- PEFT files -------------------------------------------------------------------------------------------------
def peft_config(model: nn.Module, config: LoraConfig, base_model: str | None = None) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for the adapters of ``model`` (target modules: their full paths)."""
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "bias": "none",
        "target_modules": sorted(lora_layers(model)), "fan_in_fan_out": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "use_rslora": False, "use_dora": False,
        "revision": None,
    }


def save_adapters(model: nn.Module, out_dir: str | Path, config: LoraConfig, base_model: str | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's names) into ``out_dir``."""
    from safetensors.torch import save_file

    from lowbit.io import atomic_path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + k: v.detach().contiguous().clone() for k, v in lora_state(model).items()}
    with atomic_path(out / ADAPTER_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    with atomic_path(out / ADAPTER_CONFIG) as tmp:
        tmp.write_text(json.dumps(peft_config(model, config, base_model), indent=2) + "\n")
    return out


def read_adapter_config(adapter_dir: str | Path) -> LoraConfig:
    """The ``LoraConfig`` of a saved adapter directory (targets: its exact module paths)."""
    from lowbit.limits import read_text

    path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        data = json.loads(read_text(path, "adapter config", "PEFT's adapter_config.json", 1 << 20))
    except ValueError as err:
        raise LowbitError(f"{str(path)!r} is not JSON ({err}); accepted: PEFT's adapter_config.json") from None
    if not isinstance(data, dict) or data.get("peft_type") != "LORA" or not data.get("target_modules"):
        raise LowbitError(f"{str(path)!r} is not a LoRA adapter config; accepted: PEFT's adapter_config.json")
    modules = data["target_modules"]
    targets = tuple(Target("*", m) for m in ([modules] if isinstance(modules, str) else modules))
    return LoraConfig(r=int(data["r"]), alpha=float(data["lora_alpha"]), dropout=float(data.get("lora_dropout", 0)),
                      targets=targets)


def load_adapters(model: nn.Module, adapter_dir: str | Path) -> LoraReport:
    """Attach the adapters saved in ``adapter_dir`` (PEFT format) to ``model`` (packed or float)."""
    from safetensors.torch import load_file

    config = read_adapter_config(adapter_dir)
    full = tuple(Target("*", t.pattern) for t in parse_targets(config.targets))
    # PEFT names full paths; lowbit targets name paths inside a tower: match on the full path.
    report = attach_lora(model, dataclasses.replace(config, targets=_tower_targets(model, full)))
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS)).items()}
    load_lora_state(model, state)
    return report


def _tower_targets(model: nn.Module, full: tuple[Target, ...]) -> tuple[Target, ...]:
    """Full module paths -> (tower, path inside the tower) targets."""
    towers = model_towers(model)
    prefixes = {tower: (paths[0] + "." if paths[0] else "")
                for tower, root in towers.items() for paths in [module_paths(model).get(id(root), [""])]}
    out: list[Target] = []
    for t in full:
        hit = next(((tower, t.pattern[len(p):]) for tower, p in prefixes.items() if t.pattern.startswith(p)), None)
        if hit is None:
            raise LowbitError(f"adapter module {t.pattern!r} is in no tower of this {type(model).__name__} "
                              f"(towers: {', '.join(towers)})")
        out.append(Target(hit[0], fnmatch_escape(hit[1])))
    return tuple(out)


def fnmatch_escape(name: str) -> str:
    """A module path as an fnmatch pattern matching only itself."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


# --- merge ------------------------------------------------------------------------------------------------------
def merge_lora(model: nn.Module) -> dict[str, Any]:
    """Fold every adapter into its layer and detach; packed layers are re-rounded on their own grid.

    Returns the merge error per layer and overall: ``rel_rms`` = RMS(merged - (W_q + delta)) / RMS(W_q + delta),
    and ``delta_rel_rms`` = RMS(delta) / RMS(W_q) (how large the update was to begin with); a merge that loses
    most of the update shows ``rel_rms`` near ``delta_rel_rms``.
    """
    from lowbit.quant.primitives import QuantSpec, to_packed

    rows: dict[str, dict[str, float]] = {}
    err2 = ref2 = d2 = w2 = 0.0
    for path, m in lora_layers(model).items():
        base, delta = m.base_layer, m.delta_weight()
        with torch.no_grad():
            if isinstance(base, QuantLinear):
                packed = base.packed
                if type(packed) is not PackedWeight:
                    raise LowbitError(f"{path}: merging into the {type(packed).__name__} storage is not supported; "
                                      "accepted: the standard codes layout (or keep the adapters separate)")
                wq = packed.dequantize()
                s = base.input_scale
                target = wq + (delta * s.float() if s is not None else delta)  # the layer computes (x / s) @ W^T
                spec = QuantSpec(base.bits, base.group_size, base.symmetric)
                new = to_packed(target.reshape(packed.shape), spec, scales=packed.scales.float(), zeros=packed.zeros)
                base._buffers["qweight"] = new.qweight  # a new tensor: loaded buffers may be read-only mmaps
                merged = new.dequantize()
            else:
                wq = base.weight.detach().float().flatten(1)
                target = wq + delta
                base.weight.copy_(target.reshape(base.weight.shape))
                merged = target
        e, r = float(((merged - target) ** 2).sum()), float((target ** 2).sum())
        dd, ww = float((delta ** 2).sum()), float((wq ** 2).sum())
        rows[path] = {"rel_rms": math.sqrt(e / max(r, 1e-30)), "delta_rel_rms": math.sqrt(dd / max(ww, 1e-30))}
        err2, ref2, d2, w2 = err2 + e, ref2 + r, d2 + dd, w2 + ww
    detach_lora(model)
    return {"layers": rows, "rel_rms": math.sqrt(err2 / max(ref2, 1e-30)),
            "delta_rel_rms": math.sqrt(d2 / max(w2, 1e-30))}
