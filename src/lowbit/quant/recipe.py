"""Quantization recipes: an ordered list of rules saying which layers get which method and format.

A rule matches a layer by tower (``vision``, ``text``, ``projector``, or ``*``), an fnmatch glob on the
layer's name inside its tower, and optionally its kinds; the first matching rule wins. Kinds: ``linear``,
``conv1x1``, ``conv``, ``lm_head`` (a model's output head: a linear, so ``linear`` rules match it too) and
``embedding`` (token / position tables: only rules that name ``embedding`` match them, so recipes written
before embeddings were quantizable keep their meaning). ``float_dtype`` (``fp32`` or ``fp16``) is how the
tensors no rule quantizes (norms, biases, tiny layers) are stored; ``quantize_`` rounds them to it in place.
Sources, all through ``load_recipe``:

- a preset name (``w8``, ``w4``, ``w3``, ``w2``: YAML files in ``lowbit/configs/recipes``),
- a YAML file::

      version: 1
      rules:
        - {tower: vision, pattern: "*depthwise*", skip: true}
        - {tower: vision, pattern: "*", method: gptq, bits: 4, group_size: 64, symmetric: true}
        - {tower: "*", kinds: [conv], method: rtn, bits: 8, options: {}}

- a short string: ``vision=w4g64:gptq,text=w4g64:gptq,projector=w8``; items are
  ``TOWER[/PATTERN][@KIND+KIND]=wBITS[gGROUP][a][:METHOD]`` (``a`` = asymmetric, METHOD defaults to rtn, no g =
  per output channel; ``@embedding`` restricts the item to those kinds) or ``TOWER[/PATTERN]=skip``;
  activations follow the weights as ``aBITS[d][k|gGROUP][z]`` (``w8a8``: int8 activations, static per-tensor
  scales calibrated once; ``d`` dynamic, ``k`` per token, ``gN`` per group, ``z`` asymmetric; ``w4aa8``:
  asymmetric weights, then a8; YAML: ``activations: a8`` or a mapping, lowbit.kernels.act_quant);
  ``w1.58`` is short for ``w2:ternary`` (ternary weights in 2-bit codes, method lowbit.quant.ternary);
  ``floats=fp16`` sets ``float_dtype``; ``attention=a8`` quantizes the QKᵀ / AV matmuls of every attention module
  the model's family declares quantizable (``a4l``: 4-bit with log2 probabilities; YAML: ``attention:``,
  lowbit.kernels.attn_quant).

Methods themselves cite their papers (lowbit.quant.rtn / gptq / awq); the recipe layer is format only.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError
from lowbit.kernels import act_quant
from lowbit.kernels.act_quant import ActSpec
from lowbit.kernels.attn_quant import AttnSpec
from lowbit.kernels.formats import SUPPORTED_BITS
from lowbit.kernels.quant_linear import QUANT_KINDS
from lowbit.limits import MAX_GROUP_SIZE, MAX_RECIPE_CHARS, MAX_RECIPE_FILE_BYTES, load_yaml, read_text
from lowbit.quant.methods import get_method, method_names
from lowbit.quant.primitives import QuantSpec

RECIPE_VERSION = 1
PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "recipes"
SHORT_FORM = ("TOWER[/PATTERN]=wBITS[gGROUP][a][:METHOD] (TOWER[/PATTERN]@KIND+KIND=... for those kinds only), "
              "TOWER[/PATTERN]=skip, or floats=fp16|fp32; activations follow the weights as aBITS[d][k|gGROUP][z] "
              "(w8a8, w4g64a8dk)")
_RULE_FIELDS = ("tower", "pattern", "kinds", "method", "bits", "group_size", "symmetric", "skip", "options",
                "optional", "activations")
_BITS_TEXT = ",".join(map(str, SUPPORTED_BITS))
_DIGITS = "0123456789"  # str.isdigit() also takes "²" and other digits int() refuses
TERNARY_ALIAS = "w1.58"  # short-string alias of w2:ternary (lowbit.quant.ternary)
FLOAT_DTYPES = ("fp32", "fp16")  # storage of the tensors no rule quantizes
OPT_IN_KINDS = ("embedding",)  # matched only by rules naming them
HEAD_KIND = "lm_head"  # a model's output head: a linear layer that rules may single out
RULE_KINDS_EXTRA = (HEAD_KIND,)  # rule kinds that are not storage kinds


@dataclass(frozen=True)
class Rule:
    """Quantize layers matching (tower, pattern, kinds) with ``method`` at ``spec``; ``spec=None`` = keep float."""

    tower: str = "*"
    pattern: str = "*"
    method: str = "rtn"
    spec: QuantSpec | None = None
    options: dict[str, Any] = field(default_factory=dict)
    kinds: tuple[str, ...] | None = None  # None = every kind
    # may match no layer without the "matches no module" warning: with_method's rule for the layers of other
    # kinds, which the model may not have or an earlier rule may already take
    optional: bool = False
    activations: ActSpec | None = None  # input activation quantization (lowbit.kernels.act_quant); None: a16

    @property
    def skip(self) -> bool:
        return self.spec is None

    def matches(self, tower: str, name: str, kind: str | None = None) -> bool:
        """Does this rule apply to layer ``name`` of ``tower`` (of ``kind``, if known)?"""
        if not fnmatch.fnmatchcase(tower, self.tower) or not fnmatch.fnmatchcase(name, self.pattern):
            return False
        if kind in OPT_IN_KINDS:
            return self.kinds is not None and kind in self.kinds
        if self.kinds is None or kind is None or kind in self.kinds:
            return True
        return kind == HEAD_KIND and "linear" in self.kinds  # the head is a linear layer

    def describe(self) -> str:
        """Short human form, e.g. ``vision/*attn*=w4g64:gptq`` (kinds in brackets when restricted)."""
        where = self.tower if self.pattern == "*" else f"{self.tower}/{self.pattern}"
        kinds = "" if self.kinds is None else f"[{'+'.join(self.kinds)}]"
        acts = "" if self.activations is None else self.activations.short()
        what = "skip" if self.spec is None else f"{self.spec.short()}{acts}:{self.method}"
        return f"{where}{kinds}={what}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tower": self.tower, "pattern": self.pattern}
        if self.kinds is not None:
            out["kinds"] = list(self.kinds)
        if self.optional:
            out["optional"] = True
        if self.spec is None:
            out["skip"] = True
            return out
        out.update(method=self.method, **self.spec.to_dict())
        if self.options:
            out["options"] = dict(self.options)
        if self.activations is not None:
            out["activations"] = self.activations.to_dict()
        return out


@dataclass(frozen=True)
class Recipe:
    """An ordered list of rules; ``name`` records where it came from (preset, path or short string)."""

    rules: tuple[Rule, ...]
    name: str = ""
    float_dtype: str = "fp32"
    attention: AttnSpec | None = None  # quantized QKᵀ / AV matmuls of every attention (lowbit.kernels.attn_quant)

    def match(self, tower: str, name: str, kind: str | None = None) -> tuple[int, Rule] | None:
        """(index, rule) of the first rule matching the layer, or None."""
        for i, rule in enumerate(self.rules):
            if rule.matches(tower, name, kind):
                return i, rule
        return None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": RECIPE_VERSION, "name": self.name, "float_dtype": self.float_dtype,
                               "rules": [r.to_dict() for r in self.rules]}
        if self.attention is not None:
            out["attention"] = self.attention.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Any, name: str = "") -> Recipe:
        """Parse the YAML/JSON form; errors name the rule index and field."""
        if not isinstance(data, dict):
            raise LowbitError(f"recipe {name!r}: expected a mapping with 'rules'; received {type(data).__name__}")
        unknown = sorted(map(str, set(data) - {"version", "name", "rules", "float_dtype", "attention"}))
        if unknown:
            raise LowbitError(f"recipe {name!r}: unknown top-level key(s) {_short(unknown)}; accepted: version, "
                              "name, "
                              "float_dtype, rules, attention")
        try:
            attention = AttnSpec.parse(data.get("attention"))
        except (LowbitError, TypeError) as err:
            raise LowbitError(f"recipe {name!r}: attention: {err}") from None
        float_dtype = data.get("float_dtype", "fp32")
        if float_dtype not in FLOAT_DTYPES:
            raise LowbitError(f"recipe {name!r}: float_dtype {_short(float_dtype)}; accepted: "
                              f"{', '.join(FLOAT_DTYPES)}")
        version = data.get("version", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise LowbitError(f"recipe {name!r}: unsupported version {_short(version)}; accepted: {RECIPE_VERSION}")
        rules = data.get("rules")
        if not isinstance(rules, list) or not rules:
            raise LowbitError(f"recipe {name!r}: 'rules' must be a non-empty list; received {_short(rules)}")
        parsed = tuple(_rule_from_dict(i, r) for i, r in enumerate(rules))
        return cls(parsed, name=str(data.get("name") or name), float_dtype=float_dtype, attention=attention)

    def describe(self) -> str:
        return ", ".join(r.describe() for r in self.rules)

    def with_method(self, method: str) -> Recipe:
        """The same recipe with ``method`` on its main rules: the non-skip rules of the lowest bit-width.

        This is how a sweep compares methods on one preset: ``w4`` keeps its 8-bit projector/conv rules and
        swaps the method of its 4-bit rules; ``w8`` swaps every rule. Method-specific options are kept on
        rules whose method does not change (``w4`` with ``gptq`` is the preset itself) and dropped otherwise.

        Example:
            >>> load_recipe("w4").with_method("awq").name
            'w4+awq'
        """
        from dataclasses import replace

        get_method(method)  # unknown method -> LowbitError listing the registered ones
        lowest = min((r.spec.bits for r in self.rules if r.spec is not None), default=None)
        matmul_kinds = ("linear", "conv1x1")  # calibrated methods work on matmuls; other convs keep their rule
        rules: list[Rule] = []
        for r in self.rules:
            if r.spec is None or r.spec.bits != lowest:
                rules.append(r)
                continue
            kinds = tuple(k for k in (r.kinds or matmul_kinds) if k in matmul_kinds)
            if kinds:
                options = dict(r.options) if r.method == method else {}
                rules.append(replace(r, method=method, options=options, kinds=kinds))
            if r.kinds is None or set(r.kinds) - set(matmul_kinds):
                rules.append(replace(r, optional=True))  # the same layers of other kinds, as before
        rules = tuple(rules)
        return Recipe(rules, name=f"{self.name}+{method}", float_dtype=self.float_dtype, attention=self.attention)


def _short(value: Any) -> str:
    """``repr(value)`` cut to 60 characters (a hostile value must not make a megabyte error line)."""
    if isinstance(value, int) and value.bit_length() > 100:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _rule_error(index: int, fieldname: str, message: str) -> LowbitError:
    return LowbitError(f"recipe rule {index} field {_short(fieldname)}: {message}")  # repr: a name may hold newlines


def _rule_from_dict(index: int, raw: Any) -> Rule:
    if not isinstance(raw, dict):
        raise LowbitError(f"recipe rule {index}: expected a mapping; received {_short(raw)}")
    unknown = sorted(map(str, set(raw) - set(_RULE_FIELDS)))
    if unknown:
        raise _rule_error(index, unknown[0], f"unknown field; accepted: {', '.join(_RULE_FIELDS)}")
    for key in ("tower", "pattern"):
        if not isinstance(raw.get(key, "*"), str) or not raw.get(key, "*"):
            raise _rule_error(index, key, f"expected a non-empty string; received {raw.get(key)!r}")
    kinds = raw.get("kinds")
    if kinds is not None:
        if isinstance(kinds, str):
            kinds = [kinds]
        bad = [k for k in kinds if k not in QUANT_KINDS and k not in RULE_KINDS_EXTRA] \
            if isinstance(kinds, list) else [kinds]
        if bad or not kinds:
            raise _rule_error(index, "kinds", f"received {raw.get('kinds')!r}; accepted: a list of "
                              f"{', '.join(QUANT_KINDS.names())}")
        kinds = tuple(kinds)
    optional = raw.get("optional", False)
    if not isinstance(optional, bool):
        raise _rule_error(index, "optional", f"expected true or false; received {optional!r}")
    common = {"tower": raw.get("tower", "*"), "pattern": raw.get("pattern", "*"), "kinds": kinds,
              "optional": optional}
    skip = raw.get("skip", False)
    if not isinstance(skip, bool):
        raise _rule_error(index, "skip", f"expected true or false; received {skip!r}")
    if skip:
        extra = sorted(set(raw) & {"method", "bits", "group_size", "symmetric", "options", "activations"})
        if extra:
            raise _rule_error(index, extra[0], "a skip rule takes only tower, pattern and kinds")
        return Rule(**common, method="", spec=None)
    if "bits" not in raw:
        raise _rule_error(index, "bits", f"missing; bits must be one of {_BITS_TEXT} (or set skip: true)")
    bits, gs, sym = raw["bits"], raw.get("group_size"), raw.get("symmetric", True)
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise _rule_error(index, "bits", f"received {_short(bits)}; bits must be one of {_BITS_TEXT}")
    if gs is not None and (isinstance(gs, bool) or not isinstance(gs, int) or not 1 <= gs <= MAX_GROUP_SIZE):
        raise _rule_error(index, "group_size", f"received {_short(gs)}; expected an integer in 1..{MAX_GROUP_SIZE} "
                          "or null (per-channel)")
    if not isinstance(sym, bool):
        raise _rule_error(index, "symmetric", f"received {sym!r}; expected true or false")
    try:
        spec = QuantSpec(bits, gs, sym)
    except LowbitError as err:
        raise _rule_error(index, "symmetric", str(err)) from None
    method = raw.get("method", "rtn")
    known = method_names()
    if method not in known:
        raise _rule_error(index, "method", f"unknown quantization method {method!r}; choose one of: "
                          f"{', '.join(known)}")
    options = raw.get("options") or {}
    if not isinstance(options, dict):
        raise _rule_error(index, "options", f"expected a mapping; received {options!r}")
    try:
        activations = act_quant.spec_from_rule_value(raw.get("activations"))
    except (LowbitError, TypeError) as err:
        raise _rule_error(index, "activations", f"{err}; accepted: a short form such as a8 / a4z / a8dk / a8g64, "
                          "a16 (none) or a mapping of bits, dynamic, granularity, group_size, symmetric, "
                          "calibration, percentile") from None
    return Rule(**common, method=method, spec=spec, options=dict(options), activations=activations)


# --- short strings ------------------------------------------------------------------------------------------
class _ShortError(Exception):
    """A malformed short-string item (the caller adds the position)."""


def _parse_value(value: str) -> tuple[QuantSpec | None, str, ActSpec | None]:
    """``wBITS[gGROUP][a][aBITS...][:METHOD]`` or ``skip`` -> (spec, method, activations); raises _ShortError."""
    if value == "skip":
        return None, "", None
    body, colon, method = value.partition(":")
    default_method = "rtn"
    if body.startswith(TERNARY_ALIAS):  # log2(3) = 1.58 bits: ternary weights, stored as 2-bit codes
        body, default_method = "w2" + body[len(TERNARY_ALIAS):], "ternary"
    if not body.startswith("w"):
        raise _ShortError(f"expected 'w<bits>' or 'skip', found {value!r}")
    i = 1
    j = i
    while j < len(body) and body[j] in _DIGITS:
        j += 1
    if j == i:
        raise _ShortError(f"missing bit width after 'w' (ASCII digits); bits must be one of {_BITS_TEXT}")
    if j - i > 2:
        raise _ShortError(f"bits must be one of {_BITS_TEXT}; received {j - i} digits")
    bits = int(body[i:j])
    if bits not in SUPPORTED_BITS:
        raise _ShortError(f"bits must be one of {_BITS_TEXT}; received {bits}")
    group: int | None = None
    if j < len(body) and body[j] == "g":
        k = j + 1
        while k < len(body) and body[k] in _DIGITS:
            k += 1
        if k == j + 1 or k - j - 1 > 7 or not 1 <= int(body[j + 1 : k]) <= MAX_GROUP_SIZE:
            raise _ShortError(f"group size after 'g' must be an integer in 1..{MAX_GROUP_SIZE} (ASCII digits)")
        group, j = int(body[j + 1 : k]), k
    symmetric = True
    if j < len(body) and body[j] == "a" and body[j + 1:j + 2] not in tuple(_DIGITS):  # 'a' + digit: activations
        symmetric, j = False, j + 1
    activations = None
    if j < len(body) and body[j] == "a":
        try:
            activations = act_quant.spec_from_rule_value(body[j:])
        except LowbitError as err:
            raise _ShortError(str(err)) from None
        j = len(body)
    if j != len(body):
        raise _ShortError(f"unexpected {body[j:]!r}")
    if colon:
        known = method_names()
        if method not in known:
            raise _ShortError(f"unknown quantization method {method!r}; choose one of: "
                              f"{', '.join(known)}")
    else:
        method = default_method
    try:
        spec = QuantSpec(bits, group, symmetric)
    except LowbitError as err:
        raise _ShortError(str(err)) from None
    return spec, method, activations


def parse_short(text: str) -> Recipe:
    """Parse ``vision=w4g64:gptq,text=w4g64:gptq,projector=w8``.

    Errors give the 1-based character position where the offending item starts, quote the item, and say
    which part of it is wrong.
    """
    if len(text) > MAX_RECIPE_CHARS:
        raise LowbitError(f"recipe of {len(text)} characters; accepted: at most {MAX_RECIPE_CHARS} ({SHORT_FORM}), or "
                          "a YAML file")
    rules: list[Rule] = []
    float_dtype = "fp32"
    attention = None
    start = 0
    for piece in text.split(","):
        lead = len(piece) - len(piece.lstrip())
        item = piece.strip()
        pos = start + lead  # offset of ``item`` in ``text``
        try:
            if not item:
                raise _ShortError("empty item")
            target, eq, value = item.partition("=")
            if not eq:
                raise _ShortError("missing '='")
            if target.strip() == "floats":
                if value.strip() not in FLOAT_DTYPES:
                    raise _ShortError(f"floats takes {' or '.join(FLOAT_DTYPES)}")
                float_dtype = value.strip()
                start += len(piece) + 1
                continue
            if target.strip() == "attention":  # quantized attention matmuls: attention=a8 (a4l: log2 probs)
                try:
                    attention = AttnSpec.parse(value.strip())
                except LowbitError as err:
                    raise _ShortError(str(err)) from None
                start += len(piece) + 1
                continue
            target, at, kind_text = target.partition("@")
            kinds = tuple(k.strip() for k in kind_text.split("+")) if at else None
            if kinds is not None:
                bad = [k for k in kinds if k not in QUANT_KINDS and k not in RULE_KINDS_EXTRA]
                if bad or not all(kinds):
                    raise _ShortError(f"unknown kind {(bad or [''])[0]!r} after '@'; accepted: "
                                      f"{', '.join([*QUANT_KINDS.names(), *RULE_KINDS_EXTRA])}")
            tower, slash, pattern = target.partition("/")
            if not tower.strip():
                raise _ShortError("missing tower name (use * for all towers)")
            if slash and not pattern.strip():
                raise _ShortError("empty pattern after '/'")
            spec, method, activations = _parse_value(value.strip())
            rules.append(Rule(tower.strip(), pattern.strip() or "*", method, spec, kinds=kinds,
                              activations=activations))
        except _ShortError as err:
            raise LowbitError(
                f"recipe error at character {pos + 1} ({_short(item)}): {err}; form: {SHORT_FORM}"
            ) from None
        start += len(piece) + 1
    if not rules:
        raise LowbitError(f"recipe {text!r} has no quantization rule; form: {SHORT_FORM}")
    return Recipe(tuple(rules), name=text, float_dtype=float_dtype, attention=attention)


# --- entry point ----------------------------------------------------------------------------------------------
def preset_names() -> list[str]:
    """Names of the shipped recipe presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_recipe_file(path: str | Path, name: str | None = None) -> Recipe:
    """Read a YAML recipe file."""
    accepted = "a YAML file with 'rules'"
    text = read_text(path, "recipe file", accepted, MAX_RECIPE_FILE_BYTES)
    data = load_yaml(text, f"recipe file {str(path)!r}", accepted)
    return Recipe.from_dict(data, name=name or str(path))


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # a name too long for a path, a NUL: not a file, maybe a short string
        return False


def load_recipe(spec: str | Recipe) -> Recipe:
    """A preset name, a .yaml path, or a short string -> ``Recipe`` (a ``Recipe`` passes through).

    Example:
        >>> load_recipe("vision=w4g64,text=w4g64,projector=w8").rules[0].spec
        QuantSpec(bits=4, group_size=64, symmetric=True)
    """
    if isinstance(spec, Recipe):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise LowbitError(f"empty recipe {spec!r}; choose a preset ({', '.join(preset_names())}), "
                          f"a .yaml path, or a short string {SHORT_FORM}")
    spec = spec.strip()
    if len(spec) > MAX_RECIPE_CHARS or "\x00" in spec:
        raise LowbitError(f"recipe of {len(spec)} characters{' with a NUL' if chr(0) in spec else ''}; accepted: at "
                          f"most {MAX_RECIPE_CHARS} printable characters: a preset, a .yaml path or {SHORT_FORM}")
    if spec in preset_names():
        return load_recipe_file(PRESET_DIR / f"{spec}.yaml", name=spec)
    if spec.endswith((".yaml", ".yml")) or _is_file(spec):
        return load_recipe_file(spec)
    if "=" not in spec:
        raise LowbitError(f"unknown recipe {spec!r}; choose one of: {', '.join(preset_names())}, "
                          f"a .yaml path, or a short string {SHORT_FORM}")
    return parse_short(spec)


def recipe_from_rules(rules: Sequence[Rule], name: str = "") -> Recipe:
    """Build a recipe in code."""
    return Recipe(tuple(rules), name=name)
