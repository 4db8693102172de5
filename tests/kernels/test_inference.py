"""optimize_for_inference_ on the real lit-fashion image tower (slow): fp32, w4 and w8, both backends, checkpoints."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.errors import LowbitError
from lowbit.kernels import fast
from lowbit.kernels.depthwise import DepthwiseKernel
from lowbit.kernels.fold_bn import SCALE_ABS_BOUND, SCALE_REL_BOUND, FoldedBatchNorm
from lowbit.kernels.inference import optimize_for_inference_
from lowbit.kernels.planned import planned
from lowbit.kernels.pointwise import PointwiseKernel
from lowbit.kernels.quant_linear import QuantConv2d1x1, QuantLinear, QuantWeightParam, clamp_output, set_backend
from lowbit.quant.recipe import Recipe

pytestmark = pytest.mark.slow
EFFICIENTNET_LITE0_BNS = 49  # stem + 16 MBConv blocks (2 or 3 each) + head
EFFICIENTNET_LITE0_DEPTHWISE = 16  # one per MBConv block
EFFICIENTNET_LITE0_POINTWISE = 32  # 15 expand + 16 project convs + the head conv


def _recipe(bits: int) -> Recipe:
    """RTN (no calibration) on the image tower and projector: the w4 / w8 formats of the presets."""
    return Recipe.from_dict({"version": 1, "rules": [
        {"tower": "projector", "pattern": "*", "method": "rtn", "bits": 8},
        {"tower": "vision", "pattern": "*", "kinds": ["conv"], "method": "rtn", "bits": 8},
        {"tower": "vision", "pattern": "*", "kinds": ["conv1x1"], "method": "rtn", "bits": bits,
         "group_size": 128 if bits == 4 else None},
        {"tower": "text", "pattern": "*", "skip": True},
    ]}, name=f"w{bits}-vision-rtn")


@pytest.fixture(scope="module")
def pixels(lit_model: Any) -> torch.Tensor:
    from lowbit.data import resolve_dataset

    data = resolve_dataset("fashion-mnist", split="test", limit=8)
    return lit_model.preprocess(data.images)


def _codes(layer: QuantLinear | QuantWeightParam) -> torch.Tensor:
    """|q - z| [N, K] of a packed layer (zero where a group's scale is zero: its weights are zero too)."""
    s = layer.packed.scales.double().repeat_interleave(layer.group_size, dim=1)  # [N, G * group] -> [N, K]
    w = layer.dequantized_weight().double()
    return (w / s[:, : w.shape[1]]).nan_to_num().abs()


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).norm() / ref.norm()).item()


