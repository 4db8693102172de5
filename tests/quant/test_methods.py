"""The method registry and the RTN method."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.quant.methods import METHODS, QuantContext, QuantMethod, get_method, method_names
from lowbit.quant.primitives import QuantSpec, fake_quantize


def test_rtn_is_registered_and_matches_fake_quant() -> None:
    assert "rtn" in method_names()
    rtn = get_method("rtn")
    assert isinstance(rtn, QuantMethod) and not rtn.needs_calibration
    w = torch.randn(8, 64)
    result = rtn.quantize_weight(w, QuantSpec(3, 16), QuantContext(), {})
    assert result.input_scale is None
    assert torch.equal(result.packed.dequantize(), fake_quantize(w, QuantSpec(3, 16)))
    with pytest.raises(LowbitError, match=r"unknown option\(s\) 'foo' for method 'rtn'; accepted: \(none\)"):
        rtn.quantize_weight(w, QuantSpec(4), QuantContext(), {"foo": 1})


def test_unknown_method_lists_registered() -> None:
    with pytest.raises(LowbitError, match=r"unknown quantization method 'nope'; choose one of: .*rtn"):
        get_method("nope")
    assert set(METHODS.names()) >= {"rtn"}
