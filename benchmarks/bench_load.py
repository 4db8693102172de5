"""Load time and peak memory of packed checkpoints (loaded in place) vs their float models.

    .venv/bin/python benchmarks/bench_load.py [--models lit-fashion,llava-fashion-hd] [--json results/load.json]

For each model, the float model is quantized with the ``w4`` preset's formats (every rule RTN: load cost
depends on the stored formats, not on how the codes were chosen) and saved in a temporary directory (each run
saves afresh: a checkpoint kept from an older run would measure an older format).
Then, for the packed directory and for the float model (its built-in load), a FRESH subprocess imports
everything first, calls ``lowbit.load`` once and reports ``model.lowbit_load``: seconds and the peak RSS
increase over the RSS before the call (the process's high-water mark, so only a fresh process measures one
load). The packed row compares the increase with the whole directory's size on disk (target for
``llava-fashion-hd``: at most 1.3x); the float row with its state dict's bytes. CPU model and load average are
recorded: load times on a shared machine move with the load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 2**20

# Run in the child before measuring: every import a load needs (lazy transformers modules included).
_CHILD = r"""
import json, sys
import torch, transformers, accelerate, safetensors.torch, efficientnet_lite_pytorch  # noqa: F401
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, BertModel,  # noqa: F401
                          GenerationConfig, LlamaForCausalLM)
import lowbit
from lowbit.kernels import fast
import lowbit.models.llava_generate  # noqa: F401
fast.is_available()  # builds / loads the CPU kernels' extension now, not inside the measurement
model = lowbit.load(sys.argv[1])
seen, state_bytes = set(), 0
for t in model.state_dict().values():
    if t.untyped_storage().data_ptr() not in seen:
        seen.add(t.untyped_storage().data_ptr())
        state_bytes += t.numel() * t.element_size()
print(json.dumps({**model.lowbit_load, "state_mib": state_bytes / 2**20}))
"""

_PREPARE = r"""
import sys
from dataclasses import replace
import lowbit
from lowbit.quant.recipe import Recipe, load_recipe
w4 = load_recipe("w4")
recipe = Recipe(tuple(replace(r, method="rtn", options={}) if r.spec is not None else r for r in w4.rules),
                name="w4-rtn", float_dtype=w4.float_dtype)
model = lowbit.load(sys.argv[1])
report = lowbit.quantize(model, recipe, progress=False)
lowbit.save(model, sys.argv[2], report=report)
"""


def _python(code: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        raise SystemExit(f"child failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    lines = proc.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def dir_mib(path: Path) -> float:
    """Every file of a directory, in MiB."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / MiB


def measure(name: str, work: Path) -> list[dict[str, Any]]:
    """The float and the packed load of ``name``, each in a fresh process."""
    ckpt = work / f"{name}-w4"
    _python(_PREPARE, name, str(ckpt))
    rows = []
    for kind, target in (("float", name), ("packed-w4", str(ckpt))):
        load = json.loads(_python(_CHILD, target))
        row = {"model": name, "kind": kind, "seconds": load["seconds"], "rss_before_mib": load["rss_before_mib"],
               "peak_increase_mib": load["peak_increase_mib"], "state_mib": round(load["state_mib"], 1)}
        if kind != "float":
            row["file_mib"] = round(dir_mib(ckpt), 1)
            row["increase_per_file_byte"] = round(load["peak_increase_mib"] / row["file_mib"], 3)
        else:
            row["increase_per_state_byte"] = round(load["peak_increase_mib"] / load["state_mib"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    from lowbit.eval.env import environment

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lit-fashion,llava-fashion-hd")
    parser.add_argument("--json", type=Path, default=RESULTS / "load.json")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-load-") as work:
        rows = [row for name in args.models.split(",") for row in measure(name, Path(work))]
    result = {"rows": rows, "env": environment(), "load_avg_1min": [round(load_before, 2),
                                                                      round(os.getloadavg()[0], 2)],
              "date": time.strftime("%Y-%m-%d %H:%M"), "target": "llava-fashion-hd packed: increase <= 1.3x file"}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
