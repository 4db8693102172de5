"""PB-LLM: salient selection, the CSR side structure, effective bits, modules, checkpoints, Hessian salience."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.kernels.sparse_side import PBLLMLinear, SparseSidePacked, side_from_dense, side_to_dense
from lowbit.quant.apply import quantize_
from lowbit.quant.methods import QuantContext, get_method
from lowbit.quant.pbllm import expected_bits, salient_mask
from lowbit.quant.primitives import QuantSpec
from lowbit.quant.recipe import load_recipe
from lowbit.workflows.checkpoint import load_quantized, save_quantized
from tests.quant.qat_tiny import TinyDual, tiny_data

GEN = torch.Generator().manual_seed(0)


def _pbllm(w: torch.Tensor, method: str = "pbllm", ctx: QuantContext | None = None, **options):
    return get_method(method).quantize_weight(w, QuantSpec(1), ctx or QuantContext(), options)


def test_sparse_side_round_trips_exactly() -> None:
    mask = torch.rand(6, 50, generator=GEN) < 0.2
    mask[3] = False  # an empty row
    residual = torch.randn(6, 50, generator=GEN) * mask
    row_ptr, cols, values, row_scale = side_from_dense(residual, mask)
    assert row_ptr.dtype == torch.int32 and cols.dtype == torch.int16 and values.dtype == torch.int8
    assert row_ptr.tolist()[0] == 0 and row_ptr.tolist()[-1] == int(mask.sum()) == values.numel()
    assert row_ptr[4] == row_ptr[3]
    dense = side_to_dense(row_ptr, cols, values, row_scale, 50)
    step = row_scale.float().unsqueeze(1)
    assert torch.equal(dense, torch.round(residual / step).clamp(-127, 127) * step * mask)  # int8 grid, exact
    assert ((dense - residual).abs() <= step / 2 + 1e-7).all()
    again = side_from_dense(dense, mask, row_scale.float())  # re-encoding the decoded side is lossless
    assert all(torch.equal(a, b) for a, b in zip(again, (row_ptr, cols, values, row_scale), strict=True))


def test_salient_selection_by_magnitude_and_by_hessian() -> None:
    w = torch.randn(10, 20, generator=GEN)
    mask = salient_mask(w, 0.1)
    assert int(mask.sum()) == 20
    assert w.abs()[mask].min() >= w.abs()[~mask].max()
    h = torch.eye(20, dtype=torch.float64)
    h[7, 7] = 1e6  # one input channel dominates the output error: its weights are the salient ones
    hmask = salient_mask(w, 0.05, hessian=h)
    assert hmask[:, 7].all() and int(hmask.sum()) == 10
    assert not salient_mask(w, 0.0).any()


def test_pbllm_weight_is_binary_plus_side_and_beats_binary() -> None:
    w = torch.randn(16, 64, generator=GEN)
    result = _pbllm(w, fraction=0.1)
    packed = result.packed
    assert isinstance(packed, SparseSidePacked) and result.kind == "pbllm_linear" and packed.nnz == 102
    mask = salient_mask(w, 0.1)
    sign = torch.where(w >= 0, 1.0, -1.0)
    s = packed.scales.float()
    torch.testing.assert_close(s.squeeze(1), (w.abs() * ~mask).sum(1) / (~mask).sum(1), rtol=1e-3, atol=0)
    deq = packed.dequantize()
    assert torch.equal(deq[~mask], (sign * s)[~mask])  # non-salient: binary
    step = packed.row_scale.float().unsqueeze(1).expand_as(w)
    assert ((deq - w).abs()[mask] <= step[mask] / 2 + 1e-6).all()  # salient: 8-bit residual
    binary = get_method("binary").quantize_weight(w, QuantSpec(1), QuantContext(), {}).packed.dequantize()
    assert (deq - w).norm() < 0.85 * (binary - w).norm()


def test_effective_bits_count_every_stored_tensor() -> None:
    n, k = 32, 384
    packed = _pbllm(torch.randn(n, k, generator=GEN), fraction=0.1).packed
    nnz = round(0.1 * n * k)
    stored = n * k // 8 + 2 * n + 4 * (n + 1) + 2 * nnz + nnz + 2 * n  # qweight scales row_ptr cols values rs
    assert packed.nbytes == stored
    assert 8 * packed.nbytes / (n * k) == pytest.approx(expected_bits(k, 0.1), abs=0.01)  # ~3.57
    layer = PBLLMLinear.from_packed(packed)
    assert layer.stored_nbytes() == stored
    assert sorted(layer.state_dict()) == ["qweight", "scales", "side_cols", "side_row_ptr", "side_row_scale",
                                          "side_values"]


def test_module_computes_with_the_side_and_keeps_dtypes() -> None:
    w = torch.randn(8, 40, generator=GEN)
    packed = _pbllm(w, fraction=0.2).packed
    layer = PBLLMLinear.from_packed(packed, bias=torch.ones(8))
    x = torch.randn(3, 40, generator=GEN)
    torch.testing.assert_close(layer(x), x @ packed.dequantize().T + 1)
    layer.backend = "anything-fast"  # the side must be added: PB-LLM layers always use the dequantized path
    torch.testing.assert_close(layer(x), x @ packed.dequantize().T + 1)
    layer.half().float()
    assert layer.side_row_scale.dtype == torch.float16 and layer.scales.dtype == torch.float16


def test_options_and_bits_are_checked() -> None:
    with pytest.raises(LowbitError, match="fraction' must be a number in \\[0, 1\\)"):
        _pbllm(torch.randn(2, 8), fraction=1.5)
    with pytest.raises(LowbitError, match="needs symmetric 1-bit weights"):
        get_method("pbllm").quantize_weight(torch.randn(2, 8), QuantSpec(2), QuantContext(), {})


def test_checkpoint_round_trip_resizes_the_side(tmp_path: Path) -> None:
    model = TinyDual()
    recipe = load_recipe("vision=w1:pbllm,text=w1g16:pbllm,projector=w8")
    report = quantize_(model, recipe, progress=False)
    assert {m.kind for m in report.modules} >= {"pbllm_conv", "pbllm_conv1x1", "pbllm_linear"}
    for m in report.modules:
        module = model.get_submodule(m.path)
        if m.kind.startswith("pbllm"):
            assert m.bits_per_weight == pytest.approx(8 * module.stored_nbytes() / m.params)
    data = tiny_data(8, captions=True)
    pixels, tokens = model.preprocess(data.images), model.tokenize(data.captions)
    with torch.no_grad():
        before = torch.cat([model.encode_image(pixels), model.encode_text(tokens)])
    save_quantized(model, report, recipe, tmp_path / "ck")
    loaded = load_quantized(tmp_path / "ck", build_float=lambda source: TinyDual())  # empty side, resized
    with torch.no_grad():
        assert torch.equal(torch.cat([loaded.encode_image(pixels), loaded.encode_text(tokens)]), before)


class _Calibration:
    """A calibration provider that hands every layer a Hessian with one dominant input channel."""

    def stats_for(self, tower, name, module):
        k = module.weight.reshape(module.weight.shape[0], -1).shape[1]
        h = torch.eye(k, dtype=torch.float64)
        h[0, 0] = 1e6
        return QuantContext(hessian=h)


def test_pbllm_hessian_needs_and_uses_calibration() -> None:
    with pytest.raises(LowbitError, match="needs calibration data"):
        quantize_(TinyDual(), "text=w1:pbllm-hessian", progress=False)
    model = TinyDual()
    quantize_(model, "text=w1:pbllm-hessian", calibration=_Calibration(), progress=False)
    layer = model.text[2]  # K = 32, N = 24: 77 salient weights, column 0 (24 of them) first
    cols = layer.side_cols.long()
    assert layer.side_values.numel() == round(0.1 * 24 * 32) and int((cols == 0).sum()) == 24
