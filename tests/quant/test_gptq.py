"""GPTQ on a synthetic layer with correlated, heavy-tailed inputs: beats RTN and packs exactly."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.quant.gptq import gptq_quantize, gptq_quantize_grouped, hessian_from_inputs
from lowbit.quant.methods import QuantContext, get_method
from lowbit.quant.primitives import QuantSpec, fake_quantize


def correlated_layer(n: int = 48, k: int = 128, s: int = 2048, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight [N, K] and inputs X = Z @ A [S, K]: anisotropic mixing plus a few heavy-tailed channels."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(s, k, generator=g)
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=g))
    a = q * torch.logspace(0, -2, k).unsqueeze(0)  # [K, K], singular values 1 .. 0.01
    x = z @ a.T + 0.3 * z  # correlated channels
    x[:, :4] *= torch.distributions.StudentT(2.0).sample((s, 4)).abs().clamp(max=20) + 1  # heavy tails
    w = torch.randn(n, k, generator=g) * 0.05
    return w, x


def out_err(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    return float((x @ (w - q).T).norm())


@pytest.fixture(scope="module")
def layer() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    w, x = correlated_layer()
    return w, x, hessian_from_inputs(x)


@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("group_size", [None, 32])
def test_gptq_beats_rtn(layer, bits: int, group_size: int | None) -> None:
    w, x, h = layer
    spec = QuantSpec(bits, group_size)
    rtn = out_err(x, w, fake_quantize(w, spec))
    gptq = out_err(x, w, gptq_quantize(w, h, spec).weight)
    assert gptq < 0.9 * rtn, (gptq, rtn)


@pytest.mark.parametrize("group_size", [None, 32])
def test_act_order_beats_rtn_and_packs_in_standard_format(layer, group_size: int | None) -> None:
    w, x, h = layer
    spec = QuantSpec(3, group_size)
    out = gptq_quantize(w, h, spec, act_order=True)
    assert out.perm is not None and not torch.equal(out.perm, torch.arange(w.shape[1]))
    assert out_err(x, w, out.weight) < 0.9 * out_err(x, w, fake_quantize(w, spec))
    # static groups: every group's scales are the RTN scales of the unpermuted weight
    rtn_packed = get_method("rtn").quantize_weight(w, spec, QuantContext(), {}).packed
    result = get_method("gptq").quantize_weight(w, spec, QuantContext(hessian=h), {"act_order": True})
    assert torch.equal(result.packed.scales, rtn_packed.scales)
    assert torch.equal(result.packed.dequantize(), out.weight)


@pytest.mark.parametrize(
    "spec", [QuantSpec(4, None), QuantSpec(3, 32), QuantSpec(2, 48), QuantSpec(4, 32, symmetric=False)]
)
def test_packed_dequantization_is_exactly_gptq_weight(layer, spec: QuantSpec) -> None:
    w, x, h = layer
    out = gptq_quantize(w, h, spec, block_size=40)  # block not a multiple of the group: realigned
    result = get_method("gptq").quantize_weight(w, spec, QuantContext(inputs=x), {"block_size": 40})
    assert result.input_scale is None
    assert torch.equal(result.packed.dequantize(), out.weight)
    assert torch.equal(result.packed.codes(), out.codes)
    assert result.packed.group_size == spec.group_size_for(w.shape[1])


def test_dead_inputs_get_zero_weight() -> None:
    w, x = correlated_layer(n=16, k=64, s=512)
    x[:, 5] = 0.0
    out = gptq_quantize(w, hessian_from_inputs(x), QuantSpec(4, 16))
    assert torch.all(out.weight[:, 5] == 0)


def test_conv1x1_weight_keeps_its_shape() -> None:
    w, x = correlated_layer(n=16, k=32, s=256)
    conv_w = w.reshape(16, 32, 1, 1)
    result = get_method("gptq").quantize_weight(conv_w, QuantSpec(4), QuantContext(inputs=x), {})
    assert result.packed.shape == (16, 32, 1, 1)
    assert torch.equal(result.packed.dequantize(), gptq_quantize(w, hessian_from_inputs(x), QuantSpec(4)).weight)


def test_rank_deficient_hessian_is_dampened() -> None:
    w, x = correlated_layer(n=8, k=64, s=8)  # 8 rows for 64 features: singular XᵀX
    out = gptq_quantize(w, hessian_from_inputs(x), QuantSpec(4), percdamp=0.0)
    assert torch.isfinite(out.weight).all()


def test_user_errors() -> None:
    method = get_method("gptq")
    assert method.needs_calibration
    w = torch.randn(4, 8)
    with pytest.raises(LowbitError, match="calibration"):
        method.quantize_weight(w, QuantSpec(4), QuantContext(), {})
    with pytest.raises(LowbitError, match="blocksize"):
        method.quantize_weight(w, QuantSpec(4), QuantContext(inputs=torch.randn(16, 8)), {"blocksize": 4})
    with pytest.raises(LowbitError, match="act_order"):
        method.quantize_weight(w, QuantSpec(4), QuantContext(inputs=torch.randn(16, 8)), {"act_order": "yes"})
    with pytest.raises(LowbitError, match="does not match"):
        gptq_quantize(w, torch.eye(9), QuantSpec(4))


@pytest.mark.parametrize("spec", [QuantSpec(4, None), QuantSpec(3, 32), QuantSpec(2, 32)], ids=lambda s: s.short())
@pytest.mark.parametrize("act_order", [False, True])
def test_clip_search_reduces_layer_error_vs_plain_gptq(spec: QuantSpec, act_order: bool) -> None:
    torch.manual_seed(0)
    w, x = correlated_layer(seed=3)
    w = torch.distributions.StudentT(3.0).sample(w.shape) * 0.05  # heavy-tailed weights, as in real layers
    h = hessian_from_inputs(x)
    plain = gptq_quantize(w, h, spec, act_order=act_order)
    clipped = gptq_quantize(w, h, spec, act_order=act_order, clip_search=True)
    assert out_err(x, w, clipped.weight) < 0.97 * out_err(x, w, plain.weight)  # measured 0.89-0.95
    result = get_method("gptq").quantize_weight(
        w, spec, QuantContext(hessian=h), {"clip_search": True, "act_order": act_order})
    assert torch.equal(result.packed.dequantize(), clipped.weight)  # what is stored is what was measured


def _depthwise_layer(c: int = 24, kk: int = 9, s: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise weight [C, kk] and per-channel correlated patch rows [C, S, kk]."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(c, s, kk, generator=g)
    mix = torch.randn(c, kk, kk, generator=g) * 0.5 + torch.eye(kk)  # neighbouring pixels correlate
    x = z @ mix + 2.0 * torch.randn(c, s, 1, generator=g)  # shared brightness component per patch
    return torch.randn(c, kk, generator=g), x


@pytest.mark.parametrize("spec", [QuantSpec(8), QuantSpec(4), QuantSpec(3), QuantSpec(3, 4, symmetric=False)],
                         ids=lambda s: s.short())
def test_grouped_gptq_beats_rtn_per_channel_and_packs_exactly(spec: QuantSpec) -> None:
    w, x = _depthwise_layer()
    h = 2.0 / x.shape[1] * (x.transpose(1, 2) @ x).double()  # [C, kk, kk]
    out = gptq_quantize_grouped(w, h, spec)

    def err(q: torch.Tensor) -> torch.Tensor:  # per channel ||X_c (w_c - q_c)||
        return torch.einsum("csk,ck->cs", x, w - q).norm(dim=1)

    g_err, r_err = err(out.weight), err(fake_quantize(w, spec))
    assert float(g_err.sum()) < 0.8 * float(r_err.sum()), (float(g_err.sum()), float(r_err.sum()))
    conv_w = w.reshape(24, 1, 3, 3)
    result = get_method("gptq").quantize_weight(conv_w, spec, QuantContext(extra={"group_hessians": h}), {})
    assert result.packed.shape == (24, 1, 3, 3)
    assert torch.equal(result.packed.dequantize(), out.weight)
    clipped = gptq_quantize_grouped(w, h, spec, clip_search=True)
    assert float(err(clipped.weight).sum()) < 1.05 * float(g_err.sum())


def test_grouped_gptq_several_outputs_per_group_and_errors() -> None:
    w, x = _depthwise_layer(c=4, kk=18)
    h = 2.0 / x.shape[1] * (x.transpose(1, 2) @ x).double()  # 4 conv groups, 3 output channels each
    w12 = torch.randn(12, 18, generator=torch.Generator().manual_seed(2))
    xr = x.repeat_interleave(3, dim=0)  # rows of each output channel's own group
    for spec, bound in ((QuantSpec(4), 0.8), (QuantSpec(4, 6), 0.95)):  # measured 0.68, 0.90
        out = gptq_quantize_grouped(w12, h, spec)
        e = torch.einsum("csk,ck->cs", xr, w12 - out.weight).norm()
        r = torch.einsum("csk,ck->cs", xr, w12 - fake_quantize(w12, spec)).norm()
        assert float(e) < bound * float(r)
    with pytest.raises(LowbitError, match="do not fit"):
        gptq_quantize_grouped(torch.randn(10, 18), h, QuantSpec(4))
