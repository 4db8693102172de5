"""Text calibration and evaluation data: plain text files and chat JSONL.

- a ``.txt`` / ``.md`` file or one without a suffix (``/usr/share/common-licenses/GPL-3``): its text, whole
  (language models cut it into token windows);
- a ``.jsonl`` file of conversations: each line an object with ``messages`` (a list of ``{"role", "content"}``,
  OpenAI / ShareGPT-after-conversion style) or a plain ``text`` field.

``read_text_items`` returns strings and conversations (lists of messages) in file order; the model renders
conversations in its own chat template.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError

TEXT_SUFFIXES = (".txt", ".md", "")
Message = dict[str, str]
TextItem = str | list[Message]
_ACCEPTED = ("a .txt/.md file (or one without a suffix), or a .jsonl file whose lines are objects with "
             "'messages' (a list of {role, content}) or 'text'")


def is_text_data(path: str | os.PathLike[str]) -> bool:
    """A text file, or a JSONL file whose first non-empty line has ``messages`` or ``text`` and no image column."""
    p = Path(path)
    if not p.is_file():
        return False
    if p.suffix.lower() in TEXT_SUFFIXES:
        return True
    if p.suffix.lower() != ".jsonl":
        return False
    try:
        with p.open(encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        row = json.loads(first) if first else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(row, dict) and ("messages" in row or "text" in row) and not {"image", "file", "path"} & set(row)


def _messages(raw: Any, where: str) -> list[Message]:
    if not isinstance(raw, list) or not raw or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in raw):
        raise LowbitError(f"{where}: 'messages' must be a non-empty list of {{role, content}} strings; accepted: "
                          f"{_ACCEPTED}")
    return [{"role": m["role"], "content": m["content"]} for m in raw]


def read_text_items(path: str | os.PathLike[str], limit: int | None = None) -> list[TextItem]:
    """The texts and conversations of ``path`` (see the module docstring); ``limit`` items at most."""
    p = Path(path)
    try:
        if p.suffix.lower() != ".jsonl":  # plain text, whatever its name (read_text_items is asked for text)
            text = p.read_text(encoding="utf-8")
            if not text.strip():
                raise LowbitError(f"{str(p)!r} is empty; accepted: {_ACCEPTED}")
            return [text]
        items: list[TextItem] = []
        with p.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if limit is not None and len(items) >= limit:
                    break
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise LowbitError(f"{p}:{lineno} is not valid JSON ({exc.msg}); accepted: {_ACCEPTED}") from None
                if isinstance(row, dict) and "messages" in row:
                    items.append(_messages(row["messages"], f"{p}:{lineno}"))
                elif isinstance(row, dict) and isinstance(row.get("text"), str):
                    items.append(row["text"])
                else:
                    raise LowbitError(f"{p}:{lineno} has neither 'messages' nor a 'text' string; accepted: {_ACCEPTED}")
    except (OSError, UnicodeDecodeError) as exc:
        raise LowbitError(f"cannot read {str(p)!r} ({exc}); accepted: UTF-8 {_ACCEPTED}") from None
    if not items:
        raise LowbitError(f"{str(p)!r} holds no text; accepted: {_ACCEPTED}")
    return items
