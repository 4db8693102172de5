"""What every ``lowbit`` verb shares: the parser (usage errors are one line, exit 2), the runner (a
``LowbitError`` is one line, exit 2), and result printing."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from lowbit import api
from lowbit.errors import LowbitError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (problem + accepted form) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


OVERWRITE_HELP = ("replace an existing output that lowbit did not write (a non-empty directory, another file); "
                  "never the source model")


def print_json_or_table(result: dict[str, Any] | list[dict[str, Any]], json_path: str | None,
                        overwrite: bool = False) -> None:
    from lowbit.io import write_result_json

    if json_path:
        write_result_json(json_path, result, overwrite=overwrite)
    for row in result if isinstance(result, list) else [result]:
        print(api.format_table(row))
    if json_path:
        print(f"wrote {json_path}")


def act_block_value(text: str) -> int | str:
    """``--act-block`` value: ``row`` or a positive multiple of 32 (checked by the API, one clear line)."""
    return text if text == "row" or not text.lstrip("-").isdigit() else int(text)


def add_act_block(p: argparse.ArgumentParser) -> None:
    p.add_argument("--act-block", type=act_block_value, default=None, metavar="{row,N}",
                   help="packed layers: activation quantization blocks of the CPU kernels, 'row' (one scale per row: "
                        "faster at large batch) or a multiple of 32 inputs (default 128)")


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and call the chosen verb: a ``LowbitError`` becomes one line and exit code 2."""
    args = parser.parse_args(argv)
    try:
        _check_json_output(args)
        args.func(args)
    except LowbitError as exc:
        print(f"lowbit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    return 0


def _check_json_output(args: argparse.Namespace) -> None:
    """A ``--json`` path is judged before the verb runs (not after minutes of work)."""
    from lowbit.io import check_output

    if getattr(args, "json", None) is not None:
        check_output(args.json, "json-result", overwrite=getattr(args, "overwrite", False), flag="--json")


def is_main_process() -> bool:
    """True unless this is a non-zero rank under torchrun (only rank 0 prints summaries)."""
    import os

    return os.environ.get("RANK", "0") == "0"


def run_verbs(register: Callable[[Any], None], description: str | None, argv: Sequence[str] | None = None) -> int:
    """A stand-alone ``lowbit`` with only the verbs ``register`` adds (what ``torchrun -m lowbit.cli.X`` runs):
    the same parser, errors and exit codes as the full command."""
    parser = Parser(prog="lowbit", description=description)
    register(parser.add_subparsers(dest="command", required=True, parser_class=Parser))
    return run(parser, argv)
