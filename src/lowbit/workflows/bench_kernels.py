"""Benchmark of the fast low-bit kernels against float and int8 baselines, measured in the same run.

``run_kernel_bench`` times, for every (K, N) shape and batch M, each lowbit format (``lowbit.kernels.fast``,
on each requested instruction set) and the baselines below, interleaved round by round so that machine noise
hits all of them alike, and reports the median time per call:

* ``fp32``: ``torch.nn.functional.linear`` in float32;
* ``torch_dyn_int8``: ``torch.ao.quantization.quantize_dynamic`` on an ``nn.Linear`` (fbgemm);
* ``ort_fp32``: ONNX Runtime ``MatMul`` with a float32 initializer;
* ``ort_nbits4``: ONNX Runtime ``com.microsoft.MatMulNBits``, 4-bit, block 32, accuracy_level 4 (int8 compute);
* ``ort_dyn_int8``: ONNX Runtime dynamic int8 (``onnxruntime.quantization.quantize_dynamic`` on a MatMul).

ONNX Runtime sessions use ``intra_op_num_threads = threads``; torch uses ``torch.set_num_threads(threads)``.
The read bandwidth (a torch sum over a 512 MB tensor) gives each format's M = 1 floor: streamed bytes / bw.
Note that a layer timed in a loop keeps its weights in the last-level cache when they fit (32 MB here), so
small layers can beat the DRAM floor; the floor is what a whole model (weights >> cache) streams at.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lowbit.kernels import fast
from lowbit.kernels.formats import PackedWeight, num_groups, pack_codes
from lowbit.kernels.reference import reference_linear


@dataclass(frozen=True)
class FormatSpec:
    """A benchmarked weight format: bit width, group size (None = per-channel), symmetry, ternary codes, and the
    kernels' activation quantization blocks (``act_block``, ``quant_linear.set_act_block``; None: default)."""

    bits: int
    group_size: int | None
    symmetric: bool = True
    ternary: bool = False
    act_block: int | str | None = None


FORMATS: dict[str, FormatSpec] = {
    "int8": FormatSpec(8, None),
    "int4_g128": FormatSpec(4, 128),
    "int4_g32": FormatSpec(4, 32),
    "uint4_g128": FormatSpec(4, 128, symmetric=False),
    "int3_g128": FormatSpec(3, 128),
    "int2_g64": FormatSpec(2, 64),
    "ternary": FormatSpec(2, None, ternary=True),
    "binary": FormatSpec(1, None),
    # The same weights with one activation scale per row (the activation rounding of fast CPU runtimes: ONNX
    # Runtime's and fbgemm's dynamic int8 use one per tensor): more integer work per float conversion at large M.
    "int8_rowact": FormatSpec(8, None, act_block="row"),
    "int4_g128_rowact": FormatSpec(4, 128, act_block="row"),
}
BASELINES: tuple[str, ...] = ("fp32", "torch_dyn_int8", "ort_fp32", "ort_nbits4", "ort_dyn_int8")
DEFAULT_SHAPES: tuple[tuple[int, int], ...] = ((768, 768), (768, 3072), (3072, 768), (4096, 4096), (4096, 11008))
DEFAULT_MS: tuple[int, ...] = (1, 16, 197)


def make_format_weight(k: int, n: int, spec: FormatSpec, seed: int = 0) -> PackedWeight:
    """A random packed weight [N, K] of ``spec`` (uniform codes, small positive scales)."""
    g = torch.Generator().manual_seed(seed)
    gs = k if spec.group_size is None else spec.group_size
    lo = 1 if spec.ternary else 0
    codes = torch.randint(lo, 1 << spec.bits, (n, k), generator=g, dtype=torch.uint8)
    ng = num_groups(k, gs)
    scales = (torch.rand(n, ng, generator=g) * 0.02 + 0.002).to(torch.float16)
    zeros = None if spec.symmetric else torch.randint(0, 1 << spec.bits, (n, ng), generator=g, dtype=torch.uint8)
    return PackedWeight(pack_codes(codes, spec.bits), scales, zeros, spec.bits, gs, (n, k))


