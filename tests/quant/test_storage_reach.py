"""Methods reach the storage table: every method's output is a row of ``lowbit.kernels.storage`` and names that
row's layer kind, and every row is reached by some method at some spec its grid allows."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lowbit.kernels.storage import format_of, storage_formats
from lowbit.quant.methods import QuantContext, get_method, method_names
from lowbit.quant.primitives import QuantSpec

G = torch.Generator().manual_seed(3)
N, K = 16, 64
UNIFORM = [QuantSpec(b, 32, sym) for b in (8, 6, 5, 4, 3, 2) for sym in (True, False)] + [QuantSpec(1, 32)]
# method -> the (spec, options) its grid allows
GRIDS: dict[str, list[tuple[QuantSpec, dict[str, Any]]]] = {
    **{m: [(s, {}) for s in UNIFORM] for m in ("rtn", "gptq", "awq")},
    **{m: [(s, {}) for s in UNIFORM] for m in ("smoothquant", "repq")},  # transforms over a base method (rtn)
    "binary": [(QuantSpec(1, 32), {})],
    "ternary": [(QuantSpec(2, 32), {}), (QuantSpec(2, 32), {"storage": "base3"})],
    "pbllm": [(QuantSpec(1, 32), {})],
    "pbllm-hessian": [(QuantSpec(1, 32), {})],
    "minmax": [(QuantSpec(b, 32), {}) for b in (8, 4, 3, 2)],
    "kquant": [(QuantSpec(b, 32), {}) for b in (8, 6, 5, 4, 3, 2)],
}


def _context(kind: str) -> QuantContext:
    x = torch.randn(128, K, generator=G)
    return QuantContext(inputs=x, hessian=2 / 128 * x.T @ x, kind=kind,
                        extra={"act_abs_mean": x.abs().mean(0)})


def test_every_method_has_its_grid_listed() -> None:
    # lowbit's own methods (other tests register throwaway ones in the same process)
    own = {n for n in method_names() if type(get_method(n)).__module__.startswith("lowbit.")}
    assert own == set(GRIDS)


@pytest.mark.parametrize("kind", ["linear", "conv1x1"])
def test_every_method_lands_on_a_row_and_every_row_is_reached(kind: str) -> None:
    reached = set()
    for method, grids in GRIDS.items():
        for spec, options in grids:
            w = torch.randn(N, K, generator=G)
            result = get_method(method).quantize_weight(w, spec, _context(kind), dict(options))
            row = format_of(result.packed)
            assert (result.kind or kind) == row.kind_for(kind), (method, spec, options)
            assert row.bits == spec.bits
            reached.add(row.name)
    assert reached == {r.name for r in storage_formats()}
