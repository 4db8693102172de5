"""The default VLM (``llava-fashion``): accuracy, fidelity and speed in full precision, quantized, pruned.

    .venv/bin/python benchmarks/bench_vlm.py                  # -> benchmarks/results/vlm.json
    .venv/bin/python benchmarks/bench_vlm.py --fashion 40 --shapes 20 --quick   # smoke run

Rows, all measured in this one run on the same held-out questions (the first N test images of each set):

- ``fp``: the float model ("full precision" = SmolLM2's dequantized Q4_1 weights, see ``models/smollm.py``);
- ``w4-language+w8-vision``: the recipe ``--recipe`` (default: language 4-bit g32 asymmetric RTN, vision and
  projector 8-bit per channel), with metrics.kl / agreement against ``fp``;
- ``prune-0.5``: half of the visual tokens dropped before the LM (ranked by feature norm);
- ``kv8`` / ``kv4``: the KV cache stored at 8 / 4 bits.

Footprint per row: ttft_ms (image -> first token, batch 1, median), decode_tok_s, weight bytes. Targets (issue 6):
fp Fashion accuracy >= 0.80; w4/w8 accuracy drop <= 1 point and mean KL <= 0.05; pruning half the visual
tokens costs <= 2 points and cuts ttft by >= 30%. The table says which hold.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lowbit.eval.env import environment
from lowbit.io import write_json

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_RECIPE = "language=w4g32a,vision=w8,projector=w8"


def _row(name: str, results: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"name": name}
    for task, r in results.items():
        row[task] = {"metrics": dict(r["metrics"]), "footprint": r.get("footprint"), "fidelity": r.get("fidelity")}
    return row


def run(n_fashion: int, n_shapes: int, recipe: str, quick: bool) -> dict[str, Any]:
    import lowbit
    from lowbit.models import load_model

    limits = {"fashion-vqa": n_fashion, "shapes-vqa": n_shapes}
    t0 = time.perf_counter()
    model = load_model("llava-fashion")

    def evaluate_all(m: Any, refs: dict[str, Any] | None) -> dict[str, Any]:
        return {task: lowbit.evaluate(m, task, limit=n, reference=None if refs is None else refs[task],
                                      progress=False)
                for task, n in limits.items() if n}

    rows: list[dict[str, Any]] = []
    fp = evaluate_all(model, None)
    rows.append(_row("fp", fp))
    variants: list[tuple[str, dict[str, Any]]] = [("prune-0.5", {"prune_ratio": 0.5})]
    if not quick:
        variants += [("kv8", {"kv_bits": 8}), ("kv4", {"kv_bits": 4})]
    for name, change in variants:
        original = model.config
        model.config = replace(original, **change)
        try:
            rows.append(_row(name, evaluate_all(model, fp)))
        finally:
            model.config = original
    lowbit.quantize(model, recipe, calib_data="fashion-mnist", calib_samples=32, progress=False)  # in place: last
    rows.append(_row("w4-language+w8-vision", evaluate_all(model, fp)))
    rows[-1]["recipe"] = recipe
    return {"rows": rows, "targets": targets(rows), "seconds": round(time.perf_counter() - t0, 1),
            "env": environment(), "threads": torch.get_num_threads(), "limits": limits}


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
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
        cut = 1 - p["footprint"]["ttft_ms"] / fp["footprint"]["ttft_ms"]
        out.update({"prune_accuracy_drop": drop, "prune_drop_le_0.02": drop <= 0.02, "prune_ttft_cut": cut,
                    "prune_ttft_cut_ge_0.30": cut >= 0.30})
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
    parser.add_argument("--fashion", type=int, default=200, help="held-out Fashion-MNIST questions")
    parser.add_argument("--shapes", type=int, default=100, help="held-out shapes questions")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE)
    parser.add_argument("--quick", action="store_true", help="skip the KV-cache rows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=str(RESULTS / "vlm.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.fashion, args.shapes, args.recipe, args.quick)
    result["command"] = (f"benchmarks/bench_vlm.py --fashion {args.fashion} --shapes {args.shapes} "
                         f"--recipe {args.recipe} --threads {args.threads}" + (" --quick" if args.quick else ""))
    result["table"] = markdown(result)
    write_json(args.json, result)
    print(result["table"])
    print(result["targets"])
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
