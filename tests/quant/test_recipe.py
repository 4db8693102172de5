"""Recipe presets, short strings, YAML files and their error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from lowbit.errors import LowbitError
from lowbit.quant.primitives import QuantSpec
from lowbit.quant.recipe import Recipe, load_recipe, parse_short, preset_names


def test_presets_parse_and_round_trip() -> None:
    assert preset_names() == ["w2", "w3", "w4", "w8"]
    for name in preset_names():
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.rules
        assert Recipe.from_dict(recipe.to_dict()) == recipe
    w8 = load_recipe("w8")
    assert w8.match("text", "encoder.layer.0.attention.self.query", "linear")[1].spec == QuantSpec(8)
    w4 = load_recipe("w4")
    assert w4.match("projector", "image", "linear")[1].spec == QuantSpec(8)
    for name in ("w3", "w2"):  # stem and depthwise convs: 8-bit GPTQ in the lower-bit presets
        dw = load_recipe(name).match("vision", "net._blocks.3._depthwise_conv", "conv")[1]
        assert (dw.method, dw.spec) == ("gptq", QuantSpec(8))
    for recipe in (w8, w4):  # convs data-free (issue 20, out of domain): k x k float, 1x1 8-bit g32 asymmetric RTN
        assert recipe.match("vision", "net._blocks.3._depthwise_conv", "conv")[1].skip
        hit = recipe.match("vision", "net._blocks.3._expand_conv", "conv1x1")[1]
        assert (hit.method, hit.spec) == ("rtn", QuantSpec(8, 32, False))
    hit = w4.match("text", "encoder.layer.0.attention.self.query", "linear")[1]
    assert (hit.method, hit.spec) == ("gptq", QuantSpec(4, 128))
    assert hit.options == {"act_order": True, "clip_search": True}
    assert load_recipe("w3").match("text", "x", "linear")[1].spec == QuantSpec(3, 32)
    assert load_recipe("w2").match("text", "x", "linear")[1].spec == QuantSpec(2, 32)


def test_short_strings_parse() -> None:
    recipe = load_recipe("vision=w4g64:gptq, text/*attention*=w3g32a ,projector=w8,*=skip")
    r0, r1, r2, r3 = recipe.rules
    assert (r0.tower, r0.pattern, r0.method, r0.spec) == ("vision", "*", "gptq", QuantSpec(4, 64))
    assert (r1.tower, r1.pattern, r1.method, r1.spec) == ("text", "*attention*", "rtn", QuantSpec(3, 32, False))
    assert r2.spec == QuantSpec(8, None) and r3.skip and r3.tower == "*"
    assert recipe.match("text", "encoder.attention.q")[1] is r1
    assert recipe.match("text", "encoder.mlp")[1] is r3  # first match wins; * catches the rest
    assert Recipe.from_dict(recipe.to_dict()).rules == recipe.rules


@pytest.mark.parametrize(
    "text, message",
    [
        ("vision=w9", r"character 1 \('vision=w9'\): bits must be one of 1,2,3,4,5,6,8"),
        ("text=w4g64:gptq,vision=w9", r"character 17 \('vision=w9'\): bits must be one of 1,2,3,4,5,6,8"),
        ("vision=w4, text=w4g0", r"character 12 \('text=w4g0'\): group size"),
        ("vision=w4:nope", r"unknown quantization method 'nope'; choose one of: .*rtn"),
        ("vision=w4x", r"unexpected 'x'"),
        ("vision=4", r"expected 'w<bits>' or 'skip'"),
        ("vision=w4,,text=w4", r"character 11 \(''\): empty item"),
        ("vision/=w4", r"empty pattern"),
        ("vision=w1a", r"1-bit"),
    ],
)
def test_malformed_short_strings_name_the_position(text: str, message: str) -> None:
    with pytest.raises(LowbitError, match=message) as info:
        parse_short(text)
    assert "form: TOWER[/PATTERN]=wBITS[gGROUP][a][:METHOD]" in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_name_lists_presets() -> None:
    with pytest.raises(LowbitError, match=r"unknown recipe 'w5'; choose one of: w2, w3, w4, w8"):
        load_recipe("w5")


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_file(tmp_path: Path) -> None:
    recipe = load_recipe(_yaml(tmp_path, """
