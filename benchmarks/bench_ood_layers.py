"""Which layers lose out-of-domain fidelity: image-embedding cosine to the float model with one layer quantized at
a time (``--per-layer``) or with whole candidate recipes (``--recipes``), by calibration set.

Issue 20 item 4: the ``w4`` preset on ``lit-fashion`` kept only 0.557 mean cosine on generated scenes when
calibrated on Fashion-MNIST (benchmarks/results/ood-w4.json). This isolates the cause: every layer of the vision
tower alone at a given format (all else float), then whole recipes. Evaluation sets as ``bench_ood.py``:
``scenes-test`` (TEST seeds, never calibrated on), ``photos`` (crops of matplotlib's photographs), optionally
``fashion-mnist`` (TEST split).

    .venv/bin/python benchmarks/bench_ood_layers.py --per-layer '{"method": "gptq", "bits": 4, "group_size": 128}' \
        --calib fashion-mnist --out benchmarks/results/ood-w4-layers.json
    .venv/bin/python benchmarks/bench_ood_layers.py --recipes w4,vision=w4g32a --calib fashion-mnist,scenes

The machine is a shared 2-core box: the JSON records the 1-minute load average and the CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from typing import Any

import torch
from bench_ood import RESULTS, cosine_stats, embed, photo_crops

import lowbit
from lowbit.data import resolve_dataset
from lowbit.eval.env import environment
from lowbit.io import write_json
from lowbit.quant.recipe import Recipe, load_recipe

LAYER_TYPES = (torch.nn.Conv2d, torch.nn.Linear)


def vision_layers(model: Any) -> list[tuple[str, str, int]]:
    """(name inside the vision tower, kind, parameters) of every conv / linear layer, in forward order."""
    out = []
    for name, module in model.towers()["vision"].named_modules():
        if isinstance(module, LAYER_TYPES):
            pointwise = isinstance(module, torch.nn.Linear) or module.weight.shape[2:].numel() == 1
            kind = ("linear" if isinstance(module, torch.nn.Linear) else "conv1x1") if pointwise else "conv"
            out.append((name, kind, module.weight.numel()))
    return out


def one_layer_recipe(name: str, kind: str, rule: dict[str, Any]) -> Recipe:
    """Only ``name`` of the vision tower quantized with ``rule``; everything else float (fp32)."""
    return Recipe.from_dict({"version": 1, "rules": [{"tower": "vision", "pattern": name, "kinds": [kind], **rule}]},
                            name=f"vision/{name}")


def measure(float_model: Any, recipe: str | Recipe, calib: str, samples: int,
            sets: dict[str, list[Any]], reference: dict[str, torch.Tensor]) -> dict[str, Any]:
    model = copy.deepcopy(float_model)
    t0 = time.perf_counter()
    lowbit.quantize(model, recipe, calib_data=calib, calib_samples=samples, progress=False)
    seconds = time.perf_counter() - t0
    return {"cosine": {name: cosine_stats(embed(model, images), reference[name]) for name, images in sets.items()},
            "quantize_seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lit-fashion")
    parser.add_argument("--per-layer", help="a rule's fields as JSON (method, bits, group_size, symmetric, "
                        "options): each vision layer alone quantized with it")
    parser.add_argument("--kinds", default="conv1x1,conv,linear", help="layer kinds of --per-layer")
    parser.add_argument("--recipes", help="whole recipes to compare, ';'-separated (presets, YAML paths, short "
                        "strings)")
    parser.add_argument("--calib", default="fashion-mnist", help="calibration sets, ','-separated")
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--n", type=int, default=64, help="images per evaluation set")
    parser.add_argument("--eval", default="scenes-test,photos", help="evaluation sets: scenes-test, photos, "
                        "fashion-mnist")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "ood-layers.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.per_layer and not args.recipes:
        parser.error("give --per-layer or --recipes")

    loaders = {"fashion-mnist": lambda: resolve_dataset("fashion-mnist", split="test", limit=args.n).images,
               "scenes-test": lambda: resolve_dataset("scenes", split="test", limit=args.n).images,
               "photos": lambda: photo_crops(args.n)}
    sets = {name: loaders[name]() for name in args.eval.split(",")}
    float_model = lowbit.load(args.model)
    reference = {name: embed(float_model, images) for name, images in sets.items()}
    load_avg = os.getloadavg()[0]
    rows: list[dict[str, Any]] = []
    for calib in args.calib.split(","):
        if args.per_layer:
            rule = json.loads(args.per_layer)
            kinds = args.kinds.split(",")
            for name, kind, params in vision_layers(float_model):
                if kind not in kinds:
                    continue
                row = {"calibration": calib, "layer": name, "kind": kind, "params": params,
                       **measure(float_model, one_layer_recipe(name, kind, rule), calib, args.calib_samples, sets,
                                 reference)}
                rows.append(row)
                print(calib, name, {k: (v["mean"], v["min"]) for k, v in row["cosine"].items()}, flush=True)
        for text in (args.recipes.split(";") if args.recipes else []):
            recipe = load_recipe(text)
            row = {"calibration": calib, "recipe": text, "rules": recipe.describe(),
                   **measure(float_model, recipe, calib, args.calib_samples, sets, reference)}
            rows.append(row)
            print(calib, text, {k: (v["mean"], v["min"]) for k, v in row["cosine"].items()}, flush=True)
    write_json(args.out, {"model": args.model, "per_layer_rule": json.loads(args.per_layer or "null"),
                          "rows": rows, "env": environment(), "threads": args.threads, "load_avg_1min": load_avg,
                          "load_avg_end": [round(x, 2) for x in os.getloadavg()],
                          "command": "python benchmarks/bench_ood_layers.py " + " ".join(
                              f"--{k.replace('_', '-')} {v!r}" for k, v in vars(args).items()
                              if v is not None and k != "out")})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
