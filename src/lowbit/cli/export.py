"""The ``lowbit export`` verb (``lowbit.api.export``)::

    lowbit export out/smollm-w4 --format gguf --out smollm-q4_0.gguf
    lowbit export lit-fashion --recipe w4 --format onnx --out lit-w4-onnx
"""

from __future__ import annotations

import argparse
from typing import Any

from lowbit import api
from lowbit.cli.base import OVERWRITE_HELP
from lowbit.io import write_result_json


def cmd_export(args: argparse.Namespace) -> None:
    """Export MODEL for another runtime: GGUF (llama.cpp), ONNX (ONNX Runtime) or HF compressed-tensors."""
    options: dict[str, Any] = {}
    for flag in ("requantize", "dequantize"):
        if getattr(args, flag):
            options[flag] = True
    if args.accuracy_level is not None:
        options["accuracy_level"] = args.accuracy_level
    report = api.export(args.model, args.format, args.out, recipe=args.recipe, overwrite=args.overwrite, **options)
    if args.json:
        write_result_json(args.json, report, overwrite=args.overwrite)
    mapped = report.get("tensor_types") or report.get("ops") or {}
    print(f"wrote {report['out']} ({report['file_bytes'] / 1e6:.2f} MB, {args.format}); "
          f"exact: {report.get('exact', 'see report')}" + (f"; {mapped}" if mapped else ""))
    for row in report.get("requantized", []) + report.get("dequantized", []):
        print(f"  not exact: {row}")
    if args.json:
        print(f"wrote {args.json}")


def register_export_cli(sub: Any) -> None:
    """Add ``export`` to ``lowbit``'s sub-command parser."""
    p = sub.add_parser("export", help=(cmd_export.__doc__ or "").splitlines()[0], description=cmd_export.__doc__)
    p.set_defaults(func=cmd_export)
    p.add_argument("model", help="a packed checkpoint directory, or a built-in name / model directory with --recipe")
    p.add_argument("--format", required=True, choices=["gguf", "onnx", "hf"])
    p.add_argument("--out", required=True, help="output file (gguf) or directory (onnx, hf); written atomically")
    p.add_argument("--recipe", help="quantize MODEL with this recipe first (preset, YAML path or short string)")
    p.add_argument("--requantize", action="store_true",
                   help="gguf: re-quantize layers whose grid has no exact GGUF type (the added error is reported)")
    p.add_argument("--dequantize", action="store_true",
                   help="hf: write layers compressed-tensors cannot hold as float (listed in the report)")
    p.add_argument("--accuracy-level", type=int,
                   help="onnx: MatMulNBits accuracy_level (0, the default: float compute, lowbit's quantized model "
                        "exactly; 4: int8 activations where and as lowbit's CPU kernels round them)")
    p.add_argument("--json", help="write the export report here")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
