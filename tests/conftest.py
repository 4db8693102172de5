"""Shared fixtures: the real default model, loaded once per session (slow tests only)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def lit_model():
    from lowbit.models import load_model

    return load_model("lit-fashion")
