"""Fixtures of the fuzz suite: a real packed checkpoint of the tiny test family (made once, in a second)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

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
