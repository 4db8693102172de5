"""What every ``lowbit`` verb shares: the parser (usage errors are one line, exit 2), the runner (the error
boundary: a ``LowbitError`` is one line, exit 2; any other exception is a bug: one line and the path of a full
report, exit 1, or the traceback with ``--debug`` / ``LOWBIT_DEBUG=1``), and result printing."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
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


DEBUG_FLAG = "--debug"  # anywhere on the command line: show tracebacks of internal errors


def debug_enabled(argv: Sequence[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get("LOWBIT_DEBUG", "") not in ("", "0")


def write_crash_report(exc: BaseException, argv: Sequence[str]) -> Path | None:
    """The full traceback, the command line and versions in ``$LOWBIT_HOME/crash-reports`` (else the temp
    directory); None when neither can be written."""
    import tempfile
    import time
    import traceback

    from lowbit.version import __version__

    text = (f"lowbit {__version__}, python {sys.version.split()[0]}\ncommand: lowbit {' '.join(argv)}\n\n"
            + "".join(traceback.format_exception(exc)))
    home = Path(os.environ.get("LOWBIT_HOME") or Path.home() / ".cache" / "lowbit")
    for base in [home / "crash-reports", Path(tempfile.gettempdir()) / "lowbit-crash-reports"]:
        try:
            base.mkdir(parents=True, exist_ok=True)
            path = base / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
            path.write_text(text)
            return path
        except OSError:
            continue
    return None


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and call the chosen verb: a ``LowbitError`` (or an ``OSError`` naming a path) becomes one
    line and exit code 2; an internal error one line plus the path of its report and exit code 1 (the traceback
    with ``--debug``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)
    args = parser.parse_args([a for a in argv if a != DEBUG_FLAG])
    try:
        _check_json_output(args)
        args.func(args)
    except LowbitError as exc:
        print(f"lowbit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.filename is None or debug:
            return _internal_error(exc, argv, debug)
        # a path the user named or the environment points at (missing, unreadable, full disk): their input
        print(f"lowbit: error: cannot use {str(exc.filename)!r}: {exc.strerror or exc}; accepted: an existing, "
              "readable path (and a writable place for outputs)", file=sys.stderr)
        return 2
    except Exception as exc:
        return _internal_error(exc, argv, debug)
    return 0


def _internal_error(exc: Exception, argv: Sequence[str], debug: bool) -> int:
    """A bug, not the user's input: one line saying where the details are (the traceback with --debug)."""
    if debug:
        raise exc
    report = write_crash_report(exc, argv)
    first = " ".join(str(exc).split())[:200]
    where = f"full report: {report}" if report else "run again with --debug for the traceback"
    print(f"lowbit: internal error ({type(exc).__name__}: {first}); {where} (please report it)", file=sys.stderr)
    return 1


def _check_json_output(args: argparse.Namespace) -> None:
    """A ``--json`` path is judged before the verb runs (not after minutes of work)."""
    from lowbit.io import check_output

    if getattr(args, "json", None) is not None:
        check_output(args.json, "json-result", overwrite=getattr(args, "overwrite", False), flag="--json")


def is_main_process() -> bool:
    """True unless this is a non-zero rank under torchrun (only rank 0 prints summaries)."""
    import os

    return os.environ.get("RANK", "0") == "0"


def exit_process(code: int) -> NoReturn:
    """End a CLI process with ``code``. Under torchrun (``WORLD_SIZE`` > 1) the interpreter's teardown is skipped
    once output is flushed: a rank torn down by it sometimes aborts in C++ ("terminate called without an active
    exception", seen in CI after the run had finished and its checkpoints were written), which would turn a
    finished distributed run into a failed one."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def run_verbs(register: Callable[[Any], None], description: str | None, argv: Sequence[str] | None = None) -> int:
    """A stand-alone ``lowbit`` with only the verbs ``register`` adds (what ``torchrun -m lowbit.cli.X`` runs):
    the same parser, errors and exit codes as the full command."""
    parser = Parser(prog="lowbit", description=description)
    register(parser.add_subparsers(dest="command", required=True, parser_class=Parser))
    return run(parser, argv)
