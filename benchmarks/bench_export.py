"""Exports side by side with lowbit (issue 17, item 3): each target runtime against lowbit in the same run.

    .venv/bin/python benchmarks/bench_export.py --sections onnx       # -> benchmarks/results/export.json
    .venv/bin/python benchmarks/bench_export.py --sections onnx --only clip-vit-tiny-fashion --rounds 5

One function per section (``onnx_section``; ``gguf_section``: ``bench_export_gguf.py``, ``--sections gguf``),
each returning a JSON-ready dict; ``main`` merges
each section into ``benchmarks/results/export.json`` under its name, leaving the other sections as they are.

ONNX: for lit-fashion and clip-vit-tiny-fashion quantized with the ``w4`` preset (GPTQ, 512 calibration samples),
the export (``lowbit.api.export(model, "onnx", dir)``) run by ONNX Runtime against the same packed model on
lowbit's kernels:

- two exports: the default (MatMulNBits float compute: lowbit's quantized model exactly) and ``accuracy_level=4``
  (int8 activations in lowbit's own activation blocks);
- accuracy: zero-shot top-1 on ``--limit`` Fashion-MNIST test images with every prompt template, and the image /
  text embedding cosine (lowbit.workflows.export.onnx.compare_with_lowbit), each export against lowbit's
  reference backend (the quantized model exactly) and against its default CPU kernels (int8 activations);
- latency of the image embedding at batch 1 and 32, interleaved rounds (lowbit, ORT default, ORT int8, each
  round), all on 2 threads (``torch.set_num_threads(2)``; ORT ``intra_op_num_threads=2``), median of the rounds;
- bytes: the ONNX directory (graphs + JSON + tokenizer) against the lowbit checkpoint directory.

The machine's CPU model and load average (before and after) are recorded: the numbers are only as quiet as it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import lowbit
from lowbit import api
from lowbit.eval.env import environment
from lowbit.io import write_json

RESULTS = Path(__file__).resolve().parent / "results"
OUT = RESULTS / "export.json"
ONNX_MODELS = ("lit-fashion", "clip-vit-tiny-fashion")
THREADS = 2


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def interleaved_latency(calls: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each entry, the entries timed in turn within every round (one warm-up each)."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def int8_stability(model: Any, data: Any, eps: float = 1e-7) -> dict[str, float]:
    """How far lowbit's own int8 image embeddings move when the pixels are perturbed by ``eps`` (relative, seeded):
    the floor under any second int8 implementation's agreement with them (rounding flips decorrelate downstream)."""
    import torch.nn.functional as F

    noise = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        cos = []
        for i in range(0, len(data.images), 64):
            pixels = model.preprocess(data.images[i:i + 64])
            moved = pixels * (1 + eps * torch.randn(pixels.shape, generator=noise))
            cos.append(F.cosine_similarity(model.encode_image(pixels).double(), model.encode_image(moved).double()))
    c = torch.cat(cos)
    return {"eps": eps, "image_cosine_min": c.min().item(), "image_cosine_mean": c.mean().item()}


