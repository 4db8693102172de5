"""GPTQ vs RTN on the real default model (lit-fashion) with real calibration activations.

For every calibratable layer of the vision and text towers (Linear, 1x1 and k x k non-grouped convs), the
layer output error ||X Wᵀ - X Qᵀ||² over 64 Fashion-MNIST train images / 64 captions must be lower with GPTQ
than with RTN at 3 and 2 bits (g64; layers with K <= 64 are per-channel).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.quant.primitives import QuantSpec, fake_quantize

pytestmark = pytest.mark.slow

SPECS = (QuantSpec(3, 64), QuantSpec(2, 64))


def _calibratable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def _output_error(w: torch.Tensor, q: torch.Tensor, hessian: torch.Tensor) -> float:
    d = (w - q).to(torch.float64)  # [N, K]
    return float(((d @ hessian) * d).sum())  # tr(D H Dᵀ) ∝ ||X Dᵀ||² over all calibration rows


@pytest.fixture(scope="module")
def layer_errors() -> list[tuple[str, str, float, float]]:
    try:
        from lowbit.models import load_model
    except ImportError as exc:  # pragma: no cover - depends on the lead's progress
        pytest.skip(f"lowbit.models.load_model is not available yet ({exc})")
    from lowbit.quant.calibration import calibration_from_dataset
    from lowbit.quant.gptq import gptq_quantize

    model = load_model("lit-fashion")
    calib = calibration_from_dataset(model, "fashion-mnist", n_samples=64, split="train", max_rows=0)
    rows = []
    for tower in ("vision", "text"):
        for name, module in model.towers()[tower].named_modules():
            if not _calibratable(module):
                continue
            ctx = calib.stats_for(tower, name, module)
            if ctx.hessian is None:  # never ran on the encode path
                continue
            w = module.weight.detach().reshape(module.weight.shape[0], -1).float()  # [N, K]
            for spec in SPECS:
                rtn = _output_error(w, fake_quantize(w, spec), ctx.hessian)
                gptq = _output_error(w, gptq_quantize(w, ctx.hessian, spec).weight, ctx.hessian)
                rows.append((f"{tower}/{name}", spec.short(), gptq, rtn))
    return rows


def test_gptq_beats_rtn_on_every_real_layer(layer_errors) -> None:
    assert len(layer_errors) > 60
    worse = [(layer, spec, g / r) for layer, spec, g, r in layer_errors if not g < r]
    assert not worse, worse
    for spec in SPECS:
        ratios = torch.tensor([g / r for _, s, g, r in layer_errors if s == spec.short()])
        print(f"{spec.short()}: GPTQ/RTN squared output error median {ratios.median():.3f}, "
              f"max {ratios.max():.3f} over {len(ratios)} layers")
