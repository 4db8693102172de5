"""``lowbit search`` on the tiny test family: budgets met exactly, deterministic, cached, one-line infeasible
budgets, and the written YAML recipe quantizes the chosen widths for real."""

from __future__ import annotations

from pathlib import Path

import pytest

from lowbit import api
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.quant.recipe import load_recipe
from tests.models.tiny_family import FAMILY, write_tiny_family

CALIB = {"calib_data": "shapes", "calib_samples": 32, "probe_samples": 16}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("search")
    return f"{FAMILY}:{write_tiny_family(root / 'model')}", root / "cache"


@pytest.fixture(scope="module")
def searched(tiny: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    name, cache = tiny
    out = tmp_path_factory.mktemp("recipe") / "mix.yaml"
    result = api.search(name, budget_bits=3.0, out=out, cache_dir=cache, **CALIB)
    return {"result": result, "out": out}


def test_bits_budget_is_met_and_the_recipe_quantizes_those_widths(searched: dict, tiny: tuple[str, Path]) -> None:
    result, out = searched["result"], searched["out"]
    e = result["expected"]
    assert e["avg_bits"] <= 3.0 and e["avg_bits"] >= 2.9  # spent, never over
    assert sum(la["params"] * la["bits"] for la in result["layers"]) <= 3.0 * e["params"]
    assert len(set(la["bits"] for la in result["layers"])) > 1  # a real mix, not a uniform recipe
    assert not result["sensitivity"]["cached"]
    text = out.read_text()
    assert text.startswith("# lowbit search") and "# measured after save + load" in text
    # the YAML is an ordinary recipe: quantizing with it gives every searched layer its chosen width
    model = api.load(tiny[0])
    report = api.quantize(model, load_recipe(str(out)), calib_data="shapes", calib_samples=32, progress=False)
    got = {(m.tower, m.name): m.bits for m in report.modules}
    assert all(got[(la["tower"], la["name"])] == la["bits"] for la in result["layers"])
    measured = result["measured"]
    assert measured["probe_loss"] > 0 and measured["probe_loss"] < 0.05  # measured 1.3e-3 (KL, float = 0)


def test_cache_is_reused_and_the_search_is_deterministic(searched: dict, tiny: tuple[str, Path]) -> None:
    name, cache = tiny
    again = api.search(name, budget_bits=3.0, cache_dir=cache, measure=False, **CALIB)
    assert again["sensitivity"]["cached"] and again["recipe"] == searched["result"]["recipe"]
    fresh = api.search(name, budget_bits=3.0, cache=False, measure=False, **CALIB)  # measured anew, same seed
    assert not fresh["sensitivity"]["cached"] and fresh["layers"] == searched["result"]["layers"]


def test_byte_and_ms_budgets_are_met(searched: dict, tiny: tuple[str, Path]) -> None:
    name, cache = tiny
    tensor_bytes = searched["result"]["expected"]["tensor_bytes"]
    by_bytes = api.search(name, budget_mb=tensor_bytes / 1e6, cache_dir=cache, measure=False, **CALIB)
    assert by_bytes["expected"]["tensor_bytes"] <= tensor_bytes
    ms = searched["result"]["expected"]["ms"]
    by_ms = api.search(name, budget_ms=ms, cache_dir=cache, measure=False, **CALIB)
    assert by_ms["expected"]["ms"] <= ms


def test_infeasible_budget_is_one_line_naming_the_smallest(tiny: tuple[str, Path], searched: dict,
                                                          capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    name, cache = tiny
    with pytest.raises(LowbitError, match=r"smallest feasible budget is 2 bits per searched weight"):
        api.search(name, budget_bits=1.5, cache_dir=cache, measure=False, **CALIB)
    with pytest.raises(LowbitError, match="exactly one budget"):
        api.search(name, budget_bits=3.0, budget_ms=1.0, cache_dir=cache, **CALIB)
    with pytest.raises(LowbitError, match="widths"):
        api.search(name, budget_bits=3.0, widths=[7], cache_dir=cache, **CALIB)
    code = main(["search", name, "--budget-bits", "1.9", "--widths", "2,x", "--out", str(tmp_path / "r.yaml")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--widths" in err


# --- a llava: image + question probes, the Fisher sensitivity and the measured refinement -----------------------
LLAVA = {"base": "language=w4g32:gptq,vision=w8,projector=w8", "calib_data": "shapes", "calib_samples": 8,
         "probe_data": "shapes-vqa", "probe_samples": 6, "widths": [3, 4, 5, 6, 8], "measure": False}


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    from tests.models.llava_tiny import write_tiny_llava

    root = tmp_path_factory.mktemp("search-llava")
    return str(write_tiny_llava(root / "model")), root / "cache"


def test_llava_search_on_prompts_with_fisher_and_refinement(tiny_llava: tuple[str, Path]) -> None:
    path, cache = tiny_llava
    model = api.load(path)
    result = api.search(model, budget_bits=4.0, sensitivity="fisher", refine_measures=8, cache_dir=cache, **LLAVA)
    record, refined = result["sensitivity"], result["refinement"]
    assert record["probe"] == "PromptProbe" and record["sensitivity"] == "fisher"
    assert refined["probe"] == "PromptProbe" and refined["starts"] == ["knapsack", "uniform w4"]
    assert refined["measured_on"].startswith("held-out probe prompts (shapes-vqa train split, samples 6..11")
    assert 1 <= refined["measures"] <= 8 and refined["loss"] <= refined["start_loss"]
    assert refined["start_loss"] == min(h["loss"] for h in refined["history"] if "start" in h)
    e = result["expected"]
    assert e["avg_bits"] <= 4.0  # the budget, exactly
    assert all(c["loss"] >= 0 for la in json_layers(cache) for c in la["choices"])  # ½ Σ F δ² >= 0
    # the layers' widths are what the refinement measured last as its best: the same search again agrees
    again = api.search(model, budget_bits=4.0, sensitivity="fisher", refine_measures=8, cache_dir=cache, **LLAVA)
    assert again["sensitivity"]["cached"] and again["layers"] == result["layers"]
    assert again["refinement"]["history"] == refined["history"]  # deterministic, also from the cache


def json_layers(cache: Path) -> list[dict]:
    import json

    return [la for f in sorted(cache.glob("*.json")) for la in json.loads(f.read_text())["layers"]]


def test_llava_kl_sensitivity_on_prompts_and_bad_options_are_one_line(tiny_llava: tuple[str, Path],
                                                                      tiny: tuple[str, Path]) -> None:
    path, cache = tiny_llava
    model = api.load(path)
    result = api.search(model, budget_bits=4.0, cache_dir=cache, **LLAVA)  # measured KL per layer and width
    assert result["sensitivity"]["probe"] == "PromptProbe" and result["expected"]["avg_bits"] <= 4.0
    assert "refinement" not in result
    with pytest.raises(LowbitError, match="accepted: an integer >= 0"):
        api.search(model, budget_bits=4.0, refine_measures=-1, cache_dir=cache, **LLAVA)
    with pytest.raises(LowbitError, match="sensitivity 'hessian'; accepted: kl, fisher"):
        api.search(model, budget_bits=4.0, sensitivity="hessian", cache_dir=cache, **LLAVA)
    with pytest.raises(LowbitError, match="needs a llava model"):
        api.search(tiny[0], budget_bits=3.0, probe_data="shapes-vqa", cache_dir=tiny[1], **CALIB)
    with pytest.raises(LowbitError, match="Fisher pass"):
        api.search(tiny[0], budget_bits=3.0, sensitivity="fisher", cache=False, measure=False, **CALIB)
