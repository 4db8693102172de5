"""Per-layer time of lit-fashion's 16 depthwise convs: torch (the module as loaded) vs lowbit's depthwise kernel.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_depthwise.py [--threads 1] [--batch 1]
        [--json benchmarks/results/depthwise.json]

Each conv is timed on the very input it receives inside the fp32 image tower (recorded with forward
pre-hooks on real Fashion-MNIST images, in the memory format the tower produces), once through its own
forward (efficientnet's ``Conv2dDynamicSamePadding``: ``F.pad`` for the TF-"same" padding, then mkldnn) and
once through a copy re-classed by ``depthwise_kernels_``. Interleaved rounds (``lowbit.workflows.bench_kernels``),
medians; the outputs are compared too (max relative difference).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lowbit
from lowbit.data import resolve_dataset
from lowbit.kernels import fast
from lowbit.kernels.depthwise import depthwise_kernels_, is_depthwise
from lowbit.workflows.bench_kernels import _cpu_model, interleaved_times

RESULTS = Path(__file__).resolve().parent / "results"


def run(threads: int, batch: int, repeats: int = 30) -> dict[str, Any]:
    torch.set_num_threads(threads)
    model = lowbit.load("lit-fashion").eval()
    data = resolve_dataset("fashion-mnist", split="test", limit=batch)
    pixels = model.preprocess([data.images[i % len(data.images)] for i in range(batch)])
    convs = [(name, m) for name, m in model.vision.named_modules() if is_depthwise(m)]
    inputs: dict[str, torch.Tensor] = {}

    def record(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            inputs.setdefault(name, args[0].clone())  # clone keeps the memory format
        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in convs]
    with torch.inference_mode():
        model.encode_image(pixels)
    for h in hooks:
        h.remove()
    rows = []
    with torch.inference_mode():
        for name, conv in convs:
            x = inputs[name]
            kernel_conv = copy.deepcopy(conv)
            depthwise_kernels_(nn.Sequential(kernel_conv))
            calls = {"torch": lambda c=conv, x=x: c(x), "lowbit": lambda c=kernel_conv, x=x: c(x)}
            times = interleaved_times(calls, repeats, budget_s=5.0, gap_s=0.002)
            med = {k: statistics.median(v) for k, v in times.items()}
            ref, out = conv(x), kernel_conv(x)
            rows.append({
                "layer": name, "input": list(x.shape), "channels_last_input": x.is_contiguous(
                    memory_format=torch.channels_last) and not x.is_contiguous(),
                "kernel": list(conv.kernel_size), "stride": list(conv.stride),
                "torch_us": round(med["torch"] * 1e3, 1), "lowbit_us": round(med["lowbit"] * 1e3, 1),
                "speedup": round(med["torch"] / med["lowbit"], 2),
                "max_rel_diff": float(((out - ref).abs().max() / ref.abs().max()).item()),
            })
    total_t, total_l = sum(r["torch_us"] for r in rows), sum(r["lowbit_us"] for r in rows)
    return {"model": "lit-fashion (fp32 image tower)", "batch": batch, "threads": threads, "isa": fast.current_isa(),
            "cpu": _cpu_model(), "load_avg": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d %H:%M"),
            "total_torch_us": round(total_t, 1), "total_lowbit_us": round(total_l, 1),
            "total_speedup": round(total_t / total_l, 2), "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--json", type=Path, default=RESULTS / "depthwise.json")
    args = p.parse_args()
    out = run(args.threads, args.batch)
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(args.json)
    print("| layer | input | k | s | torch us | lowbit us | x |")
    print("|---|---|---|---|---:|---:|---:|")
    for r in out["rows"]:
        print(f"| {r['layer']} | {r['input']} | {r['kernel'][0]} | {r['stride'][0]} | {r['torch_us']} | "
              f"{r['lowbit_us']} | {r['speedup']} |")
    print(f"total: torch {out['total_torch_us']} us, lowbit {out['total_lowbit_us']} us ({out['total_speedup']}x)")


if __name__ == "__main__":
    main()
