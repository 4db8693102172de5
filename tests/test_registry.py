"""The name registry: unknown names fail with the choices; class entries are found through the MRO."""

from __future__ import annotations

import pytest
from torch import nn

from lowbit.errors import LowbitError
from lowbit.registry import Registry, qualname


def test_get_unknown_lists_the_choices() -> None:
    r: Registry[int] = Registry("thing")
    r.register("a")(1)
    with pytest.raises(LowbitError, match="unknown thing 'b'.*a"):
        r.get("b")


def test_for_class_finds_the_nearest_registered_base() -> None:
    r: Registry[str] = Registry("activation")
    r.register(qualname(nn.Hardtanh))("hardtanh")
    r.register(qualname(nn.Module))("any module")
    assert qualname(nn.ReLU6) == "torch.nn.modules.activation.ReLU6"
    assert r.for_class(nn.ReLU6) == "hardtanh"  # ReLU6 -> Hardtanh -> Module: the nearest wins
    assert r.for_class(nn.ReLU) == "any module"
    assert Registry[str]("empty").for_class(nn.ReLU) is None
