"""Shared by the kernel tests: skip without the compiled kernels; run a test once per instruction set."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lowbit.kernels import fast


def needs_kernels() -> None:
    if not fast.is_available():
        pytest.skip(f"kernels unavailable: {fast.unavailable_reason()}")


@pytest.fixture(params=["scalar", "avx2", "avx512vnni"])
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test on one instruction set (skipped where the CPU lacks it), then restore the default."""
    needs_kernels()
    if request.param not in fast.available_isas():
        pytest.skip(f"{request.param} not supported on this CPU")
    before = fast.current_isa()
    fast.set_isa(request.param)
    yield request.param
    fast.set_isa(before)