version: 1
rules:
  - {tower: vision, pattern: "*depthwise*", skip: true}
  - {tower: vision, kinds: [linear, conv1x1], method: rtn, bits: 4, group_size: 64, symmetric: false}
  - {tower: "*", method: rtn, bits: 8, options: {}}
"""))
    assert recipe.rules[0].skip and recipe.rules[1].kinds == ("linear", "conv1x1")
    assert recipe.match("vision", "b.conv", "conv")[0] == 2  # kind filter
    assert recipe.match("vision", "b.fc", "linear")[1].spec == QuantSpec(4, 64, False)


@pytest.mark.parametrize(
    "rules, message",
    [
        ("- {tower: vision, bits: 9}", r"rule 0 field 'bits': received 9; bits must be one of 1,2,3,4,5,6,8"),
        ("- {bits: 8}\n  - {tower: text, bits: 4, method: foo}", r"rule 1 field 'method': unknown .*'foo'"),
        ("- {bits: 4, group_size: -1}", r"rule 0 field 'group_size'"),
        ("- {bits: 4, bitz: 3}", r"rule 0 field 'bitz': unknown field"),
        ("- {tower: text}", r"rule 0 field 'bits': missing"),
        ("- {skip: true, bits: 4}", r"rule 0 field 'bits': a skip rule takes only"),
        ("- {bits: 4, kinds: [dense]}", r"rule 0 field 'kinds'"),
        ("- {bits: 4, symmetric: maybe}", r"rule 0 field 'symmetric'"),
    ],
)
def test_yaml_errors_name_rule_and_field(tmp_path: Path, rules: str, message: str) -> None:
    with pytest.raises(LowbitError, match=message):
        load_recipe(_yaml(tmp_path, f"version: 1\nrules:\n  {rules}\n"))


def test_yaml_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match="not valid YAML"):
        load_recipe(_yaml(tmp_path, "rules: [\n"))
    with pytest.raises(LowbitError, match="unsupported version 2"):
        load_recipe(_yaml(tmp_path, "version: 2\nrules: [{bits: 8}]\n"))
    with pytest.raises(LowbitError, match="non-empty list"):
        load_recipe(_yaml(tmp_path, "version: 1\nrules: []\n"))
    with pytest.raises(LowbitError, match="recipe file .*missing.yaml. does not exist"):
        load_recipe(str(tmp_path / "missing.yaml"))


def test_with_method_swaps_the_main_rules_and_keeps_options_of_unchanged_ones() -> None:
    recipe = Recipe.from_dict({"rules": [
        {"tower": "projector", "method": "rtn", "bits": 8},
        {"tower": "*", "kinds": ["conv"], "method": "gptq", "bits": 8, "options": {"percdamp": 0.1}},
        {"tower": "*", "kinds": ["linear", "conv1x1"], "method": "gptq", "bits": 4, "group_size": 128,
         "options": {"act_order": True, "clip_search": True}},
    ]}, name="r")
    same = recipe.with_method("gptq")
    assert [r.options for r in same.rules] == [r.options for r in recipe.rules] and same.name == "r+gptq"
    awq = recipe.with_method("awq")
    low = awq.match("text", "encoder.layer.0.output.dense", "linear")[1]
    assert (low.method, low.spec, low.options) == ("awq", QuantSpec(4, 128), {})
    conv = awq.match("vision", "net._blocks.1._depthwise_conv", "conv")[1]
    assert (conv.method, conv.options) == ("gptq", {"percdamp": 0.1})  # 8-bit rules are not the main rules
    assert awq.match("projector", "text", "linear")[1].method == "rtn"


def test_a_field_name_with_a_newline_stays_one_line() -> None:
    """Found by the fuzz suite: a hostile field name was printed raw and broke the one-line error."""
    from lowbit.errors import LowbitError
    from lowbit.quant.recipe import Recipe

    with pytest.raises(LowbitError, match=r"field '\\n': unknown field") as err:
        Recipe.from_dict({"rules": [{"\n": None}]})
    assert "\n" not in str(err.value)
