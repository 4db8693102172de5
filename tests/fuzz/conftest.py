
"""Fixtures of the fuzz suite: a real packed checkpoint of the tiny test family (made once, in a second)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from tests.models.tiny_family import write_tiny_family


@pytest.fixture(scope="session")
def real_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lowbit.workflows.load import load
    from lowbit.workflows.quantize import quantize, save

    root = tmp_path_factory.mktemp("fuzz-ck")
    model = load(f"tiny-family:{write_tiny_family(root / 'src')}")
    return save(model, root / "ck", report=quantize(model, "*=w4g32", progress=False))


@pytest.fixture(scope="session")
def real_manifest(real_checkpoint: Path) -> dict[str, Any]:
    return json.loads((real_checkpoint / "manifest.json").read_text())


# CI must be reproducible: examples come from a fixed derivation, not a fresh random seed each run (a random
# run once failed CI on a case no earlier run had drawn). Explore with `--hypothesis-seed=N` or the "explore"
# profile (`--hypothesis-profile=explore`); add what it finds to corpus/.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("ci")
