"""The CLI: bad input gives one line and exit code 2; the verbs reach the API."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lowbit.cli", *args], capture_output=True, text=True, timeout=600)


def test_unknown_task_fails_cleanly():
    proc = run("eval", "lit-fashion", "--task", "nope", "--no-footprint")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "unknown task 'nope'" in lines[0] and "fashion-mnist" in lines[0]


def test_unknown_model_fails_cleanly():
    proc = run("eval", "no-such-model", "--task", "fashion-mnist")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "unknown model 'no-such-model'" in proc.stderr and "lit-fashion" in proc.stderr


def test_missing_file_fails_cleanly(tmp_path):
    proc = run("eval", "lit-fashion", "--task", "zeroshot", "--data", str(tmp_path / "missing"), "--no-footprint")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr


def test_bad_act_block_fails_cleanly():
    proc = run("eval", "lit-fashion", "--task", "fashion-mnist", "--act-block", "48", "--no-footprint")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "act_block 48 is not accepted" in lines[0] and "'row'" in lines[0], proc.stderr


def test_bad_arguments_are_one_line():
    proc = run("eval")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr


def test_models_lists_the_builtin():
    proc = run("models")
    assert proc.returncode == 0
    assert "lit-fashion" in proc.stdout


@pytest.mark.slow
def test_eval_writes_json(tmp_path):
    out = tmp_path / "r.json"
    proc = run("eval", "lit-fashion", "--task", "fashion-mnist", "--limit", "200", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert {"model", "task", "metrics", "footprint", "env"} <= set(result)
    assert result["data"]["n"] == 200
    assert result["metrics"]["top1"] > 0.7
    assert result["footprint"]["latency_ms_per_image_b1"] > 0 if "latency_ms_per_image_b1" in result["footprint"] \
        else result["footprint"]


@pytest.mark.slow
def test_eval_optimize_keeps_the_accuracy(tmp_path):
    tops = []
    for extra in ((), ("--optimize",)):
        out = tmp_path / f"r{len(extra)}.json"
        proc = run("eval", "lit-fashion", "--task", "fashion-mnist", "--limit", "200", "--no-footprint",
                   "--json", str(out), *extra)
        assert proc.returncode == 0, proc.stderr
        tops.append(json.loads(out.read_text())["metrics"]["top1"])
    # BatchNorm folding, the depthwise kernel and fused activations change float32 rounding only
    assert tops[0] > 0.7 and abs(tops[1] - tops[0]) <= 0.005, tops