def measure_read_bandwidth(megabytes: int = 512, repeats: int = 10) -> float:
    """Read bandwidth in GB/s (1e9 bytes/s): median time of ``torch.sum`` over a float32 tensor."""
    x = torch.ones(megabytes * (1 << 20) // 4)
    x.sum()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(times) / 1e9


# --- baselines ---------------------------------------------------------------------------------------------
def _ort_session(model: Any, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT's workers spin inside run() (kept: its latency) and, by default, for ~30 ms after it, sharing the cores
    # with whatever runs next: measured here, lowbit int8 (M = 197, 4096^2) ran 35% slower right after an ORT
    # call, and one ORT session's spinning slowed the next (dynamic int8 at 768x3072: 5.1 -> 1.4 ms when stopped).
    # Stopping the spin when run() returns is fair to every library in an interleaved run, ORT included.
    so.add_session_config_entry("session.force_spinning_stop", "1")
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def _onnx_model(nodes: list[Any], k: int, n: int, initializers: list[Any]) -> Any:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes, "bench",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8  # onnx may stamp an IR version newer than the installed runtime reads
    return model


def _ort_matmul_fp32(w: np.ndarray, threads: int) -> Any:
    from onnx import helper, numpy_helper

    n, k = w.shape
    node = helper.make_node("MatMul", ["A", "B"], ["Y"])
    return _onnx_model([node], k, n, [numpy_helper.from_array(np.ascontiguousarray(w.T), "B")])


def _ort_nbits4(w: np.ndarray, threads: int, block: int = 32) -> Any:
    """MatMulNBits initializers built with numpy: symmetric 4-bit, block ``block``, default zero point 8."""
    from onnx import helper, numpy_helper

    n, k = w.shape
    nb = math.ceil(k / block)
    wp = np.zeros((n, nb * block), dtype=np.float32)
    wp[:, :k] = w
    blocks = wp.reshape(n, nb, block)
    scales = np.abs(blocks).max(-1) / 7.0
    scales[scales == 0] = 1.0
    q = np.clip(np.rint(blocks / scales[..., None]) + 8, 0, 15).astype(np.uint8)  # [N, nb, block]
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)  # element 2i low nibble, 2i+1 high
    node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=block, accuracy_level=4)
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales.astype(np.float32).reshape(-1), "S")]
    return _onnx_model([node], k, n, inits)


def _ort_dyn_int8(w: np.ndarray, threads: int) -> bytes:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        import onnx

        onnx.save(_ort_matmul_fp32(w, threads), str(src))
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        return dst.read_bytes()


def _baseline_callables(w: torch.Tensor, x: torch.Tensor, names: Sequence[str], threads: int
                        ) -> dict[str, Callable[[], Any]]:
    """Zero-argument callables computing x @ w^T with each baseline (setup cost paid here)."""
    out: dict[str, Callable[[], Any]] = {}
    xn = x.numpy()
    wn = w.numpy()
    for name in names:
        if name == "fp32":
            out[name] = lambda: F.linear(x, w)
        elif name == "torch_dyn_int8":
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            with torch.no_grad():
                lin.weight.copy_(w)
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.ao deprecation notices
                qlin = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear},
                                                              dtype=torch.qint8)
            out[name] = lambda q=qlin: q(x)
        else:
            build = {"ort_fp32": _ort_matmul_fp32, "ort_nbits4": _ort_nbits4, "ort_dyn_int8": _ort_dyn_int8}[name]
            sess = _ort_session(build(wn, threads), threads)
            out[name] = lambda s=sess: s.run(None, {"A": xn})[0]
    return out