def test_fp32_fold_matches(lit_model: Any, pixels: torch.Tensor) -> None:
    folded = copy.deepcopy(lit_model)
    report = optimize_for_inference_(folded)
    assert report.batchnorm.folded == EFFICIENTNET_LITE0_BNS and not report.batchnorm.skipped
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert report.inplace_activations == 17  # every block's ReLU6 and the stem/head one: all their inputs fresh
    assert report.depthwise_kernels == EFFICIENTNET_LITE0_DEPTHWISE
    assert sum(isinstance(m, DepthwiseKernel) for m in folded.modules()) == EFFICIENTNET_LITE0_DEPTHWISE
    # Every float 1x1 conv runs on the dense kernel, the 3x3 stem on im2col + the same kernel
    assert report.pointwise_kernels == EFFICIENTNET_LITE0_POINTWISE and report.conv_gemm_kernels == 1
    assert sum(isinstance(m, PointwiseKernel) for m in folded.modules()) == EFFICIENTNET_LITE0_POINTWISE
    assert report.fused_activations == EFFICIENTNET_LITE0_DEPTHWISE + 1  # every block's ReLU6, the stem/head one
    assert report.planned_forwards == 1 and planned(folded.vision) is not None  # the image tower
    with torch.no_grad():
        assert _rel(folded.encode_image(pixels), lit_model.encode_image(pixels)) < 1e-5
        assert torch.equal(folded.vision(pixels), type(folded.vision).forward(folded.vision, pixels))


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_fold_on_both_backends_within_bound(lit_model: Any, pixels: torch.Tensor, bits: int) -> None:
    model = copy.deepcopy(lit_model)
    lowbit.quantize(model, _recipe(bits), progress=False)
    folded = copy.deepcopy(model)
    report = optimize_for_inference_(folded)
    assert report.batchnorm.folded == EFFICIENTNET_LITE0_BNS and not report.batchnorm.skipped
    assert report.static_padding > 0 and report.depthwise_kernels == EFFICIENTNET_LITE0_DEPTHWISE
    assert report.fused_activations == EFFICIENTNET_LITE0_DEPTHWISE + 1  # every block's ReLU6, the stem/head one
    # The planned image tower: every packed 1x1 conv and depthwise conv called directly, bit-equal to the modules
    plan = planned(folded.vision).current()  # type: ignore[union-attr]
    assert plan is not None and plan.lowered >= 32 + EFFICIENTNET_LITE0_DEPTHWISE
    with torch.no_grad():
        assert torch.equal(folded.vision(pixels), type(folded.vision).forward(folded.vision, pixels))

    # Every folded packed conv: dequantized weight within 2^-11 (relative; 2^-25 * |q - z| for subnormal
    # scales) of the exact a * W_q, and its codes unchanged.
    modules = dict(model.named_modules())
    for conv_path, bn_path in report.batchnorm.pairs:
        before, after, bn = modules[conv_path], folded.get_submodule(conv_path), modules[bn_path]
        assert isinstance(after, (QuantConv2d1x1, QuantWeightParam)) and torch.equal(after.qweight, before.qweight)
        a = (bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)).reshape(-1, 1)
        exact = before.dequantized_weight().double() * a  # [N, K]
        err = (after.dequantized_weight().double() - exact).abs()
        assert torch.all(err <= SCALE_REL_BOUND * exact.abs() + SCALE_ABS_BOUND * _codes(before)), conv_path

    # The 1x1 convs on the kernels: each, on the input it receives, within the bound of the unfolded conv + BN.
    set_backend(model, "cpu")
    set_backend(folded, "cpu")
    checked: list[str] = []

    def check(path: str, layer: QuantLinear, args: tuple[torch.Tensor, ...], y: torch.Tensor) -> None:
        x = args[0]
        bn = modules[dict(report.batchnorm.pairs)[path]]
        ref = clamp_output(layer, bn(modules[path](x))).double()  # a fused ReLU6 (1-Lipschitz: same bound)
        xa = x.double().abs()
        if fast.is_available():
            xa = xa + xa.amax(dim=1, keepdim=True) / 254  # int8 activations: |x_hat| <= |x| + a_b / 2
        mag = F.conv2d(xa, layer.dequantized_weight().double().abs().reshape(layer.weight_shape))
        sub = F.conv2d(xa, _codes(modules[path]).reshape(layer.weight_shape))  # |x| conv |q - z|
        # float32 slack: the unfolded BN computes a * (c - mean) + beta, rounding at |a| (|c| + |mean|) + |beta|
        shift = (bn.weight.double().abs() * bn.running_mean.double().abs() / torch.sqrt(bn.running_var.double()
                 + bn.eps) + bn.bias.double().abs()).reshape(1, -1, 1, 1)
        bound = SCALE_REL_BOUND * mag + SCALE_ABS_BOUND * sub + 1e-5 * (mag + shift) + 1e-6
        assert torch.all((y.double() - ref).abs() <= bound), path
        checked.append(path)

    folded_convs = dict(report.batchnorm.pairs)
    pws = {p: m for p, m in folded.named_modules() if isinstance(m, QuantConv2d1x1) and p in folded_convs}
    hooks = [m.register_forward_hook(lambda mod, a, y, p=p: check(p, mod, a, y)) for p, m in pws.items()]
    with torch.no_grad():
        folded.encode_image(pixels)
    for h in hooks:
        h.remove()
    assert len(checked) == len(pws) > 30

    # End to end. Reference backend: the scale rounding alone (49 layers deep). Kernels: the same, but each
    # layer's int8 activation rounding re-rolls on the slightly different inputs, so the folded model differs
    # from the unfolded one by about the kernels' own end-to-end noise against the reference (~3.5% measured).
    out = {}
    for backend in ("reference", "cpu"):
        set_backend(model, backend)
        set_backend(folded, backend)
        with torch.no_grad():
            out[backend] = (folded.encode_image(pixels), model.encode_image(pixels))
    assert _rel(*out["reference"]) < 1e-2
    # (Measured on 64 test images: folded vs unfolded on the kernels 0.066 relative, min cosine 0.991 with every
    # 1x1 conv on int8; 0.048 / 0.994 with the first blocks' small convs on the float path, fast.DENSE_*.)
    assert _rel(*out["cpu"]) < 6e-2 and F.cosine_similarity(*out["cpu"]).min() > 0.99


def test_checkpoints_keep_batchnorm_and_load_can_fold(lit_model: Any, pixels: torch.Tensor, tmp_path: Path) -> None:
    model = copy.deepcopy(lit_model)
    report = lowbit.quantize(model, _recipe(4), progress=False)
    folded = copy.deepcopy(model)
    optimize_for_inference_(folded)
    with pytest.raises(LowbitError, match="cannot save a model with BatchNorm folded"):
        lowbit.save(folded, tmp_path / "folded", report)
    assert not (tmp_path / "folded").exists()
    lowbit.save(model, tmp_path / "w4", report)
    plain = lowbit.load(str(tmp_path / "w4"), backend="reference")  # the default: exactly the saved model
    assert sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules()) == EFFICIENTNET_LITE0_BNS
    fast_loaded = lowbit.load(str(tmp_path / "w4"), backend="reference", optimize=True)
    assert sum(isinstance(m, FoldedBatchNorm) for m in fast_loaded.modules()) == EFFICIENTNET_LITE0_BNS
    set_backend(model, "reference")
    set_backend(folded, "reference")
    with torch.no_grad():
        assert torch.equal(plain.encode_image(pixels), model.encode_image(pixels))
        torch.testing.assert_close(fast_loaded.encode_image(pixels), folded.encode_image(pixels))
    # a float built-in folds the same way (optimize= is load_model's, for every family)
    float_folded = lowbit.load("lit-fashion", optimize=True)
    assert sum(isinstance(m, FoldedBatchNorm) for m in float_folded.modules()) == EFFICIENTNET_LITE0_BNS
    with torch.no_grad():
        torch.testing.assert_close(float_folded.encode_image(pixels), lit_model.encode_image(pixels),
                                   rtol=1e-4, atol=1e-5)
