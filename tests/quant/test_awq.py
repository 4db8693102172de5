"""AWQ on a synthetic layer with a few large-magnitude input channels: beats RTN; alpha = 0 is RTN."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.quant.awq import awq_search
from lowbit.quant.gptq import hessian_from_inputs
from lowbit.quant.methods import QuantContext, get_method
from lowbit.quant.primitives import QuantSpec, fake_quantize


def outlier_layer(n: int = 64, k: int = 128, s: int = 1024, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight [N, K] and inputs [S, K] where 4 channels are ~30x larger than the rest."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s, k, generator=g)
    x[:, [3, 17, 60, 101]] *= 30.0
    w = torch.randn(n, k, generator=g) * 0.05
    return w, x


def out_err(x: torch.Tensor, w: torch.Tensor, result) -> float:
    """||X Wᵀ - (X / s) Q(W s)ᵀ|| of a QuantResult."""
    xs = x if result.input_scale is None else x / result.input_scale
    q = result.packed.dequantize()
    return float((x @ w.T - xs @ q.T).norm())


@pytest.fixture(scope="module")
def layer() -> tuple[torch.Tensor, torch.Tensor]:
    return outlier_layer()


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("clip", [False, True])
def test_awq_beats_rtn_with_outlier_channels(layer, bits: int, group_size: int | None, clip: bool) -> None:
    w, x = layer
    spec = QuantSpec(bits, group_size)
    rtn = get_method("rtn").quantize_weight(w, spec, QuantContext(), {})
    awq = get_method("awq").quantize_weight(w, spec, QuantContext(inputs=x), {"clip": clip})
    assert awq.input_scale is not None and awq.input_scale.shape == (128,)
    assert out_err(x, w, awq) < 0.9 * out_err(x, w, rtn)


def test_alpha_zero_reproduces_rtn(layer) -> None:
    w, x = layer
    spec = QuantSpec(4, 32)
    rtn = get_method("rtn").quantize_weight(w, spec, QuantContext(), {}).packed
    awq = get_method("awq").quantize_weight(w, spec, QuantContext(inputs=x), {"alpha": 0.0, "clip": False})
    assert awq.input_scale is None
    assert torch.equal(awq.packed.qweight, rtn.qweight) and torch.equal(awq.packed.scales, rtn.scales)


def test_search_includes_rtn_and_clip_never_hurts_per_channel(layer) -> None:
    w, x = layer
    spec = QuantSpec(3)
    out = awq_search(w, spec, x, clip=False)
    assert 0.0 in out.errors and out.errors[out.alpha] <= out.errors[0.0]
    assert out.alpha > 0
    clipped = awq_search(w, spec, x, clip=True)
    s = clipped.input_scale

    def err(o) -> float:
        return float((x @ w.T - (x / s) @ fake_quantize(o.scaled_weight, spec, o.scales, o.zeros).T).norm())

    assert err(clipped) <= err(out) + 1e-6  # per-channel: the clip choice is exact per output row


def test_hessian_only_and_extra_act_mean(layer) -> None:
    w, x = layer
    spec = QuantSpec(4)
    ctx = QuantContext(inputs=x[:256], hessian=hessian_from_inputs(x), extra={"act_abs_mean": x.abs().mean(0)})
    result = get_method("awq").quantize_weight(w, spec, ctx, {})
    rtn = get_method("rtn").quantize_weight(w, spec, QuantContext(), {})
    assert out_err(x, w, result) < out_err(x, w, rtn)
    only_h = awq_search(w, spec, None, hessian_from_inputs(x))
    assert only_h.input_scale.shape == (128,)


def test_conv1x1_weight_and_fp16_exact_scale(layer) -> None:
    w, x = layer
    result = get_method("awq").quantize_weight(w.reshape(64, 128, 1, 1), QuantSpec(4), QuantContext(inputs=x), {})
    assert result.packed.shape == (64, 128, 1, 1)
    assert torch.equal(result.input_scale, result.input_scale.half().float())


def test_user_errors(layer) -> None:
    w, x = layer
    method = get_method("awq")
    assert method.needs_calibration
    with pytest.raises(LowbitError, match="calibration"):
        method.quantize_weight(w, QuantSpec(4), QuantContext(), {})
    with pytest.raises(LowbitError, match="alpha"):
        method.quantize_weight(w, QuantSpec(4), QuantContext(inputs=x), {"alpha": 2.0})
    with pytest.raises(LowbitError, match="grid"):
        method.quantize_weight(w, QuantSpec(4), QuantContext(inputs=x), {"grid": 3})
    with pytest.raises(LowbitError, match="features"):
        method.quantize_weight(w, QuantSpec(4), QuantContext(inputs=x[:, :10]), {})
