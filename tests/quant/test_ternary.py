"""The ternary method: absmean grid in 2-bit codes {1, 2, 3}, TWN rule, base-3 storage, the w1.58 alias."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.kernels.base3 import Base3Linear, Base3Packed, pack_trits, unpack_trits
from lowbit.kernels.quant_linear import QuantLinear, QuantWeightParam
from lowbit.quant.apply import quantize_
from lowbit.quant.methods import QuantContext, get_method
from lowbit.quant.primitives import QuantSpec
from lowbit.quant.recipe import Recipe, load_recipe
from lowbit.workflows.checkpoint import load_quantized, save_quantized
from tests.quant.qat_tiny import TinyDual, tiny_data

GEN = torch.Generator().manual_seed(0)


def _ternarize(w: torch.Tensor, spec: QuantSpec | None = None, kind: str = "linear", **options):
    return get_method("ternary").quantize_weight(w, spec or QuantSpec(2), QuantContext(kind=kind), options)


def test_absmean_grid_codes_and_positive_scale() -> None:
    w = torch.randn(5, 40, generator=GEN)
    packed = _ternarize(w).packed
    s = w.abs().mean(1, keepdim=True)  # BitNet b1.58 absmean
    torch.testing.assert_close(packed.scales.float(), s, rtol=1e-3, atol=0)
    assert (packed.scales > 0).all()
    codes = packed.codes()
    assert set(codes.unique().tolist()) <= {1, 2, 3}  # level -2 (code 0) never used
    sf = packed.scales.float()
    expected = torch.round(w / sf).clamp(-1, 1)  # threshold at s / 2
    assert torch.equal(codes.long() - 2, expected.long())
    assert torch.equal(packed.dequantize(), expected * sf)


def test_twn_rule_uses_its_threshold_and_optimal_scale() -> None:
    w = torch.tensor([[0.1, -0.2, 1.0, -3.0, 0.05, 0.4, 2.0, -0.05]])
    packed = _ternarize(w, rule="twn").packed
    delta = 0.7 * w.abs().mean()
    above = w.abs() > delta
    assert torch.equal(packed.codes().long() - 2, (torch.sign(w) * above).long())
    assert packed.scales.float().item() == pytest.approx(w.abs()[above].mean().item(), rel=1e-3)


@pytest.mark.parametrize("k", [0, 1, 4, 5, 6, 37, 385])
def test_base3_packing_round_trips_exactly(k: int) -> None:
    trits = torch.randint(0, 3, (4, k), generator=GEN, dtype=torch.uint8)
    packed = pack_trits(trits)
    assert packed.shape == (4, (k + 4) // 5) and (packed.numel() == 0 or int(packed.max()) <= 242)
    assert torch.equal(unpack_trits(packed, k), trits)


def test_base3_layout_is_little_endian_digits() -> None:
    trits = torch.tensor([[1, 2, 0, 0, 1, 2]], dtype=torch.uint8)
    assert pack_trits(trits).tolist() == [[1 + 2 * 3 + 1 * 81, 2]]
    with pytest.raises(LowbitError, match="not a trit"):
        pack_trits(torch.tensor([[3]], dtype=torch.uint8))
    with pytest.raises(LowbitError, match="not 5 base-3 digits"):
        unpack_trits(torch.tensor([[243]], dtype=torch.uint8), 5)


def test_base3_storage_equals_codes_and_counts_1_6_bits() -> None:
    w = torch.randn(8, 384, generator=GEN)
    codes = _ternarize(w)
    base3 = _ternarize(w, storage="base3")
    assert base3.kind == "base3_linear" and isinstance(base3.packed, Base3Packed)
    assert torch.equal(base3.packed.dequantize(), codes.packed.dequantize())
    assert 8 * codes.packed.nbytes / w.numel() == pytest.approx(2 + 16 / 384)
    assert 8 * base3.packed.nbytes / w.numel() == pytest.approx(8 * 77 / 384 + 16 / 384)  # ceil(384/5)=77 bytes
    layer = Base3Linear.from_packed(base3.packed, torch.zeros(8))
    assert sorted(layer.state_dict()) == ["bias", "qtrits", "scales"]
    assert layer.stored_nbytes() == base3.packed.nbytes
    x = torch.randn(3, 384, generator=GEN)
    assert torch.equal(layer(x), QuantLinear.from_packed(codes.packed, torch.zeros(8))(x))


def test_method_checks() -> None:
    with pytest.raises(LowbitError, match=r"method 'ternary' needs symmetric 2-bit weights; received w4"):
        _ternarize(torch.randn(2, 8), QuantSpec(4))
    with pytest.raises(LowbitError, match="unknown ternary storage 'dense'"):
        _ternarize(torch.randn(2, 8), storage="dense")
    with pytest.raises(LowbitError, match="unknown ternary rule"):
        _ternarize(torch.randn(2, 8), rule="max")


def test_w1_58_alias() -> None:
    rule = load_recipe("vision=w1.58g64,text=w1.58:ternary,projector=w2").rules
    assert (rule[0].spec, rule[0].method) == (QuantSpec(2, 64), "ternary")
    assert rule[1].method == "ternary" and rule[2].method == "rtn"  # plain w2 keeps the signed 4-level grid
    with pytest.raises(LowbitError, match=r"unexpected '\.5'"):
        load_recipe("vision=w1.5")


def test_base3_checkpoint_round_trip_every_kind(tmp_path: Path) -> None:
    model = TinyDual()
    recipe = Recipe.from_dict({"rules": [{"tower": "*", "method": "ternary", "bits": 2,
                                          "options": {"storage": "base3"}}]})
    report = quantize_(model, recipe, progress=False)
    assert {m.kind for m in report.modules} == {"base3_conv", "base3_conv1x1", "base3_linear"}
    assert isinstance(model.vision[0], QuantWeightParam) and "qtrits" in model.vision[0].state_dict()
    data = tiny_data(8, captions=True)
    pixels, tokens = model.preprocess(data.images), model.tokenize(data.captions)
    reference = TinyDual()
    quantize_(reference, "*=w1.58", progress=False)  # the same codes in the 2-bit container
    with torch.no_grad():
        before = torch.cat([model.encode_image(pixels), model.encode_text(tokens)])
        assert torch.equal(before, torch.cat([reference.encode_image(pixels), reference.encode_text(tokens)]))
    save_quantized(model, report, recipe, tmp_path / "ck")
    loaded = load_quantized(tmp_path / "ck", build_float=lambda source: TinyDual())
    with torch.no_grad():
        assert torch.equal(torch.cat([loaded.encode_image(pixels), loaded.encode_text(tokens)]), before)
