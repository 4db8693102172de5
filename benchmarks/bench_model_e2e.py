"""End-to-end image-embedding latency of lit-fashion: lowbit fp32 / w4 against ONNX Runtime fp32 / dynamic int8.

    .venv/bin/python benchmarks/bench_model_e2e.py [--threads 1,2] [--json benchmarks/results/bench_model.json]

Timed, interleaved in the same rounds (median and 10th percentile per batch size, 1 and 32):

* ``fp32``: the float model as loaded; ``fp32_folded``: the same after ``optimize_for_inference_`` (BatchNorm
  folded into the convs, static same-padding, in-place activations, depthwise convs on lowbit's kernel, float
  1x1 convs on lowbit's dense float kernel (the one the w4 tower's small 1x1 convs use on their dequantized
  weights), clamp activations fused into the kernel layers feeding them) — the honest float baseline with the
  same graph optimisations and kernels.
* ``w4_folded``: the ``w4`` preset's formats (what ``lowbit quantize lit-fashion w4`` stores: 1x1 convs 8-bit
  groups of 32 with zero points, k x k convs float, linears 4-bit g128, projector 8-bit), folded, on the CPU
  kernels; RTN stands in for the preset's GPTQ, which changes the codes but not the formats, so not the latency.
* ``w4all4_folded``: the formats this benchmark used before the preset changed (4-bit g128 on linears and 1x1
  convs, 8-bit other convs), for comparison with earlier results.
* ``ort_fp32``: the float model exported to ONNX (``lowbit.export``), pre-processed by ONNX Runtime's own
  ``quant_pre_process`` (shape inference, graph optimisation: BatchNorm folded), all graph optimisations on;
  ``ort_int8``: that graph quantized by ORT's own ``quantize_dynamic`` (int8 weights, dynamic uint8 activations:
  ConvInteger / MatMulInteger) — issue 19's baseline; ``ort_int8_static``: ORT's static QDQ quantization
  (per-channel int8 weights, uint8 activations calibrated on 64 training images; QLinearConv) — its fast int8.

Each timed call follows a 10 ms idle gap (a request reaching an idle process: caches and clocks partly cold,
which adds about the same 1-2 ms to every engine here); the targets are read from these. At batch 1 the engines
are also timed back to back (``back_to_back``: blocks of consecutive calls, blocks interleaved), a stream of
requests, recorded beside them (``*_b1_back_to_back``).

Every session and model runs on ``threads`` threads; ORT's spinning stops when ``run()`` returns (see
``workflows/bench_kernels._ort_session``). Cosines against the float model are recorded for every variant.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import lowbit
from lowbit.data import resolve_dataset
from lowbit.kernels import fast
from lowbit.kernels.inference import optimize_for_inference_
from lowbit.kernels.quant_linear import QuantLinear, set_backend
from lowbit.quant.recipe import Recipe, load_recipe
from lowbit.workflows.bench_kernels import _cpu_model
from lowbit.workflows.export.onnx import IMAGE_INPUT, ort_session

RESULTS = Path(__file__).resolve().parent / "results"
W4_ALL4_RTN = {
    "version": 1,
    "rules": [
        {"tower": "projector", "pattern": "*", "method": "rtn", "bits": 8},
        {"tower": "*", "pattern": "*", "kinds": ["conv"], "method": "rtn", "bits": 8},
        {"tower": "*", "pattern": "*", "kinds": ["linear", "conv1x1"], "method": "rtn", "bits": 4, "group_size": 128,
         "symmetric": True},
    ],
}
BASELINES = ("fp32", "fp32_folded", "ort_fp32", "ort_int8", "ort_int8_static")
# Batch-1 rounds: a call is 1-15 ms here and its median moved by +-0.04 (relative) between runs of 25 rounds on a
# shared VM; 100 rounds cost ~15 s per thread count
ROUNDS_B1 = 100


def quantized_folded(recipe: Recipe) -> tuple[Any, dict[str, int], Any]:
    """lit-fashion quantized with ``recipe`` and folded for inference on the CPU kernels; its module counts."""
    model = lowbit.load("lit-fashion").eval()
    lowbit.quantize(model, recipe, progress=False)
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    unfolded = copy.deepcopy(model)
    set_backend(unfolded, "reference")
    fold = optimize_for_inference_(model)
    set_backend(model, "cpu")
    return model, counts, (fold, unfolded)


class _Pixels:
    """ORT's CalibrationDataReader over preprocessed calibration batches."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches = iter(batches)

    def get_next(self) -> dict[str, Any] | None:
        batch = next(self.batches, None)
        return None if batch is None else {IMAGE_INPUT: batch.numpy()}


