"""lowbit's torch-free runtime: a packed checkpoint of a Llama-layout causal LM run on the kernels' C++ core
from numpy + ctypes (``LiteLM``), without importing torch -- for a small resident set.

Importing this package loads nothing heavy; ``LiteLM`` is imported on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LiteLM"]


def __getattr__(name: str) -> Any:
    if name == "LiteLM":
        from lowbit.runtime.lite import LiteLM

        return LiteLM
    raise AttributeError(f"module 'lowbit.runtime' has no attribute {name!r}")
