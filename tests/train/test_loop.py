"""The shared training loop: schedule, optimisation, checkpoints, exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.train import TrainConfig, index_batches, lr_at, step_indices, train
from lowbit.train.state import latest_checkpoint, load_checkpoint

N = 64


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 6, generator=g)
    y = x @ torch.randn(6, 1, generator=g) + 0.1
    return x, y


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _loss(model: nn.Module, batch):
    x, y = batch
    return {"loss": nn.functional.mse_loss(model(x), y)}


def _batches(batch_size: int = 8):
    x, y = _data()
    return index_batches(N, batch_size, seed=3, collate=lambda idx, step: (x[idx], y[idx]))


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(steps=12, lr=1e-2, warmup_steps=2, batch_size=8, log_every=2, ckpt_every=4,
                out_dir=str(tmp_path), progress=False)
    return TrainConfig(**{**base, **kw})


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # halfway through the cosine: mean of lr and floor
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_step_indices_cover_each_sample_once_per_epoch_and_split_by_rank():
    n, batch = 12, 4
    per_epoch = np.concatenate([step_indices(n, batch, s, seed=1) for s in range(3)])
    assert sorted(per_epoch.tolist()) == list(range(n))
    for step in range(5):
        whole = step_indices(n, batch, step, seed=1)
        halves = [step_indices(n, batch, step, seed=1, rank=r, world=2) for r in range(2)]
        assert np.concatenate(halves).tolist() == whole.tolist()
    with pytest.raises(LowbitError, match="multiple of the number of processes"):
        step_indices(n, 5, 0, seed=1, rank=0, world=2)


def test_train_reduces_loss_and_writes_log_and_checkpoints(tmp_path):
    model = _Net()
    state = train(model, _loss, _batches(), _cfg(tmp_path, steps=40, ckpt_every=10, lr=3e-2, weight_decay=0.0))
    losses = [h["loss"] for h in state.history if "loss" in h]
    assert state.step == 40 and losses[-1] < 0.5 * losses[0]
    lines = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(2, 41, 2))
    assert all(x["samples_per_s"] > 0 for x in lines)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step-00000030", "step-00000040"]  # keep_checkpoints=2 prunes older ones
    ckpt = load_checkpoint(latest_checkpoint(tmp_path))
    assert ckpt.step == 40 and ckpt.state["data_position"] == {"step": 40, "samples": 320}
    assert torch.equal(ckpt.model["body.0.weight"], model.body[0].weight)


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    straight = _Net()
    train(straight, _loss, _batches(), _cfg(tmp_path / "a"))

    calls = {"n": 0}

    def crashing_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 7:  # after the step-4 checkpoint, before step 8's
            raise KeyboardInterrupt
        return _loss(model, batch)

    with pytest.raises(KeyboardInterrupt):
        train(_Net(), crashing_loss, _batches(), _cfg(tmp_path / "b"))
    assert latest_checkpoint(tmp_path / "b").name == "step-00000004"
    resumed = _Net()  # fresh weights: everything must come from the checkpoint
    state = train(resumed, _loss, _batches(), _cfg(tmp_path / "b"))
    assert state.resumed_from == 4 and state.step == 12
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)  # same data order, schedule, dropout masks and Adam moments
    log_b = (tmp_path / "b" / "train_log.jsonl").read_text()
    log_a = (tmp_path / "a" / "train_log.jsonl").read_text()
    strip = [{k: v for k, v in json.loads(x).items() if k != "samples_per_s"} for x in log_a.splitlines()]
    assert strip == [{k: v for k, v in json.loads(x).items() if k != "samples_per_s"} for x in log_b.splitlines()]


def test_finished_run_returns_at_once_and_batch_change_is_refused(tmp_path):
    train(_Net(), _loss, _batches(), _cfg(tmp_path, steps=4))
    state = train(_Net(), lambda m, b: pytest.fail("must not train again"), _batches(), _cfg(tmp_path, steps=4))
    assert state.step == 4 and state.resumed_from == 4
    with pytest.raises(LowbitError, match="global batch size 8"):
        train(_Net(), _loss, _batches(16), _cfg(tmp_path, steps=8, batch_size=16))


def test_eval_fn_and_on_checkpoint_are_called(tmp_path):
    seen: list = []
    train(_Net(), _loss, _batches(), _cfg(tmp_path, steps=6, eval_every=3, ckpt_every=3),
          eval_fn=lambda m, step: {"training": m.training, "step": step},
          on_checkpoint=lambda m, step, path: seen.append((step, path.name)))
    evals = [json.loads(x)["eval"] for x in (tmp_path / "train_log.jsonl").read_text().splitlines() if "eval" in x]
    assert evals == [{"training": False, "step": 3}, {"training": False, "step": 6}]
    assert seen == [(3, "step-00000003"), (6, "step-00000006")]


def test_checkpoint_loads_without_pickle(tmp_path):
    train(_Net(), _loss, _batches(), _cfg(tmp_path, steps=2, ckpt_every=2))
    files = sorted(p.name for p in latest_checkpoint(tmp_path).iterdir())
    assert files == ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]


def test_bad_config_is_a_lowbit_error(tmp_path):
    with pytest.raises(LowbitError, match="steps"):
        train(_Net(), _loss, _batches(), _cfg(tmp_path, steps=0))


@pytest.mark.parametrize("damage", ["truncated-tensors", "garbled-state"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    straight = _Net()
    train(straight, _loss, _batches(), _cfg(tmp_path / "a"))
    calls = {"n": 0}

    def crashing_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 11:  # after the step-8 checkpoint
            raise KeyboardInterrupt
        return _loss(model, batch)

    with pytest.raises(KeyboardInterrupt):
        train(_Net(), crashing_loss, _batches(), _cfg(tmp_path / "b"))
    newest = latest_checkpoint(tmp_path / "b")
    assert newest.name == "step-00000008"
    if damage == "truncated-tensors":
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    else:
        (newest / "state.json").write_text("{garbled")
    resumed = _Net()
    with pytest.warns(UserWarning, match="step-00000008 is damaged"):
        state = train(resumed, _loss, _batches(), _cfg(tmp_path / "b"))
    assert state.resumed_from == 4 and state.step == 12
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)  # the same result as an uninterrupted run
