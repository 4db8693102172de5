"""A 2-process torchrun (gloo) training run ends with the weights of a 1-process run with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

VENV_BIN = Path(sys.executable).parent
ARGS = ["train", "clip", "--data", "shapes", "--limit", "16", "--steps", "3", "--batch-size", "8",
        "--warmup-steps", "1", "--lr", "1e-3", "--log-every", "1", "--ckpt-every", "3", "--eval-task", "",
        "--no-progress", "--seed", "3"]
TOLERANCE = 2e-5  # max |w_2proc - w_1proc| after 3 AdamW steps of lr 1e-3: float32 summation order only


def _run(cmd: list[str], out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([*cmd, *ARGS, "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path):
    torchrun = VENV_BIN / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed")
    _run([sys.executable, "-m", "lowbit.cli.train"], tmp_path / "one")
    _run([str(torchrun), "--standalone", "--nnodes", "1", "--nproc_per_node", "2", "-m", "lowbit.cli.train"],
         tmp_path / "two")
    one = load_file(str(tmp_path / "one" / "checkpoints" / "step-00000003" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "checkpoints" / "step-00000003" / "model.safetensors"))
    assert one.keys() == two.keys()
    diff = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert diff <= TOLERANCE, diff
    state = json.loads((tmp_path / "two" / "checkpoints" / "step-00000003" / "state.json").read_text())
    assert state["world"] == 2 and state["data_position"] == {"step": 3, "samples": 24}
    losses = [[json.loads(x)["loss"] for x in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]
              for run in ("one", "two")]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-5)  # logged = global-batch loss
    assert losses[0][0] != losses[0][-1]  # it did train
