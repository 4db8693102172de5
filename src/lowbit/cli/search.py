"""The ``lowbit search`` verb (``lowbit.api.search``)::

    lowbit search lit-fashion --budget-bits 3 --task fashion-mnist --limit 2000 --out lit-3bit.yaml
    lowbit search lit-fashion --budget-mb 14 --widths 2,3,4 --out lit-14mb.yaml
    lowbit search llava-fashion-hd --base 'language=w4g32:gptq,vision=w8,projector=w8' --budget-bits 4 \
        --widths 3,4,5,6,8 --calib-data fashion-mnist --probe-data fashion-vqa --sensitivity fisher --refine 24 \
        --out llava-4bit.yaml
    lowbit quantize lit-fashion --recipe lit-3bit.yaml --out lit-3bit
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from lowbit import api
from lowbit.api import DEFAULT_CALIB_SAMPLES
from lowbit.cli.base import OVERWRITE_HELP
from lowbit.errors import LowbitError


def _widths(text: str) -> list[int]:
    try:
        return [int(w) for w in text.split(",")]
    except ValueError:
        raise LowbitError(f"--widths {text!r}; accepted: comma-separated bit widths, e.g. 2,3,4,8") from None


def cmd_search(args: argparse.Namespace) -> None:
    """Search a mixed-precision recipe for MODEL under a budget (per-layer widths from measured sensitivity)."""
    result = api.search(args.model, budget_bits=args.budget_bits, budget_mb=args.budget_mb,
                        budget_ms=args.budget_ms, task=args.task, method=args.method, widths=_widths(args.widths),
                        group_size=args.group_size, base=args.base, calib_data=args.calib_data,
                        calib_samples=args.calib_samples, seed=args.seed, limit=args.limit, out=args.out,
                        overwrite=args.overwrite, measure=not args.no_measure, progress=args.progress,
                        probe_data=args.probe_data, sensitivity=args.sensitivity,
                        refine_measures=args.refine)
    e = result["expected"]
    print(f"{e['avg_bits']:.3f} bits per searched weight, {e['tensor_bytes'] / 1e6:.3f} MB of tensors, "
          f"{'?' if e['ms'] is None else format(e['ms'], '.2f')} kernel ms; weights by width {e['params_by_width']}")
    if "measured" in result:
        print(f"measured: {json.dumps(result['measured'])}")
    if "refinement" in result:
        r = result["refinement"]
        print(f"refined: probe loss {r['start_loss']:.4g} -> {r['loss']:.4g} ({r['accepted']} moves accepted of "
              f"{r['measures']} measurements)")
    print(f"wrote {args.out}")


def register_search_cli(sub: Any) -> None:
    """Add ``search`` to ``lowbit``'s sub-command parser."""
    p = sub.add_parser("search", help=(cmd_search.__doc__ or "").splitlines()[0], description=cmd_search.__doc__)
    p.set_defaults(func=cmd_search)
    p.add_argument("model", help="built-in name or model directory (float)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-bits", type=float, help="average bits per searched weight (codes, scales apart)")
    budget.add_argument("--budget-mb", type=float, help="megabytes (10^6 bytes) of the model's stored tensors")
    budget.add_argument("--budget-ms", type=float, help="summed kernel ms of the searched layers at batch 1")
    p.add_argument("--task", help="also evaluate the searched recipe on this task (after save + load)")
    p.add_argument("--limit", type=int, help="--task: the first N samples only")
    p.add_argument("--method", default="gptq", help="quantization method of the searched layers (gptq, rtn, ...)")
    p.add_argument("--widths", default="2,3,4,8", help="candidate bit widths")
    p.add_argument("--group-size", type=int, default=32, help="group size of the searched layers")
    p.add_argument("--base", default="w4", help="recipe fixing the other layers; its lowest-width rules are searched")
    p.add_argument("--calib-data", help="calibration data (default: the model family's own set)")
    p.add_argument("--calib-samples", type=int, default=DEFAULT_CALIB_SAMPLES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe-data", help="a llava: probe on this VQA set's train-split image + question prompts "
                   "(fashion-vqa, shapes-vqa) instead of the calibration captions")
    p.add_argument("--sensitivity", default="kl", help="kl (measured per layer and width) or fisher (the probe's "
                   "diagonal Fisher, one pass; needs --probe-data)")
    p.add_argument("--refine", type=int, default=0, help="measure up to N whole assignments on the probe, keeping "
                   "a move only when the measured loss falls (0: the knapsack's answer as is)")
    p.add_argument("--no-measure", action="store_true", help="write the recipe without quantizing with it")
    p.add_argument("--progress", action="store_true", help="print each layer's sensitivity as it is measured")
    p.add_argument("--out", required=True, help="the recipe YAML to write")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
