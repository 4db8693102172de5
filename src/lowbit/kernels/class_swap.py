"""Class swapping: a module keeps its state and gains a mixin's behaviour by becoming an instance of a class
derived from (mixin, its own class), the trick of ``torch.nn.utils.parametrize``. Quantized weights
(``QuantWeightParam`` and its format variants), static same-padding convs and the depthwise / conv-GEMM kernel
layers (``swap_eligible_``) use it; one cache serves all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_CACHE: dict[tuple[type, type], type] = {}


def mixed_class(mixin: type, base: type, name: str) -> type:
    """The class ``name`` deriving from ``mixin`` then ``base``, made once per (mixin, base) pair."""
    key = (mixin, base)
    if key not in _CACHE:
        _CACHE[key] = type(name, (mixin, base), {"__module__": mixin.__module__})
    return _CACHE[key]


class DropsCaches:
    """Mixin: deepcopy and pickle leave out the instance attributes named in ``_cache_attrs`` (extension objects
    built from the module's tensors, which cannot be copied; a copy rebuilds them on first use)."""

    _cache_attrs: tuple[str, ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())  # type: ignore[misc]
        for name in self._cache_attrs:
            state.pop(name, None)
        return state


def swap_eligible_(model: Any, mixin: Any, eligible: Callable[[Any], bool]) -> int:
    """Re-class every module of ``model`` (an ``nn.Module``) for which ``eligible`` holds to
    ``mixin.kernel_class(its class)``; returns how many. Idempotent: modules already mixed are skipped."""
    count = 0
    for m in model.modules():
        if not isinstance(m, mixin) and eligible(m):
            m.__class__ = mixin.kernel_class(type(m))
            count += 1
    return count
