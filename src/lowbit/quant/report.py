"""What ``quantize_`` did: per-layer format, size and weight error, plus every weight kept in float and why.

Sizes follow docs/PACKED_FORMAT.md: packed bytes = qweight + scales + zeros; bits per weight = 8 * packed
bytes / parameters (scales and zero points included). Weight error is the relative Frobenius norm
||W - W_q|| / ||W|| of the weight the layer effectively computes with (methods: see lowbit.quant.methods;
GPTQ arXiv:2210.17323 reports the same per-layer quantities).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

# Float-kept categories. ``quantize_(strict=True)`` rejects the STRICT ones: weight layers nobody chose to skip.
SKIPPED = "skipped"  # an explicit skip rule
NO_RULE = "no_rule"  # a Linear/Conv2d no rule matches
UNSUPPORTED = "unsupported"  # a weight layer lowbit cannot quantize (e.g. Conv1d, Linear with custom forward)
NOT_A_LAYER = "not_a_layer"  # norms, loose parameters: float by design
NO_OPT_IN = "not_opted_in"  # an embedding table no rule names (embedding is an opt-in kind): float unless asked
OUTSIDE = "outside_towers"  # parameters not under any tower
STRICT_CATEGORIES = (NO_RULE, UNSUPPORTED)


@dataclass
class ModuleQuant:
    """One quantized layer."""

    tower: str
    name: str  # inside the tower ("" = the tower itself)
    path: str  # full name in the model (state-dict prefix)
    kind: str  # linear, conv1x1, conv
    method: str
    bits: int
    group_size: int  # effective (K when per-channel)
    symmetric: bool
    shape: list[int]
    params: int
    fp32_bytes: int
    packed_bytes: int
    bits_per_weight: float
    weight_error: float
    has_input_scale: bool = False
    rule: int = -1  # index of the recipe rule that chose this
    activations: dict[str, Any] | None = None  # ActSpec.to_dict() of its input quantization (None: a16)

    @property
    def label(self) -> str:
        return f"{self.tower}/{self.name}" if self.name else self.tower


@dataclass
class FloatModule:
    """A module whose own parameters stay in float, and why."""

    tower: str
    name: str
    type: str
    params: int
    bytes: int
    reason: str
    category: str

    @property
    def label(self) -> str:
        return f"{self.tower}/{self.name}" if self.name else (self.tower or "(model)")


@dataclass
class QuantReport:
    """Per-layer results of ``quantize_`` plus the float-kept modules; ``to_dict`` goes into the manifest."""

    modules: list[ModuleQuant] = field(default_factory=list)
    float_modules: list[FloatModule] = field(default_factory=list)
    recipe: str = ""
    recipe_spec: dict[str, Any] = field(default_factory=dict)  # Recipe.to_dict() of the recipe applied
    # what the calibrated methods saw: {"source": name or path, "kind": images/texts/self-generated/inputs,
    # "samples": n, "seed": s, ...}; None when no method needed calibration data
    calibration: dict[str, Any] | None = None
    attention: list[str] = field(default_factory=list)  # "tower/name" of the attention modules quantized
    transforms: dict[str, Any] = field(default_factory=dict)  # method -> what its prepare_model changed (RepQ)

    def strict_violations(self) -> list[FloatModule]:
        """Float-kept weight layers that no skip rule asked for."""
        return [f for f in self.float_modules if f.category in STRICT_CATEGORIES]

    def totals(self) -> dict[str, dict[str, Any]]:
        """Per tower and ``total``: params/bytes quantized and kept float, bits per weight, compression."""
        acc: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for m in self.modules:
            for key in (m.tower, "total"):
                a = acc[key]
                a["quantized_layers"] += 1
                a["quantized_params"] += m.params
                a["fp32_bytes"] += m.fp32_bytes
                a["packed_bytes"] += m.packed_bytes
                a["err_sq_weighted"] += m.weight_error**2 * m.params
        for f in self.float_modules:
            for key in (f.tower or "(none)", "total"):
                acc[key]["float_params"] += f.params
                acc[key]["float_bytes"] += f.bytes
        out: dict[str, dict[str, Any]] = {}
        for key in sorted(acc, key=lambda k: (k == "total", k)):
            a = acc[key]
            qp, fb, pb = int(a["quantized_params"]), int(a["float_bytes"]), int(a["packed_bytes"])
            stored = pb + fb
            out[key] = {
                "quantized_layers": int(a["quantized_layers"]),
                "quantized_params": qp,
                "quantized_fp32_bytes": int(a["fp32_bytes"]),
                "packed_bytes": pb,
                "bits_per_weight": 8 * pb / qp if qp else 0.0,
                "weight_error_rms": (a["err_sq_weighted"] / qp) ** 0.5 if qp else 0.0,
                "float_params": int(a["float_params"]),
                "float_bytes": fb,
                "stored_bytes": stored,
                "compression": (a["fp32_bytes"] + 4 * a["float_params"]) / stored if stored else 0.0,
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "recipe_spec": self.recipe_spec,
            "modules": [asdict(m) for m in self.modules],
            "float_modules": [asdict(f) for f in self.float_modules],
            "totals": self.totals(),
            "calibration": self.calibration,
            **({"attention": list(self.attention)} if self.attention else {}),
            **({"transforms": dict(self.transforms)} if self.transforms else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantReport:
        return cls(
            modules=[ModuleQuant(**m) for m in data.get("modules", [])],
            float_modules=[FloatModule(**f) for f in data.get("float_modules", [])],
            recipe=data.get("recipe", ""),
            recipe_spec=data.get("recipe_spec", {}),
            calibration=data.get("calibration"),
            attention=list(data.get("attention", [])),
            transforms=dict(data.get("transforms", {})),
        )

    def markdown(self, max_rows: int | None = None) -> str:
        """Tables: totals per tower, quantized layers, float-kept modules."""
        calibrated = [] if not self.calibration else [
            "Calibration: " + ", ".join(f"{k} {v}" for k, v in self.calibration.items()), ""]
        lines = [f"## Quantization report ({self.recipe or 'recipe'})", "", *calibrated,
                 "| tower | layers | params | fp32 | packed | bits/w | rms err | kept float | x smaller |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for tower, t in self.totals().items():
            lines.append(
                f"| {tower} | {t['quantized_layers']} | {t['quantized_params']:,} | "
                f"{_size(t['quantized_fp32_bytes'])} | {_size(t['packed_bytes'])} | "
                f"{t['bits_per_weight']:.2f} | {t['weight_error_rms']:.4f} | {_size(t['float_bytes'])} | "
                f"{t['compression']:.2f} |"
            )
        lines += ["", "| layer | kind | method | format | shape | bits/w | rel. error |",
                  "|---|---|---|---|---|---:|---:|"]
        rows = self.modules if max_rows is None else self.modules[:max_rows]
        for m in rows:
            k = 1
            for d in m.shape[1:]:
                k *= d
            group = "per-channel" if m.group_size >= k else f"g{m.group_size}"
            fmt = f"w{m.bits} {group} {'sym' if m.symmetric else 'asym'}" + (" +in_scale" if m.has_input_scale else "")
            lines.append(f"| {m.label} | {m.kind} | {m.method} | {fmt} | {'x'.join(map(str, m.shape))} | "
                         f"{m.bits_per_weight:.2f} | {m.weight_error:.4f} |")
        if max_rows is not None and len(self.modules) > max_rows:
            lines.append(f"| ... {len(self.modules) - max_rows} more | | | | | | |")
        lines += ["", "| kept float | type | params | reason |", "|---|---|---:|---|"]
        for f in self.float_modules:
            lines.append(f"| {f.label} | {f.type} | {f.params:,} | {f.reason} |")
        return "\n".join(lines) + "\n"


def _size(nbytes: float) -> str:
    """Human-readable byte count (decimal units)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} B"