def onnx_row(name: str, recipe: str, limit: int, rounds: int, work: Path) -> dict[str, Any]:
    from lowbit.data.resolve import resolve_dataset
    from lowbit.kernels.quant_linear import set_backend
    from lowbit.workflows.export.onnx import OrtDualEncoder, compare_with_lowbit

    model = lowbit.load(name)
    start = time.perf_counter()
    report = lowbit.quantize(model, recipe, progress=False)
    quantize_s = time.perf_counter() - start
    ckpt = lowbit.save(model, work / f"{name}-ckpt", report=report)
    start = time.perf_counter()
    exported = api.export(model, "onnx", work / f"{name}-onnx")  # the default: float compute
    export_s = time.perf_counter() - start
    int8 = api.export(model, "onnx", work / f"{name}-onnx-int8", accuracy_level=4)
    data = resolve_dataset("fashion-mnist", limit=limit)
    accuracy: dict[str, Any] = {}
    for backend in ("reference", "cpu"):  # lowbit's quantized model exactly, and lowbit's default int8 kernels
        set_backend(model, backend)
        for export_name, suffix in (("default", ""), ("int8", "-int8")):
            accuracy[f"{export_name}_vs_lowbit_{backend}"] = compare_with_lowbit(
                model, work / f"{name}-onnx{suffix}", data, threads=THREADS)
    set_backend(model, "cpu")
    accuracy["lowbit_cpu_perturbed_1e-7"] = int8_stability(model, data)
    sessions = {"ort": OrtDualEncoder(work / f"{name}-onnx", model, threads=THREADS),
                "ort_int8": OrtDualEncoder(work / f"{name}-onnx-int8", model, threads=THREADS)}
    latency: dict[str, Any] = {}
    for batch in (1, 32):
        pixels = model.preprocess(data.images[:batch])
        with torch.inference_mode():
            t = interleaved_latency({"lowbit": lambda p=pixels: model.encode_image(p),
                                     **{k: lambda p=pixels, o=o: o.encode_image(p) for k, o in sessions.items()}},
                                    rounds)
        latency[f"batch{batch}"] = {"lowbit_ms": 1e3 * t["lowbit"], "ort_ms": 1e3 * t["ort"],
                                    "ort_int8_ms": 1e3 * t["ort_int8"], "ort_over_lowbit": t["ort"] / t["lowbit"],
                                    "ort_int8_over_lowbit": t["ort_int8"] / t["lowbit"]}
    return {
        "model": name, "recipe": recipe, "quantize_s": quantize_s, "export_s": export_s,
        "ops": exported["ops"], "accuracy_level": exported["accuracy_level"],
        "accuracy_level_int8": int8["accuracy_level"], "accuracy": accuracy, "latency": latency,
        "bytes": {"onnx_dir": dir_bytes(work / f"{name}-onnx"),
                  "onnx_graphs": sum((work / f"{name}-onnx" / f).stat().st_size for f in ("image.onnx", "text.onnx")),
                  "lowbit_checkpoint_dir": dir_bytes(Path(ckpt))},
        "layers_not_packed": [r["layer"] for r in exported["layers"] if not r["packed"]],
    }


def onnx_section(models: tuple[str, ...] = ONNX_MODELS, recipe: str = "w4", limit: int = 500,
                 rounds: int = 10) -> dict[str, Any]:
    """The ONNX rows: ORT vs lowbit on the same packed model (accuracy, latency at batch 1 / 32, bytes)."""
    import onnxruntime as ort

    torch.set_num_threads(THREADS)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [onnx_row(name, recipe, limit, rounds, Path(tmp)) for name in models]
    return {
        "environment": {**environment(), "onnxruntime": ort.__version__, "threads_each": THREADS,
                        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                        "note": "2 threads each on a 2-core machine shared with other jobs: latency is noisy"},
        "method": "interleaved rounds (lowbit, ORT default export, ORT int8 export), median. Default export: "
                  "MatMulNBits accuracy_level 0 (float compute: lowbit's quantized model exactly); int8 export: "
                  "accuracy_level 4 with lowbit's activation blocks. Accuracy against lowbit's reference backend "
                  "(the quantized model exactly) and its default int8 kernels",
        "rows": rows,
    }


def gguf_section(args: argparse.Namespace) -> dict[str, Any]:
    """SmolLM2 exported to GGUF and run by llama.cpp beside lowbit (``bench_export_gguf.py``, its own docstring)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_export_gguf import run

    return run(quick=False, threads=2)


SECTIONS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "onnx": lambda a: onnx_section(tuple(a.only.split(",")) if a.only else ONNX_MODELS, a.recipe, a.limit, a.rounds),
    "gguf": gguf_section,
}


def merge_section(name: str, result: dict[str, Any], path: Path = OUT) -> None:
    """Write ``result`` under ``name`` in ``path``, keeping the other sections; rows of models not run this time
    (``--only``) are kept, each with the environment it was measured in."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    old_rows = data.get(name, {}).get("rows", [])
    for row in result.get("rows", []):
        row["environment"] = result.get("environment")
    ran = {row.get("model") for row in result.get("rows", [])}
    result["rows"] = [r for r in old_rows if r.get("model") not in ran] + result.get("rows", [])
    data[name] = result
    write_json(path, data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="onnx", help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--only", help="onnx: comma list of models (default: all)")
    parser.add_argument("--recipe", default="w4")
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    for name in args.sections.split(","):
        result = SECTIONS[name](args)
        merge_section(name, result)
        print(json.dumps(result, indent=1)[:4000])


if __name__ == "__main__":
    main()
