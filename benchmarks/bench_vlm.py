"""The default VLM (``llava-fashion-hd``): accuracy, fidelity and speed in full precision, quantized, pruned.

    .venv/bin/python benchmarks/bench_vlm.py                  # -> benchmarks/results/vlm.json
    .venv/bin/python benchmarks/bench_vlm.py --fashion 40 --shapes 20 --quick   # smoke run
    .venv/bin/python benchmarks/bench_vlm.py --ttft-only --rows prune,fastv,w4 --threads 1  # -> vlm-ttft.json
    .venv/bin/python benchmarks/bench_vlm.py --ttft-only --baseline-src OLD/src --baseline-label COMMIT --threads 1 \
        --accuracy 48                             # -> vlm-ttft.json: w4 rows of this checkout vs OLD's, one run
                                                  #    (+ both sides' answers / accuracy / KL on 48 questions)
    .venv/bin/python benchmarks/bench_vlm.py --model llava-fashion --rows prune,fastv,kv,w4
                                                  # -> benchmarks/results/vlm-llava-fashion.json

Rows, all measured in this one run on the same held-out questions (the first N test images of each set):

- ``fp``: the float model ("full precision" = SmolLM2's dequantized Q4_1 weights, see ``models/smollm.py``);
- ``w4-language+w8-vision``: the recipe ``--recipe``, by default every linear of the LM's 30 blocks at 4 bits,
  group 32, on the ``minmax`` grid (step + float minimum: the GGUF Q4_1 grid, so it re-packs this LM's
  weights without loss; lm_head, tied to the float input embeddings, stays float), vision tower and projector
  8-bit per channel; metrics.kl / agreement against ``fp``;
- ``w4gptq-language+w8-vision``: ``--generic-recipe``, the same widths on lowbit's integer grid with GPTQ
  (calibrated on image+question sequences): what 4 bits cost an LM whose weights are *not* on the grid;
- ``prune-0.5``: half of the visual tokens dropped before the LM (ranked by the tower's score: feature norm);
  ``w4+prune-0.5``: the default recipe and the pruning together;
- ``fastv-0.5``: half of the visual tokens dropped inside the LM after its first ``FASTV_LAYER`` layers, ranked
  by the attention they receive there (FastV; ``LlavaConfig.prune_layer``);
- ``kv8`` / ``kv4``: the KV cache stored at 8 / 4 bits.

``--baseline-src`` (issue 19's time-to-first-answer target): the w4 rows of this checkout, optimized for
inference (``optimize_for_inference_``), against the same rows of another checkout's ``lowbit`` (e.g.
``git archive COMMIT src``) run plainly in a worker process, one call of each per interleaved round; plus
``profile_ttft`` of each side: where the time goes (vision per layer kind, projector, LM prefill per part).

Footprint per row: ttft_ms (image -> first token, batch 1, median), decode_tok_s, weight bytes. The pruning
target's time to first token comes from ``ttft``: the rows timed in interleaved rounds on the same image
and question (medians), so machine noise hits both alike. Targets (issue 6): fp Fashion accuracy >= 0.80;
w4/w8 accuracy drop <= 1 point and mean KL <= 0.05; pruning half the visual tokens costs <= 2 points and
cuts ttft by >= 30%. The table says which hold.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from lowbit.eval.env import environment
from lowbit.io import write_json
from lowbit.models.llava import BUILTIN_NAMES, DEFAULT_NAME

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_RECIPE = "language/lm_head=skip,language=w4g32:minmax,vision=w8,projector=w8"
GENERIC_RECIPE = "language/lm_head=skip,language=w4g32:gptq,vision=w8,projector=w8"
CALIB_SAMPLES = 64  # image+question sequences of ~44 tokens: ~2,800 rows per Hessian (K <= 1536)


def _row(name: str, results: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"name": name}
    for task, r in results.items():
        row[task] = {"metrics": dict(r["metrics"]), "footprint": r.get("footprint"), "fidelity": r.get("fidelity")}
    return row


def interleaved_ttft(models: dict[str, Any], rounds: int) -> dict[str, float]:
    """Median ms to first token of each model on one held-out image+question, timed in interleaved rounds
    (``lowbit.workflows.bench_kernels.interleaved_times``: the same noise-sharing rounds as the kernel benchmark)."""
    from lowbit.data.vqa import load_vqa
    from lowbit.eval.vqa import first_token_fn
    from lowbit.workflows.bench_kernels import interleaved_times

    sample = load_vqa("fashion-vqa", "test", limit=1)
    calls = {name: first_token_fn(m, sample.images[0], sample.turns[0][0].question) for name, m in models.items()}
    times = interleaved_times(calls, repeats=rounds, budget_s=float("inf"))
    return {name: statistics.median(t) for name, t in times.items()}


def _vision_kind(net: Any, name: str, module: torch.nn.Module) -> str:
    """Which part of the EfficientNet tower a leaf module is (the profile's vision rows)."""
    if module is getattr(net, "_conv_stem", None):
        return "stem conv"
    if module is getattr(net, "_conv_head", None):
        return "head 1x1 conv"
    for part, label in (("_depthwise_conv", "depthwise convs"), ("_expand_conv", "expand 1x1 convs"),
                        ("_project_conv", "project 1x1 convs")):
        if part in name:
            return label
    return "batchnorm" if isinstance(module, torch.nn.BatchNorm2d) else type(module).__name__


class _Timer:
    """Seconds per label, added by wrapped calls (the profile: nested labels are not subtracted)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, label: str, fn: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t
        return run


class _TimedStack:
    """The kernels' DecoderStack (a pybind object: its methods cannot be replaced) with its batch-1 prefill timed
    under ``lm: native prefill (DecoderStack)``: the whole decoder in one C++ call, not split further here."""

    def __init__(self, stack: Any, timer: _Timer) -> None:
        self._stack = stack
        self.prefill = timer.wrap("lm: native prefill (DecoderStack)", stack.prefill)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stack, name)


class _TimedOps:
    """The kernels' decode ops module seen through a timer: each op's calls under ``lm: <op>``."""

    def __init__(self, ops: Any, timer: _Timer) -> None:
        self._ops, self._timer = ops, timer

    def __getattr__(self, name: str) -> Any:
        return self._timer.wrap(f"lm: {name}", getattr(self._ops, name))


def profile_ttft(model: Any, repeats: int = 10) -> dict[str, float]:
    """Where one image -> first token call goes, ms per part (means over ``repeats`` calls after 3 warm-ups):
    the vision tower per layer kind (forward hooks), projector, prompt assembly, and the LM prefill per part
    (the lean engine's callables wrapped: projections, attention, RoPE, norms, lm_head); ``other (python)`` is
    the rest of the total. The wrappers cost ~1 us a call, so the total is a little above the untimed one."""
    import contextlib

    import torch.nn.functional as F

    import lowbit.models.lean_decode as lean
    from lowbit.data.vqa import load_vqa
    from lowbit.eval.vqa import first_token_fn

    timer = _Timer()
    net = getattr(model.vision, "net", model.vision)
    handles = []
    for name, module in model.vision.named_modules():
        if next(module.children(), None) is None:
            label = "vision: " + _vision_kind(net, name, module)
            starts: list[float] = []
            handles.append(module.register_forward_pre_hook(lambda *_, s=starts: s.append(time.perf_counter())))

            def done(*_: Any, s: list[float] = starts, label: str = label) -> None:
                timer.seconds[label] = timer.seconds.get(label, 0.0) + time.perf_counter() - s.pop()

            handles.append(module.register_forward_hook(done))
    original_init = lean.LeanDecoder.__init__

    def init(engine: Any, *args: Any, **kwargs: Any) -> None:
        t = time.perf_counter()
        original_init(engine, *args, **kwargs)
        timer.seconds["lm: engine set-up"] = timer.seconds.get("lm: engine set-up", 0.0) + time.perf_counter() - t
        for layer in engine.layers:
            layer.qkv, layer.o = timer.wrap("lm: q/k/v", layer.qkv), timer.wrap("lm: o", layer.o)
            layer.gate_up, layer.down = timer.wrap("lm: gate/up", layer.gate_up), timer.wrap("lm: down", layer.down)
        engine.lm_head = timer.wrap("lm: lm_head", engine.lm_head)
        engine._rope = timer.wrap("lm: rope", engine._rope)
        if getattr(engine, "_ops", None) is not None:  # older engines (a --baseline-src worker) have no _ops
            engine._ops = _TimedOps(engine._ops, timer)
        else:
            engine._rms = timer.wrap("lm: rms_norm", engine._rms)
        reset = timer.wrap("lm: reset (KV cache, rope tables)", engine.reset)

        def timed_reset(*args: Any, **kwargs: Any) -> None:
            reset(*args, **kwargs)
            stack = getattr(engine, "_stack", None)
            if stack is not None and hasattr(stack, "prefill") and not isinstance(stack, _TimedStack):
                engine._stack = _TimedStack(engine._stack, timer)

        engine.reset = timed_reset

    sample = load_vqa("fashion-vqa", "test", limit=1)
    call = first_token_fn(model, sample.images[0], sample.turns[0][0].question)
    stack = contextlib.ExitStack()
    with stack:
        stack.callback(lambda: [h.remove() for h in handles])
        stack.callback(setattr, lean.LeanDecoder, "__init__", original_init)
        lean.LeanDecoder.__init__ = init  # type: ignore[method-assign]
        sdpa = F.scaled_dot_product_attention
        stack.callback(setattr, F, "scaled_dot_product_attention", sdpa)
        F.scaled_dot_product_attention = timer.wrap("lm: sdpa (torch)", sdpa)
        for part in ("projector",):
            module = getattr(model, part)
            stack.callback(setattr, module, "forward", module.forward)
            module.forward = timer.wrap(part, module.forward)
        for method, label in (("prompt_embeddings", "prompt assembly"), ("preprocess", "preprocess")):
            stack.callback(model.__dict__.pop, method, None)
            setattr(model, method, timer.wrap(label, getattr(model, method)))
        for _ in range(3):
            call()
        timer.seconds.clear()
        t = time.perf_counter()
        for _ in range(repeats):
            call()
        total = time.perf_counter() - t
    ms = {k: round(v / repeats * 1e3, 3) for k, v in sorted(timer.seconds.items())}
    ms["other (python)"] = round(total / repeats * 1e3 - sum(ms.values()), 3)
    ms["total"] = round(total / repeats * 1e3, 3)
    return ms


ROWS = ("prune", "fastv", "kv", "w4", "gptq")  # optional row groups besides "fp" (all by default)
FASTV_LAYER = 2  # FastV's K for LLaVA-1.5 (32 layers); SmolLM2-135M has 30
FASTV = {"prune_ratio": 0.5, "prune_layer": FASTV_LAYER}


def quantized(name: str, spec: str) -> Any:
    """A fresh copy of built-in ``name`` quantized with ``spec`` (GPTQ calibrates on image+question prompts)."""
    import lowbit
    from lowbit.models import load_model

    m = load_model(name)
    lowbit.quantize(m, spec, calib_data="fashion-mnist", calib_samples=CALIB_SAMPLES, progress=False)
    return m


def timed_variants(model: Any, quant: Any, rows_wanted: tuple[str, ...]) -> dict[str, Any]:
    """The rows whose time to first token is compared, in interleaved rounds: fp, the pruned variants, w4."""
    timed = {"fp": model}
    if "prune" in rows_wanted:
        timed["prune-0.5"] = model.with_config(prune_ratio=0.5)
    if "fastv" in rows_wanted:
        timed["fastv-0.5"] = model.with_config(**FASTV)
    if quant is not None:
        timed["w4-language+w8-vision"] = quant
        if "prune" in rows_wanted:
            timed["w4+prune-0.5"] = quant.with_config(prune_ratio=0.5)
    return timed


def ttft_only(name: str, recipe: str, rounds: int, rows_wanted: tuple[str, ...]) -> dict[str, Any]:
    """Only the interleaved time-to-first-token rounds (no accuracy): a quick re-time on a quiet machine."""
    import os

    from lowbit.models import load_model

    quant = quantized(name, recipe) if "w4" in rows_wanted else None
    ttft = interleaved_ttft(timed_variants(load_model(name), quant, rows_wanted), rounds)
    cuts = {f"{k}_ttft_cut": 1 - v / ttft["fp"] for k, v in ttft.items() if k != "fp"}
    if "w4+prune-0.5" in ttft:
        cuts["w4+prune-0.5_ttft_cut_vs_w4"] = 1 - ttft["w4+prune-0.5"] / ttft["w4-language+w8-vision"]
    return {"model": name, "ttft_interleaved_ms": ttft, "cuts": cuts, "rounds": rounds, "recipe": recipe,
            "load_avg_1min": os.getloadavg()[0], "env": environment(), "threads": torch.get_num_threads()}


AB_ROWS = {"w4-language+w8-vision": 0.0, "w4+prune-0.5": 0.5}  # the A/B rows: name -> prune_ratio


def _ab_calls(name: str, recipe: str, optimize: bool) -> tuple[dict[str, Any], Any]:
    """The A/B rows' first-token calls on one quantized model (``optimize``: ``optimize_for_inference_`` first:
    BatchNorm folded, depthwise convs on the kernel, activations fused) and that model."""
    from lowbit.data.vqa import load_vqa
    from lowbit.eval.vqa import first_token_fn

    quant = quantized(name, recipe)
    if optimize:
        from lowbit.kernels.inference import optimize_for_inference_

        optimize_for_inference_(quant)
    sample = load_vqa("fashion-vqa", "test", limit=1)
    image, question = sample.images[0], sample.turns[0][0].question
    return {row: first_token_fn(quant.with_config(prune_ratio=ratio), image, question)
            for row, ratio in AB_ROWS.items()}, quant


def _timed_batch(fn: Any, batch: int, gap_s: float = 0.01) -> float:
    """ms per call of one round's batch, as ``interleaved_times`` times it: an idle gap, two untimed calls.

    Not imported from ``workflows.bench_kernels``: the ``--baseline-src`` worker runs this file against an older
    lowbit, so it may only use what every lowbit version has."""
    time.sleep(gap_s)
    fn()
    fn()
    t = time.perf_counter()
    for _ in range(batch):
        fn()
    return (time.perf_counter() - t) / batch * 1e3


def accuracy_side(name: str, quant: Any, n: int) -> dict[str, Any]:
    """One side of ``--accuracy N``: ``quant``'s greedy 8-token answers on the lean engine (``forced_tokens``: what
    time to first token runs) for the first ``n`` fashion-vqa test questions, and ``lowbit.evaluate`` of the float
    model and ``quant`` on them (accuracy; KL and agreement of ``quant`` against the float model). Uses only what
    every lowbit version has (the worker runs it on an older one)."""
    import lowbit
    from lowbit.data.vqa import load_vqa
    from lowbit.models import load_model
    from lowbit.models.llava_generate import forced_tokens

    data = load_vqa("fashion-vqa", "test", limit=n)
    with torch.inference_mode():
        answers = [forced_tokens(quant, quant.preprocess([image]), turns[0].question, 8)[0].tolist()
                   for image, turns in zip(data.images, data.turns, strict=True)]
    fp = lowbit.evaluate(load_model(name), "fashion-vqa", limit=n, progress=False)
    q = lowbit.evaluate(quant, "fashion-vqa", limit=n, reference=fp, progress=False)
    keep = ("accuracy", "kl", "agreement")
    return {"answers": answers, "fp": {k: fp["metrics"].get(k) for k in keep},
            "w4": {k: q["metrics"].get(k) for k in keep}}


def worker(name: str, recipe: str) -> None:
    """The baseline side of ``--baseline-src``: this script run on another checkout's ``lowbit`` (PYTHONPATH),
    answering one JSON command per stdin line with one ``@@``-prefixed JSON line (other output is ignored)."""
    import json
    import sys

    calls, quant = _ab_calls(name, recipe, optimize=False)

    def reply(obj: Any) -> None:
        print("@@" + json.dumps(obj), flush=True)

    reply({"rows": list(calls), "env": environment()})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "time":
            reply({"ms": _timed_batch(calls[cmd["row"]], int(cmd["batch"]))})
        elif cmd["op"] == "accuracy":
            reply(accuracy_side(name, quant, int(cmd["n"])))
        elif cmd["op"] == "profile":
            reply({"profile": profile_ttft(quant.with_config(prune_ratio=AB_ROWS[cmd["row"]]), cmd["repeats"])})
        else:
            return


class _Baseline:
    """The worker process of ``--baseline-src``."""

    def __init__(self, src: str, name: str, recipe: str, threads: int) -> None:
        import os
        import subprocess
        import sys

        env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", "--model", name, "--recipe", recipe,
                                      "--threads", str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        self.ready = self.read()

    def read(self) -> Any:
        import json

        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise RuntimeError(f"the baseline worker ended (exit {self.proc.wait()})")

    def ask(self, **cmd: Any) -> Any:
        import json

        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def ask_quit(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write('{"op": "quit"}\n')
        self.proc.stdin.close()
        self.proc.wait()


def ab_ttft(name: str, recipe: str, rounds: int, baseline_src: str, profile_repeats: int = 10,
            accuracy: int = 0) -> dict[str, Any]:
    """Time to first token of this checkout's w4 rows (optimized for inference) against the same rows of the
    checkout at ``baseline_src`` (a worker process on its ``lowbit``), in interleaved rounds: each round times
    every row of both once, so machine noise hits old and new alike. Also each side's ``profile_ttft``; with
    ``accuracy`` N, each side's ``accuracy_side`` on N questions (after the timing) and how many greedy answers
    are identical."""
    import os

    threads = torch.get_num_threads()
    base = _Baseline(baseline_src, name, recipe, threads)
    try:
        calls, quant = _ab_calls(name, recipe, optimize=True)
        batch = 1  # each call takes ~50-200 ms: one call per round (interleaved_times' batch_ms=2 gives 1)
        times: dict[str, list[float]] = {f"{row} (before)": [] for row in base.ready["rows"]}
        times.update({row: [] for row in calls})
        for row, fn in calls.items():  # warm-up of both sides
            fn()
            base.ask(op="time", row=row, batch=batch)
        for _ in range(rounds):
            for row, fn in calls.items():
                times[f"{row} (before)"].append(base.ask(op="time", row=row, batch=batch)["ms"])
                times[row].append(_timed_batch(fn, batch))
        profiles = {}
        for row, ratio in AB_ROWS.items():
            profiles[f"{row} (before)"] = base.ask(op="profile", row=row, repeats=profile_repeats)["profile"]
            profiles[row] = profile_ttft(quant.with_config(prune_ratio=ratio), profile_repeats)
        check: dict[str, Any] = {}
        if accuracy:
            before, after = base.ask(op="accuracy", n=accuracy), accuracy_side(name, quant, accuracy)
            same = sum(a == b for a, b in zip(before.pop("answers"), after.pop("answers"), strict=True))
            check = {"questions": accuracy, "before": before, "after (optimized)": after,
                     "identical_greedy_8_token_answers": same}
    finally:
        base.ask_quit()
    ms = {row: statistics.median(t) for row, t in times.items()}
    before = "w4-language+w8-vision (before)"
    ratios = {f"{row} / {before}": ms[row] / ms[before] for row in AB_ROWS}
    return {"model": name, "ttft_interleaved_ms": ms, "ratios": ratios,
            "targets": {"w4_le_0.5x_before": ratios[f"w4-language+w8-vision / {before}"] <= 0.5,
                        "w4+prune_le_0.35x_before": ratios[f"w4+prune-0.5 / {before}"] <= 0.35},
            "rounds": rounds, "recipe": recipe, "baseline": base.ready | {"src": str(baseline_src)},
            "profile_ms": profiles, "accuracy_check": check, "load_avg_1min": os.getloadavg()[0],
            "env": environment(), "threads": threads}


def run(n_fashion: int, n_shapes: int, recipe: str, generic_recipe: str, quick: bool,
        rounds: int, name: str = DEFAULT_NAME, rows_wanted: tuple[str, ...] = ROWS) -> dict[str, Any]:
    import lowbit
    from lowbit.models import load_model

    limits = {"fashion-vqa": n_fashion, "shapes-vqa": n_shapes}
    t0 = time.perf_counter()
    model = load_model(name)

    def evaluate_all(m: Any, refs: dict[str, Any] | None) -> dict[str, Any]:
        return {task: lowbit.evaluate(m, task, limit=n, reference=None if refs is None else refs[task],
                                      progress=False)
                for task, n in limits.items() if n}

    rows: list[dict[str, Any]] = []
    fp = evaluate_all(model, None)
    rows.append(_row("fp", fp))
    variants: list[tuple[str, dict[str, Any]]] = [("prune-0.5", {"prune_ratio": 0.5})] if "prune" in rows_wanted else []
    if "fastv" in rows_wanted:
        variants.append(("fastv-0.5", FASTV))
    if not quick and "kv" in rows_wanted:
        variants += [("kv8", {"kv_bits": 8}), ("kv4", {"kv_bits": 4})]
    for row_name, change in variants:
        rows.append(_row(row_name, evaluate_all(model.with_config(**change), fp)))
    quant = None
    if "w4" in rows_wanted:
        quant = quantized(name, recipe)
        rows.append(_row("w4-language+w8-vision", evaluate_all(quant, fp)) | {"recipe": recipe})
        if "prune" in rows_wanted:
            rows.append(_row("w4+prune-0.5", evaluate_all(quant.with_config(prune_ratio=0.5), fp))
                        | {"recipe": recipe})
    timed = timed_variants(model, quant, rows_wanted)
    if generic_recipe and not quick and "gptq" in rows_wanted:
        generic = quantized(name, generic_recipe)
        rows.append(_row("w4gptq-language+w8-vision", evaluate_all(generic, fp)) | {"recipe": generic_recipe})
        del generic  # ~0.5 GB: not needed for the timing rounds
    ttft = interleaved_ttft(timed, rounds)
    return {"model": name, "rows": rows, "ttft_interleaved_ms": ttft, "targets": targets(rows, ttft),
            "seconds": round(time.perf_counter() - t0, 1), "env": environment(), "threads": torch.get_num_threads(),
            "limits": limits, "calib_samples": CALIB_SAMPLES}


def targets(rows: list[dict[str, Any]], ttft: dict[str, float]) -> dict[str, Any]:
    """The issue's targets, checked against this run's rows."""
    by = {r["name"]: r for r in rows}
    fm = "fashion-vqa"
    fp = by["fp"][fm]
    out: dict[str, Any] = {"fp_accuracy": fp["metrics"]["accuracy"],
                           "fp_accuracy_ge_0.80": fp["metrics"]["accuracy"] >= 0.80}
    q = by.get("w4-language+w8-vision", {}).get(fm)
    if q:
        drop = fp["metrics"]["accuracy"] - q["metrics"]["accuracy"]
        out.update({"quant_accuracy_drop": drop, "quant_drop_le_0.01": drop <= 0.01,
                    "quant_kl": q["metrics"].get("kl"), "quant_kl_le_0.05": (q["metrics"].get("kl") or 1) <= 0.05})
    p = by.get("prune-0.5", {}).get(fm)
    if p:
        drop = fp["metrics"]["accuracy"] - p["metrics"]["accuracy"]
        cut = 1 - ttft["prune-0.5"] / ttft["fp"]  # interleaved rounds: the fair comparison
        out.update({"prune_accuracy_drop": drop, "prune_drop_le_0.02": drop <= 0.02, "prune_ttft_cut": cut,
                    "prune_ttft_cut_ge_0.30": cut >= 0.30})
    f = by.get("fastv-0.5", {}).get(fm)
    if f:  # the same two numbers for pruning inside the LM
        out.update({"fastv_accuracy_drop": fp["metrics"]["accuracy"] - f["metrics"]["accuracy"],
                    "fastv_ttft_cut": 1 - ttft["fastv-0.5"] / ttft["fp"]})
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = ["| row | fashion acc | shapes acc | KL (fashion) | agreement | ttft ms | decode tok/s | vis. tokens |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        f, s = r.get("fashion-vqa", {}), r.get("shapes-vqa", {})
        fm, fp = f.get("metrics", {}), f.get("footprint") or {}

        def num(x: Any, fmt: str = "{:.3f}") -> str:
            return "" if x is None else fmt.format(x)

        lines.append(f"| {r['name']} | {num(fm.get('accuracy'))} | {num(s.get('metrics', {}).get('accuracy'))} | "
                     f"{num(fm.get('kl'), '{:.4f}')} | {num(fm.get('agreement'))} | {num(fp.get('ttft_ms'), '{:.0f}')}"
                     f" | {num(fp.get('decode_tok_s'), '{:.1f}')} | {fp.get('visual_tokens', '')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_NAME, help=f"a built-in VLM ({', '.join(BUILTIN_NAMES)})")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"row groups besides fp, from {','.join(ROWS)}")
    parser.add_argument("--fashion", type=int, default=200, help="held-out Fashion-MNIST questions")
    parser.add_argument("--shapes", type=int, default=100, help="held-out shapes questions")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE)
    parser.add_argument("--generic-recipe", default=GENERIC_RECIPE, help="'' to skip the generic-grid row")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved time-to-first-token rounds")
    parser.add_argument("--quick", action="store_true", help="skip the KV-cache rows")
    parser.add_argument("--ttft-only", action="store_true",
                        help="only re-time time to first token (default JSON benchmarks/results/vlm-ttft.json)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline-src", help="with --ttft-only: time the w4 rows (optimized for inference) "
                        "against the same rows of the lowbit at this src/ directory (e.g. the commit before a change), "
                        "interleaved in one run; default JSON benchmarks/results/vlm-ttft.json")
    parser.add_argument("--baseline-label", default="", help="what --baseline-src is (e.g. its commit), recorded")
    parser.add_argument("--accuracy", type=int, default=0, help="with --baseline-src: after the timing, both sides' "
                        "greedy answers and fashion-vqa accuracy / KL / agreement on this many questions")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # --baseline-src's worker
    parser.add_argument("--json", help=f"default benchmarks/results/vlm.json ({DEFAULT_NAME}) or vlm-MODEL.json")
    args = parser.parse_args()
    rows_wanted = tuple(r for r in args.rows.split(",") if r)
    if set(rows_wanted) - set(ROWS):
        parser.error(f"unknown row groups {sorted(set(rows_wanted) - set(ROWS))}; accepted: {','.join(ROWS)}")
    json_path = args.json or str(RESULTS / ("vlm.json" if args.model == DEFAULT_NAME else f"vlm-{args.model}.json"))
    torch.set_num_threads(args.threads)
    if args.worker:
        worker(args.model, args.recipe)
        return
    if args.ttft_only and args.baseline_src:
        timing = ab_ttft(args.model, args.recipe, args.rounds, args.baseline_src, accuracy=args.accuracy)
        timing["baseline"]["label"] = args.baseline_label
        timing["targets"]["ratios_against"] = args.baseline_label or args.baseline_src  # the issue names its baseline
        timing["command"] = (f"benchmarks/bench_vlm.py --ttft-only --baseline-src {args.baseline_src} "
                             f"--baseline-label '{args.baseline_label}' --model {args.model} --recipe '{args.recipe}' "
                             f"--rounds {args.rounds} --threads {args.threads} --accuracy {args.accuracy}")
        path = args.json or str(RESULTS / "vlm-ttft.json")
        write_json(path, timing)
        print(timing["ttft_interleaved_ms"], timing["ratios"], f"wrote {path}", sep="\n")
        return
    if args.ttft_only:
        timing = ttft_only(args.model, args.recipe, args.rounds, rows_wanted)
        timing["command"] = (f"benchmarks/bench_vlm.py --ttft-only --model {args.model} --rows {args.rows} "
                             f"--recipe '{args.recipe}' --rounds {args.rounds} --threads {args.threads}")
        path = args.json or str(RESULTS / "vlm-ttft.json")
        write_json(path, timing)
        print(timing["ttft_interleaved_ms"], timing["cuts"], f"wrote {path}", sep="\n")
        return
    result = run(args.fashion, args.shapes, args.recipe, args.generic_recipe, args.quick, args.rounds, args.model,
                 rows_wanted)
    result["command"] = (f"benchmarks/bench_vlm.py --model {args.model} --rows {args.rows} "
                         f"--fashion {args.fashion} --shapes {args.shapes} "
                         f"--recipe '{args.recipe}' --generic-recipe '{args.generic_recipe}' --rounds {args.rounds} "
                         f"--threads {args.threads}" + (" --quick" if args.quick else ""))
    result["table"] = markdown(result)
    write_json(json_path, result)
    print(result["table"])
    print(result["targets"])
    print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