# --- timing ------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def interleaved_times(calls: dict[str, Callable[[], Any]], repeats: int, budget_s: float,
                       batch_ms: float = 2.0, gap_s: float = 0.01) -> dict[str, list[float]]:
    """Per-call times (ms) of each callable, steady state, with machine noise shared fairly.

    Each round runs every callable once as a batch of back-to-back calls (sized to take ~``batch_ms``) and
    records the batch time / batch size. Before each timed batch, an idle gap of ``gap_s`` and two untimed
    calls absorb the hand-over from the previous callable's thread pool (OpenMP workers spinning after a torch
    op; ONNX Runtime's sessions stop theirs when ``run()`` returns, see ``_ort_session``) -- a cost of mixing
    runtimes in one process, not of either kernel. Rounds are repeated ``repeats`` times (at least 3, fewer if
    ``budget_s`` runs out).
    """
    batch: dict[str, int] = {}
    for name, fn in calls.items():  # warm-up, and the batch size from one timed call
        fn()
        t = time.perf_counter()
        fn()
        batch[name] = max(1, min(200, int(batch_ms / 1e3 / max(time.perf_counter() - t, 1e-7))))
    times: dict[str, list[float]] = {name: [] for name in calls}
    start = time.perf_counter()
    for r in range(repeats):
        for name, fn in calls.items():
            b = batch[name]
            time.sleep(gap_s)
            fn()
            fn()
            t = time.perf_counter()
            for _ in range(b):
                fn()
            times[name].append((time.perf_counter() - t) / b * 1e3)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return times


def _p10(v: list[float]) -> float:
    return float(np.percentile(v, 10))


