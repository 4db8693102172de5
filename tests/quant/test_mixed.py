"""The mixed-precision knapsack (lowbit.quant.mixed): exact budgets, optimality, infeasible budgets."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.quant.methods import QuantContext, get_method
from lowbit.quant.mixed import Choice, InfeasibleBudget, SearchLayer, cheapest_cost, layer_nbytes, solve, summarize
from lowbit.quant.primitives import QuantSpec


def _layers(n: int, seed: int) -> list[SearchLayer]:
    rng = random.Random(seed)
    layers = []
    for i in range(n):
        params = rng.choice([96, 160, 512, 1024, 2400])
        loss = rng.uniform(0.5, 5.0)
        choices = [Choice(b, loss * 4.0 ** -b, float("nan"), layer_nbytes((params // 32, 32), QuantSpec(b, 32)),
                          ms=0.01 * b * params / 1000 + rng.uniform(0, 0.003)) for b in (2, 3, 4, 8)]
        layers.append(SearchLayer("t", f"l{i}", "linear", params, [params // 32, 32], [1, 32], choices))
    return layers


def _brute(layers: list[SearchLayer], metric: str, budget: float) -> float:
    best = float("inf")
    for pick in itertools.product(*[range(len(la.choices)) for la in layers]):
        if sum(la.cost(i, metric) for la, i in zip(layers, pick, strict=False)) <= budget:
            best = min(best, sum(la.choices[i].loss for la, i in zip(layers, pick, strict=False)))
    return best


@pytest.mark.parametrize("metric", ["bits", "bytes", "ms"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_solve_respects_the_budget_exactly_and_matches_brute_force(metric: str, seed: int) -> None:
    layers = _layers(6, seed)
    low = cheapest_cost(layers, metric)
    high = sum(max(la.cost(i, metric) for i in range(4)) for la in layers)
    for budget in [low + frac * (high - low) for frac in (0.0, 0.13, 0.4, 0.77)] + [high]:
        chosen = solve(layers, metric, budget)
        cost = sum(la.cost(i, metric) for la, i in zip(layers, chosen, strict=False))
        assert cost <= budget  # never over, not even by rounding
        loss = sum(la.choices[i].loss for la, i in zip(layers, chosen, strict=False))
        best = _brute(layers, metric, budget)
        assert loss <= best * 1.02 + 1e-12  # the DP over costs rounded up to 1/20000 of the spare budget: near-exact
        assert solve(layers, metric, budget) == chosen  # deterministic


def test_budget_bits_average_is_exact_at_three_bits() -> None:
    layers = _layers(12, 5)
    params = sum(la.params for la in layers)
    chosen = solve(layers, "bits", 3.0 * params)
    s = summarize(layers, chosen)
    assert s["avg_bits"] <= 3.0 and s["avg_bits"] > 2.9  # spends the budget (the greedy pass fills what is left)
    assert s["params"] == params and sum(s["params_by_width"].values()) == params


def test_infeasible_budget_names_the_smallest_feasible() -> None:
    layers = _layers(4, 0)
    low = cheapest_cost(layers, "bits")
    assert low == sum(2 * la.params for la in layers)
    with pytest.raises(InfeasibleBudget) as err:
        solve(layers, "bits", low - 1)
    assert err.value.smallest == low and "smallest feasible" in str(err.value) and "\n" not in str(err.value)
    assert solve(layers, "bits", low) == [0, 0, 0, 0]  # exactly the smallest: every layer at its narrowest
    with pytest.raises(LowbitError, match="accepted: bits, bytes, ms"):
        solve(layers, "joules", 1.0)


def test_layer_bytes_are_the_packed_weights_bytes() -> None:
    w = torch.randn(48, 100)
    for bits in (2, 3, 4, 8):
        for gs in (32, None):
            packed = get_method("rtn").quantize_weight(w, QuantSpec(bits, gs), QuantContext(), {}).packed
            assert layer_nbytes(w.shape, QuantSpec(bits, gs)) == packed.nbytes


# --- the measured refinement -------------------------------------------------------------------------------------
def _compounding(layers: list[SearchLayer]):
    """A measured loss the per-layer sensitivities get wrong: each layer's loss, times 1 + the number of layers
    below 4 bits (narrow layers compound)."""
    calls: list[list[int]] = []

    def measure(chosen: list[int]) -> float:
        calls.append(list(chosen))
        narrow = sum(1 for la, i in zip(layers, chosen, strict=True) if la.choices[i].bits < 4)
        return sum(la.choices[i].loss for la, i in zip(layers, chosen, strict=True)) * (1 + narrow)

    return measure, calls


def test_refine_keeps_the_budget_accepts_only_measured_gains_and_is_deterministic() -> None:
    from lowbit.quant.mixed import refine

    layers = _layers(10, 3)
    params = sum(la.params for la in layers)
    budget = 4.0 * params
    knapsack = solve(layers, "bits", budget)
    uniform = [2] * len(layers)  # every layer at 4 bits: exactly the budget
    measure, calls = _compounding(layers)
    best, record = refine(layers, [knapsack, uniform], "bits", budget, measure, max_measures=25)
    assert len(calls) == record["measures"] <= 25
    assert sum(la.cost(i, "bits") for la, i in zip(layers, best, strict=True)) <= budget  # never over
    assert all(sum(la.cost(i, "bits") for la, i in zip(layers, c, strict=True)) <= budget for c in calls)
    start = min(measure(knapsack), measure(uniform))
    assert record["start_loss"] == start and record["loss"] == measure(best) <= start
    accepted = [h["loss"] for h in record["history"] if h.get("accepted")]
    assert accepted == sorted(accepted, reverse=True) and len(set(accepted)) == len(accepted)  # each strictly lower
    assert all(h["loss"] >= record["loss"] for h in record["history"])
    again, record2 = refine(layers, [knapsack, uniform], "bits", budget, _compounding(layers)[0], max_measures=25)
    assert again == best and record2["history"] == record["history"]


def test_refine_from_uniform_trades_bits_where_the_measure_says_so() -> None:
    from lowbit.quant.mixed import refine

    def layer(name: str, s: float) -> SearchLayer:
        choices = [Choice(b, s * 4.0 ** -b, float("nan"), layer_nbytes((4, 32), QuantSpec(b, 32))) for b in (3, 4, 5)]
        return SearchLayer("t", name, "linear", 128, [4, 32], [1, 32], choices)

    layers = [layer("a", 10.0), layer("b", 0.1), layer("c", 0.2)]  # a: sensitive; b, c: not
    measure, _ = _compounding(layers)
    best, record = refine(layers, [[1, 1, 1]], "bits", 4.0 * 3 * 128, measure, max_measures=6)
    assert best == [2, 0, 1] and record["accepted"] == 1  # a widened, paid by the least sensitive, b; no more
    assert record["loss"] < record["start_loss"] == measure([1, 1, 1])


def test_refine_with_one_measurement_returns_the_better_start() -> None:
    from lowbit.quant.mixed import refine

    layers = _layers(6, 1)
    budget = 4.0 * sum(la.params for la in layers)
    knapsack, uniform = solve(layers, "bits", budget), [2] * len(layers)
    measure, _ = _compounding(layers)
    best, record = refine(layers, [knapsack, uniform], "bits", budget, measure, max_measures=2)
    assert record["measures"] == 2 and best == min((knapsack, uniform), key=measure)


# --- the prompt probe and its Fisher ----------------------------------------------------------------------------
def test_prompt_probe_fisher_predicts_the_measured_kl_of_small_perturbations(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from lowbit.quant.mixed import PromptProbe
    from tests.models.llava_tiny import write_tiny_lm

    lm = AutoModelForCausalLM.from_pretrained(write_tiny_lm(tmp_path / "lm")).eval()
    with torch.no_grad():
        lm.model.norm.weight.mul_(30)  # peaked next-token distributions, as a trained model's (random init: flat)
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(6, 9, lm.config.hidden_size, generator=gen)
    mask = torch.ones(6, 9, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    probe = PromptProbe(lm, embeds, mask, batch_size=4)
    assert abs(probe.loss("language")) < 1e-9  # the float model against itself
    for name in ("mlp.down_proj", "self_attn.v_proj"):
        layer = lm.model.layers[1].get_submodule(name)
        full, top = (probe.fisher([layer.weight], top_k=k)[0] for k in (lm.config.vocab_size, 4))
        assert full.shape == layer.weight.shape and bool((top <= full + 1e-15).all())  # top-k: part of the mass
        assert float(top.sum()) > 0.5 * float(full.sum())  # ... most of it, on peaked distributions
        original = layer.weight.detach().clone()
        measured = predicted = 0.0
        for _ in range(12):  # the diagonal leaves out cross terms, which average out over random perturbations
            delta = 0.2 * original.abs().mean() * torch.randn(original.shape, generator=gen)
            with torch.no_grad():
                layer.weight.add_(delta)
            measured += probe.loss("language")
            with torch.no_grad():
                layer.weight.copy_(original)
            predicted += 0.5 * float((full * delta.double() ** 2).sum())
        assert measured > 0 and 0.7 < predicted / measured < 1.4  # measured 0.93 and 1.18: the KL's Hessian


def test_prompt_probe_gradient_matches_finite_differences(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from lowbit.quant.mixed import PromptProbe
    from tests.models.llava_tiny import write_tiny_lm

    lm = AutoModelForCausalLM.from_pretrained(write_tiny_lm(tmp_path / "lm"), torch_dtype=torch.float64).eval()
    with torch.no_grad():
        lm.model.norm.weight.mul_(30)
    gen = torch.Generator().manual_seed(1)
    probe = PromptProbe(lm, torch.randn(5, 7, lm.config.hidden_size, generator=gen, dtype=torch.float64),
                        torch.ones(5, 7, dtype=torch.long), batch_size=2)
    layer = lm.model.layers[0].mlp.up_proj
    with torch.no_grad():  # away from the float model, where the gradient of the KL vanishes
        layer.weight.add_(1.5 * layer.weight.abs().mean() * torch.randn(layer.weight.shape, generator=gen,
                                                                        dtype=torch.float64))
    assert probe.loss("language") > 1e-5
    grad = probe.gradient([layer.weight])[0]
    direction = torch.randn(layer.weight.shape, generator=gen, dtype=torch.float64)
    eps = 1e-4
    with torch.no_grad():
        layer.weight.add_(eps * direction)
        up = probe.loss("language")
        layer.weight.sub_(2 * eps * direction)
        down = probe.loss("language")
    numeric = (up - down) / (2 * eps)
    assert abs(float((grad.double() * direction).sum()) - numeric) < 0.02 * abs(numeric)
