"""GPTQ vs RTN on the real default model (lit-fashion) with real calibration activations.

For every calibratable layer of the vision and text towers (Linear, 1x1 and k x k convs, and the depthwise
convs with one Hessian per channel), the layer output error ||X Wᵀ - X Qᵀ||² over 64 Fashion-MNIST train
images / 64 captions must be lower with GPTQ than with RTN at 3 and 2 bits (g64; layers with K <= 64 are
per-channel).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.quant.primitives import QuantSpec, fake_quantize

pytestmark = pytest.mark.slow

SPECS = (QuantSpec(3, 64), QuantSpec(2, 64))


def _calibratable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d))


def _output_error(w: torch.Tensor, q: torch.Tensor, hessian: torch.Tensor) -> float:
    d = (w - q).to(torch.float64)  # [N, K]
    if hessian.dim() == 3:  # grouped conv: row n sees only its group's Hessian [G, Kg, Kg]
        h_rows = hessian.repeat_interleave(d.shape[0] // hessian.shape[0], dim=0)  # [N, Kg, Kg]
        return float(torch.einsum("nk,nkj,nj->", d, h_rows, d))
    return float(((d @ hessian) * d).sum())  # tr(D H Dᵀ) ∝ ||X Dᵀ||² over all calibration rows


@pytest.fixture(scope="module")
def layer_errors() -> list[tuple[str, str, float, float]]:
    try:
        from lowbit.models import load_model
    except ImportError as exc:  # pragma: no cover - depends on the lead's progress
        pytest.skip(f"lowbit.models.load_model is not available yet ({exc})")
    from lowbit.quant.calibration import calibration_from_dataset
    from lowbit.quant.gptq import gptq_quantize, gptq_quantize_grouped

    model = load_model("lit-fashion")
    calib = calibration_from_dataset(model, "fashion-mnist", n_samples=64, split="train", max_rows=0)
    rows = []
    for tower in ("vision", "text"):
        for name, module in model.towers()[tower].named_modules():
            if not _calibratable(module):
                continue
            ctx = calib.stats_for(tower, name, module)
            hessian = ctx.extra.get("group_hessians", ctx.hessian)
            if hessian is None:  # never ran on the encode path
                continue
            solve = gptq_quantize_grouped if hessian.dim() == 3 else gptq_quantize
            w = module.weight.detach().reshape(module.weight.shape[0], -1).float()  # [N, K]
            for spec in SPECS:
                rtn = _output_error(w, fake_quantize(w, spec), hessian)
                gptq = _output_error(w, solve(w, hessian, spec).weight, hessian)
                rows.append((f"{tower}/{name}", spec.short(), gptq, rtn))
    return rows


def test_gptq_beats_rtn_on_every_real_layer(layer_errors) -> None:
    assert len(layer_errors) >= 2 * 86  # 50 vision convs (16 of them depthwise) + 36 text linears, 2 specs each
    worse = [(layer, spec, g / r) for layer, spec, g, r in layer_errors if not g < r]
    assert not worse, worse
    for spec in SPECS:
        ratios = torch.tensor([g / r for _, s, g, r in layer_errors if s == spec.short()])
        print(f"{spec.short()}: GPTQ/RTN squared output error median {ratios.median():.3f}, "
              f"max {ratios.max():.3f} over {len(ratios)} layers")
