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
