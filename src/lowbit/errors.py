"""User-facing errors: the CLI turns these into one line and exit code 2."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class LowbitError(Exception):
    """A problem with the user's input (unknown name, bad file, malformed recipe).

    The message names what went wrong, what was received and what is accepted.
    """


def unknown_choice(kind: str, received: str, accepted: list[str] | tuple[str, ...]) -> LowbitError:
    """Build the standard 'unknown X' error, e.g. ``unknown task 'foo'; choose one of: a, b``."""
    return LowbitError(f"unknown {kind} {received!r}; choose one of: {', '.join(sorted(accepted))}")


def check_options(what: str, options: Mapping[str, Any], accepted: Iterable[str]) -> None:
    """Refuse unknown keyword options with one line naming them and the accepted ones.

    Example:
        >>> check_options("lowbit.load('lit-fashion')", {"prune_raito": 0.5}, ["heads"])
        Traceback (most recent call last):
        lowbit.errors.LowbitError: lowbit.load('lit-fashion') does not take prune_raito; accepted options: heads
    """
    allowed = set(accepted)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise LowbitError(f"{what} does not take {', '.join(unknown)}; accepted options: "
                          f"{', '.join(sorted(allowed)) or '(none)'}")


def keyword_parameters(fn: Callable[..., Any], skip: Iterable[str] = ()) -> list[str]:
    """The names ``fn`` accepts as keywords (a ``**kwargs`` catch-all is not an accepted name: options are
    validated where they are finally used, never swallowed)."""
    import inspect

    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    skipped = set(skip)
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds and p.name not in skipped]


def dataclass_from_options(cls: type[T], what: str, options: Mapping[str, Any]) -> T:
    """``cls(**options)`` for a dataclass, refusing unknown fields with one line instead of a TypeError."""
    import dataclasses

    check_options(what, options, [f.name for f in dataclasses.fields(cls)])  # type: ignore[arg-type]
    return cls(**options)
