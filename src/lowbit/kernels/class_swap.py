"""Class swapping: a module keeps its state and gains a mixin's behaviour by becoming an instance of a class
derived from (mixin, its own class), the trick of ``torch.nn.utils.parametrize``. Quantized weights
(``QuantWeightParam`` and its format variants) and static same-padding convs use it; one cache serves all.
"""

from __future__ import annotations

_CACHE: dict[tuple[type, type], type] = {}


def mixed_class(mixin: type, base: type, name: str) -> type:
    """The class ``name`` deriving from ``mixin`` then ``base``, made once per (mixin, base) pair."""
    key = (mixin, base)
    if key not in _CACHE:
        _CACHE[key] = type(name, (mixin, base), {"__module__": mixin.__module__})
    return _CACHE[key]
