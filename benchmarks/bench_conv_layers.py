"""Per-layer time of lit-fashion's convs: torch (the module as loaded) vs the lowbit kernel that takes them over.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_conv_layers.py [--kind depthwise|pointwise|spatial]
        [--threads 1] [--batch 1] [--like-avx2-machine] [--no-row-limit] [--json benchmarks/results/KIND.json]

Kinds: ``depthwise`` (the 16 depthwise convs, ``lowbit.kernels.depthwise``), ``pointwise`` (the 32 float 1x1
convs on the dense float kernel, ``lowbit.kernels.pointwise``), ``spatial`` (the stem on im2col + that kernel,
``lowbit.kernels.conv_gemm``). Each conv is timed on the very input it receives inside the fp32 image tower
(recorded with forward pre-hooks on real Fashion-MNIST images, in the memory format the tower produces), once
through its own forward (efficientnet's ``Conv2dDynamicSamePadding``: ``F.pad`` for the TF-"same" padding, then
oneDNN) and once through a copy re-classed by the kind's transform. Interleaved rounds
(``lowbit.workflows.bench_kernels``), medians; the outputs are compared too (max relative difference).

``--like-avx2-machine``: the kernels on their AVX2 path and torch limited to AVX2 (``avx2_env``): the comparison
an AVX2-only CPU would see. ``--no-row-limit``: float convs take the kernel whatever their size (past
``pointwise.POINTWISE_MAX_MACS`` they otherwise keep torch's conv): the measurement behind that limit.
"""

from __future__ import annotations

from avx2_env import restart_like_avx2_machine_if_asked

restart_like_avx2_machine_if_asked()  # before torch is imported

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import lowbit  # noqa: E402
from lowbit.data import resolve_dataset  # noqa: E402
from lowbit.kernels import conv_gemm, fast, pointwise  # noqa: E402
from lowbit.kernels.depthwise import depthwise_kernels_, is_depthwise  # noqa: E402
from lowbit.workflows.bench_kernels import _cpu_model, interleaved_times  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# kind -> (which convs, the transform that puts one on its kernel)
KINDS: dict[str, tuple[Callable[[nn.Module], bool], Callable[[nn.Module], int]]] = {
    "depthwise": (is_depthwise, depthwise_kernels_),
    "pointwise": (pointwise.is_pointwise, pointwise.pointwise_kernels_),
    "spatial": (conv_gemm.is_gemm_conv, conv_gemm.conv_gemm_kernels_),
}


def run(kind: str, threads: int, batch: int, repeats: int = 30) -> dict[str, Any]:
    torch.set_num_threads(threads)
    eligible, transform = KINDS[kind]
    model = lowbit.load("lit-fashion").eval()
    data = resolve_dataset("fashion-mnist", split="test", limit=batch)
    pixels = model.preprocess([data.images[i % len(data.images)] for i in range(batch)])
    convs = [(name, m) for name, m in model.vision.named_modules() if eligible(m)]
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
            assert transform(nn.Sequential(kernel_conv)) == 1
            calls = {"torch": lambda c=conv, x=x: c(x), "lowbit": lambda c=kernel_conv, x=x: c(x)}
            times = interleaved_times(calls, repeats, budget_s=5.0, gap_s=0.002)
            med = {k: statistics.median(v) for k, v in times.items()}
            ref, out = conv(x), kernel_conv(x)
            rows.append({
                "layer": name, "input": list(x.shape), "channels_last_input": x.is_contiguous(
                    memory_format=torch.channels_last) and not x.is_contiguous(),
                "kernel": list(conv.kernel_size), "stride": list(conv.stride), "out_channels": conv.out_channels,
                "torch_us": round(med["torch"] * 1e3, 1), "lowbit_us": round(med["lowbit"] * 1e3, 1),
                "speedup": round(med["torch"] / med["lowbit"], 2),
                "max_rel_diff": float(((out - ref).abs().max() / ref.abs().max()).item()),
            })
    total_t, total_l = sum(r["torch_us"] for r in rows), sum(r["lowbit_us"] for r in rows)
    return {"model": "lit-fashion (fp32 image tower)", "kind": kind, "batch": batch,
            "torch_isa_limit": os.environ.get("ONEDNN_MAX_CPU_ISA"),
            "pointwise_max_macs": pointwise.POINTWISE_MAX_MACS, "threads": threads, "isa": fast.current_isa(),
            "cpu": _cpu_model(), "load_avg": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d %H:%M"),
            "total_torch_us": round(total_t, 1), "total_lowbit_us": round(total_l, 1),
            "total_speedup": round(total_t / total_l, 2), "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=sorted(KINDS), default="depthwise")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--like-avx2-machine", action="store_true", help="kernels and torch both on AVX2 (avx2_env)")
    p.add_argument("--no-row-limit", action="store_true", help="float convs on the kernel at any size")
    p.add_argument("--json", type=Path, help="default: results/KIND[-bBATCH][-avx2].json")
    args = p.parse_args()
    if args.like_avx2_machine:
        fast.set_isa("avx2")
    if args.no_row_limit:
        pointwise.POINTWISE_MAX_MACS = 1 << 62  # read per call by conv_gemm too
    suffix = ("" if args.batch == 1 else f"-b{args.batch}") + ("-avx2" if args.like_avx2_machine else "")
    args.json = args.json or RESULTS / f"{args.kind}{suffix}.json"
    out = run(args.kind, args.threads, args.batch)
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
