"""The record a resumable run keeps in its directory, so a resume with other arguments is refused.

Shared by ``lowbit qat`` and ``lowbit finetune``: the first run writes ``record`` (the arguments that decide the
result) plus every argument; a later run into the same directory must name the same record.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError
from lowbit.io import write_json
from lowbit.train import distributed as D


def check_run_record(out: str, run_file: str, verb: str, record: dict[str, Any], args: dict[str, Any]) -> None:
    """Refuse to resume ``out`` if it holds a different ``verb`` run; record this one otherwise (rank 0)."""
    path = Path(out) / run_file
    if not path.is_file():
        if D.is_main():
            write_json(path, {**record, "args": args})
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise LowbitError(f"{str(path)!r} is not a readable {verb} run record ({type(err).__name__}); accepted: "
                          f"the file a previous `lowbit {verb}` wrote, or a new --out directory") from None
    if not isinstance(saved, dict):
        raise LowbitError(f"{str(path)!r} is not a {verb} run record (a JSON object); accepted: a new --out")
    diff = {k: (saved.get(k), v) for k, v in record.items() if saved.get(k) != v}
    if diff:
        listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise LowbitError(f"{out} holds a different {verb} run ({listed}); accepted: the same arguments, "
                          "or a new --out directory")
