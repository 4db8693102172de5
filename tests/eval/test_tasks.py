"""Task registry and evaluate(): JSON shape, dataset resolution, fidelity, errors."""

from __future__ import annotations

import json

import pytest

import lowbit.data
from lowbit.errors import LowbitError
from lowbit.eval import TASKS, evaluate

ENV_KEYS = {"torch", "lowbit", "python", "platform", "cpu", "threads", "time"}


def test_registry_names() -> None:
    assert set(TASKS.names()) >= {"fashion-mnist", "fashion-mnist-retrieval", "shapes", "zeroshot", "retrieval"}


def test_unknown_task_names_valid_ones(fake_model, toy_set) -> None:
    with pytest.raises(LowbitError) as err:
        evaluate(fake_model, "imagenet", data=toy_set(4))
    msg = str(err.value)
    assert "unknown task 'imagenet'" in msg and "fashion-mnist" in msg and "retrieval" in msg
    assert "\n" not in msg


def test_evaluate_json_shape(fake_model, toy_set) -> None:
    fake_model.train()
    r = evaluate(fake_model, "zeroshot", data=toy_set(12), limit=10, progress=False)
    assert fake_model.training  # restored
    decoded = json.loads(json.dumps(r))
    assert set(decoded) >= {"model", "task", "metrics", "footprint", "data", "env"}
    assert "fidelity" not in decoded
    assert decoded["model"] == "fake" and decoded["task"] == "zeroshot"
    assert 0.0 <= decoded["metrics"]["top1"] <= 1.0 and decoded["metrics"]["n"] == 10
    assert decoded["data"] == {"name": "colours", "n": 10, "skipped": 0, "split": "test"}
    assert decoded["footprint"]["weight_bytes"] == 16388 + 128
    assert decoded["footprint"]["image_ms_b32"] > 0
    assert set(decoded["env"]) >= ENV_KEYS


def test_retrieval_task_with_reference(fake_model, toy_set) -> None:
    r = evaluate(fake_model, "retrieval", data=toy_set(8), reference=fake_model, footprint=False, progress=False)
    assert "footprint" not in r
    assert {"i2t_r1", "t2i_r1", "i2t_r10"} <= set(r["metrics"]) and "top1" not in r["metrics"]
    assert r["fidelity"]["agreement"] == 1.0 and r["fidelity"]["reference_model"] == "fake"
    assert r["fidelity"]["basis"] == "retrieval"
    json.dumps(r)


def test_oracle_top1_via_evaluate(oracle, id_set) -> None:
    data = id_set([2, 0, 1, 1, 2], ["x", "y", "z"])
    r = evaluate(oracle(data), "zeroshot", data=data, footprint=False, progress=False)
    assert r["metrics"]["top1"] == 1.0 and r["model"] == "oracle"


def test_builtin_tasks_resolve_their_dataset(monkeypatch, fake_model, toy_set) -> None:
    calls = []

    def fake_resolve(spec, split="test", limit=None):
        calls.append((spec, split, limit))
        labelled = spec == "fashion-mnist"
        return toy_set(20, labelled=labelled, name=spec).subset(limit)

    monkeypatch.setattr(lowbit.data, "resolve_dataset", fake_resolve, raising=False)
    r = evaluate(fake_model, "fashion-mnist", limit=7, footprint=False, progress=False)
    assert calls[-1] == ("fashion-mnist", "test", 7)
    assert r["metrics"]["n"] == 7 and "top1" in r["metrics"] and r["data"]["name"] == "fashion-mnist"

    r = evaluate(fake_model, "fashion-mnist-retrieval", limit=6, footprint=False, progress=False)
    assert "i2t_r1" in r["metrics"] and r["metrics"]["n"] == 6

    r = evaluate(fake_model, "shapes", footprint=False, progress=False)  # unlabelled: retrieval only
    assert calls[-1] == ("shapes", "test", None)
    assert "t2i_r1" in r["metrics"] and "top1" not in r["metrics"]

    r = evaluate(fake_model, "retrieval", data="some/folder", footprint=False, progress=False)
    assert calls[-1] == ("some/folder", "test", None)


def test_shapes_with_labels_reports_both(monkeypatch, fake_model, toy_set) -> None:
    monkeypatch.setattr(lowbit.data, "resolve_dataset", lambda spec, split="test", limit=None: toy_set(8),
                        raising=False)
    r = evaluate(fake_model, "shapes", reference=fake_model, footprint=False, progress=False)
    assert {"top1", "top5", "i2t_r1", "t2i_r1"} <= set(r["metrics"])
    assert r["fidelity"]["basis"] == "zeroshot"


def test_input_errors(fake_model, toy_set) -> None:
    with pytest.raises(LowbitError, match="needs data="):
        evaluate(fake_model, "zeroshot")
    with pytest.raises(LowbitError, match="always uses"):
        evaluate(fake_model, "fashion-mnist", data="elsewhere")
    with pytest.raises(LowbitError, match="limit"):
        evaluate(fake_model, "zeroshot", data=toy_set(4), limit=0)
    with pytest.raises(LowbitError, match="needs labels"):
        evaluate(fake_model, "zeroshot", data=toy_set(4, labelled=False), progress=False)


def test_reference_result_is_reused(fake_model, toy_set) -> None:
    from tests.eval.conftest import FakeEncoder

    data = toy_set(8)
    ref = evaluate(fake_model, "retrieval", data=data, footprint=False, progress=False)
    other = FakeEncoder(seed=1, name="other")
    by_model = evaluate(other, "retrieval", data=data, reference=fake_model, footprint=False, progress=False)
    by_result = evaluate(other, "retrieval", data=data, reference=ref, footprint=False, progress=False)
    assert by_result["fidelity"] == by_model["fidelity"]
    assert by_result["fidelity"]["reference_model"] == "fake"
    assert by_result["fidelity"]["agreement"] < 1.0
    json.dumps(by_result)