def run_kernel_bench(
    shapes: Sequence[tuple[int, int]] = DEFAULT_SHAPES,
    ms: Sequence[int] = DEFAULT_MS,
    formats: Sequence[str] = tuple(FORMATS),
    repeats: int = 30,
    json_path: str | os.PathLike[str] | None = None,
    *,
    threads: int = 2,
    isas: Sequence[str] | None = None,
    baselines: Sequence[str] = BASELINES,
    budget_s: float = 20.0,
    log: Callable[[str], None] | None = print,
) -> list[dict[str, Any]]:
    """Time every lowbit format (per ISA) and baseline for each shape (K, N) and batch M.

    Args:
        shapes: (K, N) pairs: y [M, N] = x [M, K] @ W^T.
        ms: batch sizes (rows of x).
        formats: names from ``FORMATS``.
        repeats: timed calls per callable (interleaved rounds), fewer if ``budget_s`` runs out.
        json_path: where to write the rows (JSON list), or None.
        threads: torch and ONNX Runtime intra-op threads.
        isas: kernel instruction sets to time (default: the best one available).
        baselines: names from ``BASELINES``.
        budget_s: time budget per (shape, M) for the timed rounds.
        log: progress printer (None: silent).

    Returns:
        One row per (format, isa, K, N, M): ``ms`` (median per call) and ``ms_<baseline>`` for every baseline,
        ``speedup_vs_fp32``, ``floor_ms`` (stored packed bytes / best read bandwidth of the run),
        ``packed_bytes`` / ``streamed_bytes`` (stored format / kernel layout incl. scales), the 10th
        percentiles ``p10`` / ``p10_<baseline>`` (less sensitive to a busy machine), ``rel_err`` (vs the
        float64 reference on the same weight), and ``isa``, ``threads``, ``bw_gbs``, ``load_avg``, ``cpu``.
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown formats {unknown}; choose from {sorted(FORMATS)}")
    torch.set_num_threads(threads)
    if not fast.is_available():
        raise RuntimeError(f"lowbit kernels unavailable: {fast.unavailable_reason()}")
    default_isa = fast.current_isa()
    isas = list(isas) if isas else [str(default_isa)]
    bw = measure_read_bandwidth()
    cpu = _cpu_model()
    if log:
        log(f"read bandwidth {bw:.1f} GB/s; isas {isas}; threads {threads}; cpu {cpu}")
    rows: list[dict[str, Any]] = []
    try:
        for k, n in shapes:
            bw = max(bw, measure_read_bandwidth())  # the least disturbed measurement is the closest to the truth
            w = torch.randn(n, k) * 0.02
            handles = {f: fast.prepare(make_format_weight(k, n, FORMATS[f], seed=i), act_block=FORMATS[f].act_block)
                       for i, f in enumerate(formats)}
            for m in ms:
                x = torch.randn(m, k)
                calls = _baseline_callables(w, x, baselines, threads)
                for isa in isas:
                    for f, h in handles.items():
                        if len(isas) == 1:
                            calls[f"{f}@{isa}"] = lambda h=h, x=x: fast.linear(x, h)
                        else:  # switching costs ~1 us, only paid when several ISAs are compared
                            calls[f"{f}@{isa}"] = lambda h=h, isa=isa, x=x: (fast.set_isa(isa), fast.linear(x, h))
                fast.set_isa(isas[0])
                with torch.inference_mode():
                    times = interleaved_times(calls, repeats, budget_s)
                med = {name: statistics.median(v) for name, v in times.items()}
                base = {f"ms_{b}": round(med[b], 4) for b in baselines}
                base_p10 = {f"p10_{b}": round(_p10(times[b]), 4) for b in baselines}
                xs = x[:16]  # accuracy check on a few rows: the float64 reference is slow at M=197
                refs = {f: reference_linear(xs, h.packed, dtype=torch.float64) for f, h in handles.items()}
                load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
                for isa in isas:
                    fast.set_isa(isa)
                    for f, h in handles.items():
                        rel = ((fast.linear(xs, h).double() - refs[f]).norm() / refs[f].norm()).item()
                        key = f"{f}@{isa}"
                        rows.append({
                            "format": f, "isa": isa, "K": k, "N": n, "M": m, "ms": round(med[key], 4), **base,
                            "speedup_vs_fp32": round(med["fp32"] / med[key], 3) if "fp32" in med else None,
                            "floor_ms": None,  # filled in below with the run's best bandwidth
                            "packed_bytes": h.packed.nbytes, "streamed_bytes": h.nbytes,
                            "p10": round(_p10(times[key]), 4), **base_p10, "rounds": len(times[key]),
                            "rel_err": round(rel, 5), "threads": threads, "load_avg": round(load, 2), "cpu": cpu,
                        })
                if log:
                    parts = [f"{name}={v:.3f}" for name, v in med.items()]
                    log(f"K={k} N={n} M={m} (median ms): " + " ".join(parts))
    finally:
        fast.set_isa(str(default_isa))
    for row in rows:  # M = 1 floor: the stored packed bytes (the format's own size) / read bandwidth
        row["bw_gbs"] = round(bw, 2)
        row["floor_ms"] = round(row["packed_bytes"] / (bw * 1e9) * 1e3, 4)
    if json_path is not None:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=1))
    return rows


def markdown_table(rows: Sequence[dict[str, Any]], baselines: Sequence[str] = BASELINES, stat: str = "ms") -> str:
    """A markdown table: one line per (K, N, M), baseline and format times in ms (``format@isa`` columns).

    ``stat``: ``"ms"`` (medians) or ``"p10"`` (10th percentiles).
    """
    keys = sorted({(r["K"], r["N"], r["M"]) for r in rows}, key=lambda t: (t[2], t[0] * t[1], t))
    cols = list(dict.fromkeys(f"{r['format']}@{r['isa']}" for r in rows))
    head = ["K", "N", "M", *baselines, *cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    prefix = "ms_" if stat == "ms" else "p10_"
    for key in keys:
        sel = [r for r in rows if (r["K"], r["N"], r["M"]) == key]
        vals = {f"{r['format']}@{r['isa']}": r[stat] for r in sel}
        first = sel[0]
        cells = [*map(str, key), *(f"{first.get(prefix + b, float('nan')):.3f}" for b in baselines),
                 *(f"{vals[c]:.3f}" if c in vals else "" for c in cols)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bench_kernels(json_path: str | os.PathLike[str] | None = None, quick: bool = False) -> list[dict[str, Any]]:
    """The full kernel benchmark, or with ``quick`` two shapes at M in {1, 16} with few repeats (a smoke run)."""
    if quick:
        return run_kernel_bench(shapes=[(768, 768), (4096, 4096)], ms=[1, 16], repeats=5, json_path=json_path,
                                budget_s=3.0)
    return run_kernel_bench(json_path=json_path)
