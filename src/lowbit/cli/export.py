"""The ``lowbit export`` verb (``lowbit.api.export``)::

    lowbit export out/smollm-w4 --format gguf --out smollm-q4_0.gguf
    lowbit export lit-fashion --recipe w4 --format onnx --out lit-w4-onnx
"""

from __future__ import annotations

import argparse
from typing import Any

from lowbit import api
from lowbit.cli.base import OVERWRITE_HELP, print_json_or_table


def cmd_export(args: argparse.Namespace) -> None:
    """Export MODEL for another runtime: GGUF (llama.cpp), ONNX (ONNX Runtime) or HF compressed-tensors."""
    options: dict[str, Any] = {}
    if args.requantize:
        options["requantize"] = True
    report = api.export(args.model, args.format, args.out, recipe=args.recipe, overwrite=args.overwrite, **options)
    print_json_or_table(report, args.json, overwrite=args.overwrite)


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
    p.add_argument("--json", help="write the export report here")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
