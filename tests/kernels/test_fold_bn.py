"""BatchNorm folding (lowbit.kernels.fold_bn): packed and float convs, within the stated fp16 rounding bound."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels import fast
from lowbit.kernels.fold_bn import (
    SCALE_ABS_BOUND,
    SCALE_REL_BOUND,
    FoldedBatchNorm,
    fold_batchnorm_,
    fold_scales,
    is_folded,
)
from lowbit.kernels.quant_linear import QuantConv2d1x1, QuantWeightParam, set_backend
from lowbit.quant.primitives import QuantSpec, to_packed

GEN = torch.Generator().manual_seed(0)
BACKENDS = ["reference", "cpu"]


def _bn(c: int, negative_gamma: bool = True) -> nn.BatchNorm2d:
    """An eval-mode BatchNorm with random statistics; half of its gammas negative."""
    bn = nn.BatchNorm2d(c, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=GEN))
        bn.running_var.copy_(torch.rand(c, generator=GEN) * 2 + 0.05)
        gamma = torch.rand(c, generator=GEN) + 0.2
        if negative_gamma:
            gamma[::2] *= -1
        bn.weight.copy_(gamma)
        bn.bias.copy_(torch.randn(c, generator=GEN))
    return bn.eval()


class Block(nn.Module):
    """pw 1x1 (no bias) -> BN -> ReLU6 -> depthwise 3x3 (no bias) -> BN -> + stem conv (bias) -> BN."""

    def __init__(self, packed: bool, c: int = 64, n: int = 48, bits: int = 4) -> None:
        super().__init__()
        pw, dw = nn.Conv2d(c, n, 1, bias=False), nn.Conv2d(n, n, 3, padding=1, groups=n, bias=False)
        stem = nn.Conv2d(n, n, 3, padding=1, bias=True)
        if packed:
            pw = QuantConv2d1x1.from_packed(to_packed(pw.weight.detach(), QuantSpec(bits, 32)), None)
            QuantWeightParam.attach(dw, to_packed(dw.weight.detach(), QuantSpec(8)))
            QuantWeightParam.attach(stem, to_packed(stem.weight.detach(), QuantSpec(8, 96)))
        self.pw, self.bn0, self.act = pw, _bn(n), nn.ReLU6()
        self.dw, self.bn1 = dw, _bn(n)
        self.stem, self.bn2 = stem, _bn(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.dw(self.act(self.bn0(self.pw(x)))))
        return self.bn2(self.stem(x))


def _affine(bn: nn.BatchNorm2d) -> torch.Tensor:
    return bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)


def test_fp16_rescaling_is_within_the_stated_bound() -> None:
    # Scales over the whole fp16 range, including subnormals, times factors of both signs.
    scales = (torch.randn(64, 40, generator=GEN) * torch.logspace(-7, 3, 40)).to(torch.float16)
    a = torch.randn(64, generator=GEN, dtype=torch.float64) * 3
    folded = fold_scales(scales, a)
    exact = scales.double() * a[:, None]
    err = (folded.double() - exact).abs()
    assert torch.all(err <= torch.maximum(SCALE_REL_BOUND * exact.abs(), torch.full_like(exact, SCALE_ABS_BOUND)))
    normal = exact.abs() >= 2.0**-14
    assert normal.sum() > 1000 and (~normal).sum() > 50  # both regimes exercised
    assert (err[normal] / exact.abs()[normal]).max() > SCALE_REL_BOUND / 2  # the bound is tight, not loose


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [4, 8])
def test_packed_fold_matches_conv_then_batchnorm_within_bound(backend: str, bits: int) -> None:
    model = Block(packed=True, bits=bits)
    set_backend(model, backend)
    folded = copy.deepcopy(model)
    report = fold_batchnorm_(folded)
    assert report.pairs == [("pw", "bn0"), ("dw", "bn1"), ("stem", "bn2")] and not report.skipped
    assert all(isinstance(getattr(folded, n), FoldedBatchNorm) for n in ("bn0", "bn1", "bn2")) and is_folded(folded)
    # Biases created (float32) where the conv had none; packed codes untouched, only the scales change.
    assert folded.pw.bias.dtype == folded.dw.bias.dtype == torch.float32
    assert torch.equal(folded.pw.qweight, model.pw.qweight) and folded.pw.scales.dtype == torch.float16
    x = torch.randn(2, 64, 7, 9, generator=GEN)
    with torch.no_grad():
        h = model.pw(x)
        cases = (("pw", "bn0", x, {}), ("dw", "bn1", model.act(model.bn0(h)), {"padding": 1, "groups": 48}),
                 ("stem", "bn2", torch.randn(2, 48, 5, 6, generator=GEN), {"padding": 1}))
        for conv, bn, inp, kw in cases:
            c_u, b_u, c_f = getattr(model, conv), getattr(model, bn), getattr(folded, conv)
            y_u, y_f = b_u(c_u(inp)).double(), c_f(inp).double()
            a = _affine(b_u)
            xa = inp.double().abs()
            if backend == "cpu" and isinstance(c_u, QuantConv2d1x1) and fast.is_available():
                xa = xa + xa.amax(dim=1, keepdim=True) / 254  # int8 activations: |x_hat| <= |x| + a_b / 2
            w = c_u.dequantized_weight().double().reshape(c_u.weight_shape) * a.reshape(-1, 1, 1, 1)
            mag = F.conv2d(xa, w.abs(), **kw)  # |x| conv |a W_q|
            # float32 slack: the unfolded BN computes a * (c - mean) + beta, rounding at |a| (|c| + |mean|) + |beta|
            shift = (a.abs() * b_u.running_mean.double().abs() + b_u.bias.double().abs()).reshape(1, -1, 1, 1)
            bound = SCALE_REL_BOUND * mag + 1e-5 * (mag + shift) + 1e-6
            assert torch.all((y_f - y_u).abs() <= bound), conv
        full_u, full_f = model(x), folded(x)
    rel = ((full_f - full_u).norm() / full_u.norm()).item()
    assert rel < 3 * SCALE_REL_BOUND, rel


def test_float_fold_uses_torch_fusion_and_matches() -> None:
    model = Block(packed=False)
    folded = copy.deepcopy(model)
    report = fold_batchnorm_(folded)
    assert report.folded == 3 and isinstance(folded.pw, nn.Conv2d) and folded.pw.bias is not None
    x = torch.randn(2, 64, 7, 9, generator=GEN)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_batchnorm_in_training_mode_is_refused_before_any_change() -> None:
    model = Block(packed=True)
    model.bn1.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LowbitError, match=r"training mode \(1 modules, first 'bn1'\).*model.eval\(\)"):
        fold_batchnorm_(model)
    assert not is_folded(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class NotAfterConv(nn.Module):
    """BN after an activation; a conv output that feeds both a BN and a residual: neither can fold."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), _bn(4), nn.Conv2d(4, 4, 1), _bn(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(torch.relu(self.conv(x)))
        z = self.conv2(y)
        return self.bn2(z) + z


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace this forward, its child block still folds."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Block(packed=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) if x.sum() > 0 else self.block(-x)


def test_only_graph_proven_pairs_fold() -> None:
    model = NotAfterConv()
    report = fold_batchnorm_(model)
    assert report.folded == 0 and [p for p, _ in report.skipped] == ["bn", "bn2"]
    assert isinstance(model.bn, nn.BatchNorm2d) and isinstance(model.bn2, nn.BatchNorm2d)
    nested = Untraceable()
    nested.bn = _bn(48)  # held by the untraceable module itself: who feeds it is unknown, it stays
    report = fold_batchnorm_(nested)
    assert report.pairs == [("block.pw", "block.bn0"), ("block.dw", "block.bn1"), ("block.stem", "block.bn2")]
    assert report.untraced == [""] and isinstance(nested.bn, nn.BatchNorm2d)


def test_scale_overflow_skips_the_pair() -> None:
    model = Block(packed=True)
    with torch.no_grad():
        model.bn1.weight[0] = 1e9
    report = fold_batchnorm_(model)
    assert report.skipped == [("bn1", "a folded scale overflows fp16")]
    assert isinstance(model.bn1, nn.BatchNorm2d) and model.dw.bias is None  # left untouched
