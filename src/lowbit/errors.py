"""User-facing errors: the CLI turns these into one line and exit code 2."""

from __future__ import annotations


class LowbitError(Exception):
    """A problem with the user's input (unknown name, bad file, malformed recipe).

    The message names what went wrong, what was received and what is accepted.
    """


def unknown_choice(kind: str, received: str, accepted: list[str] | tuple[str, ...]) -> LowbitError:
    """Build the standard 'unknown X' error, e.g. ``unknown task 'foo'; choose one of: a, b``."""
    return LowbitError(f"unknown {kind} {received!r}; choose one of: {', '.join(sorted(accepted))}")