def ort_sessions(fp32: Any, work: Path, threads: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """ONNX Runtime sessions of the float image tower and of ORT's own int8 quantizations of it: dynamic (the
    issue's baseline) and static QDQ (per-channel int8 weights, uint8 activations calibrated on 64 training
    images: ORT's fast QLinearConv path, the stronger int8 baseline)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    lowbit.export(fp32, "onnx", work / "fp32-onnx")
    pre = work / "image-pre.onnx"
    # ORT's symbolic shape inference fails on the exported Expand of the preprocessing; ONNX's own shape
    # inference and ORT's graph optimisation (the part that folds BatchNorm before quantizing) still run
    quant_pre_process(str(work / "fp32-onnx" / "image.onnx"), str(pre), skip_symbolic_shape=True)
    dynamic, static = work / "image-int8-dynamic.onnx", work / "image-int8-static.onnx"
    quantize_dynamic(str(pre), str(dynamic), weight_type=QuantType.QInt8)
    calib = resolve_dataset("fashion-mnist", split="train", limit=64)
    batches = [fp32.preprocess(calib.images[i:i + 8]) for i in range(0, 64, 8)]
    quantize_static(str(pre), str(static), _Pixels(batches), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    info: dict[str, Any] = {
        "quantization": {"ort_int8": "quant_pre_process(skip_symbolic_shape=True) + quantize_dynamic(QInt8)",
                         "ort_int8_static": "quant_pre_process + quantize_static(QDQ, per_channel, QInt8 weights, "
                                            "QUInt8 activations, 64 Fashion-MNIST train images)"},
        "bytes": {"ort_fp32": pre.stat().st_size, "ort_int8": dynamic.stat().st_size,
                  "ort_int8_static": static.stat().st_size}}
    for name, path in (("ort_int8", dynamic), ("ort_int8_static", static)):
        ops: dict[str, int] = {}
        for node in onnx.load(str(path)).graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
        info[f"{name}_ops"] = ops
    return {"ort_fp32": ort_session(pre, threads), "ort_int8": ort_session(dynamic, threads),
            "ort_int8_static": ort_session(static, threads)}, info


def back_to_back(calls: dict[str, Callable[[], torch.Tensor]], blocks: int = 5, per_block: int = 20) -> dict[str, Any]:
    """Each engine's calls back to back (a stream of requests; caches and clocks warm): blocks of ``per_block``
    consecutive timed calls after two untimed ones, the engines' blocks interleaved; median and 10th percentile
    per engine and the ratios of w4_folded to the baselines."""
    times: dict[str, list[float]] = {n: [] for n in calls}
    for _ in range(blocks):
        for n, fn in calls.items():
            fn()
            fn()
            for _ in range(per_block):
                t = time.perf_counter()
                fn()
                times[n].append((time.perf_counter() - t) * 1e3)
    out: dict[str, Any] = {}
    for n, v in times.items():
        v.sort()
        out[f"{n}_b1_back_to_back"] = {"median_ms": round(statistics.median(v), 3), "p10_ms": round(v[len(v) // 10], 3),
                                       "calls": len(v)}
    for base in BASELINES:
        out[f"ratio_w4_folded_vs_{base}_b1_back_to_back_median_ms"] = round(
            out["w4_folded_b1_back_to_back"]["median_ms"] / out[f"{base}_b1_back_to_back"]["median_ms"], 3)
    return out


def run(threads: int, batch_sizes: tuple[int, ...] = (1, 32)) -> dict[str, Any]:
    import onnxruntime as ort

    torch.set_num_threads(threads)
    data = resolve_dataset("fashion-mnist", split="test", limit=32)
    fp32 = lowbit.load("lit-fashion").eval()
    fp32_folded = copy.deepcopy(fp32)
    folds = {"fp32_folded": optimize_for_inference_(fp32_folded)}
    w4, counts, (folds["w4_folded"], w4_unfolded) = quantized_folded(load_recipe("w4").with_method("rtn"))
    w4all4, _, (folds["w4all4_folded"], _) = quantized_folded(Recipe.from_dict(W4_ALL4_RTN, name="w4-all4-rtn"))
    models = {"fp32": fp32, "fp32_folded": fp32_folded, "w4_folded": w4, "w4all4_folded": w4all4}
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sessions, ort_info = ort_sessions(fp32, Path(tmp), threads)
        for b in batch_sizes:
            pixels = fp32.preprocess([data.images[i % len(data.images)] for i in range(b)])
            calls: dict[str, Callable[[], torch.Tensor]] = {
                **{n: (lambda m=m, p=pixels: m.encode_image(p)) for n, m in models.items()},
                **{n: (lambda s=s, p=pixels: torch.from_numpy(s.run(None, {IMAGE_INPUT: p.numpy()})[0]))
                   for n, s in sessions.items()}}
            times: dict[str, list[float]] = {n: [] for n in calls}
            with torch.inference_mode():
                reference = fp32.encode_image(pixels)
                for n, fn in calls.items():
                    out = fn()
                    results[f"min_cosine_{n}_vs_fp32_b{b}"] = round(
                        torch.nn.functional.cosine_similarity(out.double(), reference.double(), dim=-1)
                        .min().item(), 6)
                results[f"min_cosine_w4_folded_vs_w4_reference_b{b}"] = round(
                    torch.nn.functional.cosine_similarity(calls["w4_folded"]().double(),
                                                          w4_unfolded.encode_image(pixels).double(), dim=-1)
                    .min().item(), 6)
                for _ in range(ROUNDS_B1 if b == 1 else 6):
                    for n, fn in calls.items():
                        time.sleep(0.01)
                        t = time.perf_counter()
                        fn()
                        times[n].append((time.perf_counter() - t) * 1e3)
                if b == 1:
                    results.update(back_to_back(calls))
            for n, v in times.items():
                v.sort()
                results[f"{n}_b{b}"] = {"median_ms": round(statistics.median(v), 3),
                                        "p10_ms": round(v[len(v) // 10], 3), "rounds": len(v)}
            for n in times:
                for base in BASELINES:
                    if base == n:
                        continue
                    for stat in ("median_ms", "p10_ms"):
                        results[f"ratio_{n}_vs_{base}_b{b}_{stat}"] = round(
                            results[f"{n}_b{b}"][stat] / results[f"{base}_b{b}"][stat], 3)
    ratio = "ratio_w4_folded_vs_{}_b{}_median_ms"
    return {"model": "lit-fashion", "image tower": "encode_image (preprocessed pixels in, embedding out)",
            "threads": threads, "isa": fast.current_isa(), "cpu": _cpu_model(), "onnxruntime": ort.__version__,
            "load_avg": [round(x, 2) for x in os.getloadavg()], "date": time.strftime("%Y-%m-%d %H:%M"),
            "quant_modules_w4": counts, "ort": ort_info,
            "optimized": {n: {"batchnorms_folded": r.batchnorm.folded, "static_padding": r.static_padding,
                              "inplace_activations": r.inplace_activations} for n, r in folds.items()},
            "targets": {"w4 <= 0.8 x ORT dynamic int8": {f"b{b}": results[ratio.format("ort_int8", b)] <= 0.8
                                                           for b in batch_sizes},
                        "w4 <= 0.6 x lowbit fp32 folded at batch 1": results[ratio.format("fp32_folded", 1)] <= 0.6},
            "results": results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1", help="comma-separated thread counts, one run each (e.g. 1,2)")
    p.add_argument("--json", type=Path, default=RESULTS / "bench_model.json")
    args = p.parse_args()
    runs = [run(int(t)) for t in args.threads.split(",")]
    out = runs[0] if len(runs) == 1 else {"runs": runs}
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(args.json)
    for r in runs:
        print(r["threads"], "threads", json.dumps(r["targets"]),
              {k: v["median_ms"] for k, v in r["results"].items() if isinstance(v, dict)})


if __name__ == "__main__":
    main()
