"""The binary (1-bit) method: sign codes, mean-|w| scales, exact packing, effective bits, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.kernels.formats import pack_codes, unpack_codes
from lowbit.kernels.quant_linear import QuantLinear
from lowbit.quant.apply import quantize_
from lowbit.quant.binary import binary_scales
from lowbit.quant.methods import QuantContext, get_method
from lowbit.quant.primitives import QuantSpec
from lowbit.quant.recipe import load_recipe
from lowbit.workflows.checkpoint import load_quantized, save_quantized
from tests.quant.qat_tiny import TinyDual, tiny_data

GEN = torch.Generator().manual_seed(0)


def _binarize(w: torch.Tensor, spec: QuantSpec):
    return get_method("binary").quantize_weight(w, spec, QuantContext(), {}).packed


@pytest.mark.parametrize("k", [1, 7, 8, 63, 64, 100])
def test_one_bit_packing_round_trips_exactly(k: int) -> None:
    codes = torch.randint(0, 2, (5, k), generator=GEN, dtype=torch.uint8)
    packed = pack_codes(codes, 1)
    assert packed.shape == (5, (k + 7) // 8)
    assert torch.equal(unpack_codes(packed, 1, k), codes)


def test_bit_order_is_lsb_first() -> None:
    codes = torch.tensor([[1, 0, 1, 1, 0, 0, 0, 0, 1]], dtype=torch.uint8)
    assert pack_codes(codes, 1).tolist() == [[0b00001101, 0b00000001]]


@pytest.mark.parametrize("group", [None, 16])
def test_binary_is_sign_times_mean_abs(group: int | None) -> None:
    w = torch.randn(6, 48, generator=GEN)
    packed = _binarize(w, QuantSpec(1, group))
    gs = group or 48
    groups = w.view(6, -1, gs)  # [N, G, gs]
    expected_scales = groups.abs().mean(-1)  # XNOR-Net: L2-optimal scale of a sign pattern
    assert packed.scales.shape == (6, 48 // gs)
    torch.testing.assert_close(packed.scales.float(), expected_scales, rtol=1e-3, atol=0)
    assert (packed.scales.float() >= expected_scales).all()  # fp16 magnitude rounded up
    deq = packed.dequantize().view(6, -1, gs)
    assert torch.equal(deq, torch.where(groups >= 0, 1.0, -1.0) * packed.scales.float().unsqueeze(-1))


def test_zero_counts_as_positive_and_scales_can_exclude_weights() -> None:
    w = torch.tensor([[0.0, -2.0, 4.0, 1.0]])
    assert _binarize(w, QuantSpec(1)).codes().tolist() == [[1, 0, 1, 1]]
    exclude = torch.tensor([[False, False, True, False]])
    assert binary_scales(w, 4, exclude).item() == pytest.approx(1.0)  # mean of |0|, |-2|, |1|


@pytest.mark.parametrize(("k", "group", "bits"), [(64, None, 1 + 16 / 64), (384, None, 1 + 16 / 384),
                                                  (256, 64, 1 + 16 / 64), (100, 32, (13 * 8 + 4 * 16) / 100)])
def test_effective_bits_per_weight(k: int, group: int | None, bits: float) -> None:
    packed = _binarize(torch.randn(8, k, generator=GEN), QuantSpec(1, group))
    assert 8 * packed.nbytes / (8 * k) == pytest.approx(bits)


def test_method_needs_one_bit() -> None:
    with pytest.raises(LowbitError, match=r"method 'binary' needs symmetric 1-bit weights; received w2"):
        _binarize(torch.randn(2, 8), QuantSpec(2))
    with pytest.raises(LowbitError, match="unknown option"):
        get_method("binary").quantize_weight(torch.randn(2, 8), QuantSpec(1), QuantContext(), {"x": 1})


def test_recipe_quantize_report_and_checkpoint_round_trip(tmp_path: Path) -> None:
    model = TinyDual()
    recipe = load_recipe("vision=w1:binary,text=w1g16:binary,projector=w8")
    report = quantize_(model, recipe, progress=False)
    rows = {m.path: m for m in report.modules}
    assert isinstance(model.text[0], QuantLinear) and rows["text.0"].bits == 1
    assert rows["vision.2"].bits_per_weight == pytest.approx(1 + 16 / 8)  # 1x1 conv, K = 8 channels
    assert rows["text.2"].bits_per_weight == pytest.approx(1 + 16 / 16)  # K = 32, groups of 16
    data = tiny_data(8, captions=True)
    pixels, tokens = model.preprocess(data.images), model.tokenize(data.captions)
    with torch.no_grad():
        before = model.encode_image(pixels), model.encode_text(tokens)
    save_quantized(model, report, recipe, tmp_path / "ck")
    loaded = load_quantized(tmp_path / "ck", build_float=lambda source: TinyDual())
    with torch.no_grad():
        after = loaded.encode_image(pixels), loaded.encode_text(tokens)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
