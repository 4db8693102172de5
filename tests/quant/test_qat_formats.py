"""QAT reaches every method, and through it every storage format: ``minmax`` (offset storage) and
``pbllm-hessian`` (PB-LLM side, Hessian-ranked salient mask) train and fold like the others."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels.offsets import OffsetPacked
from lowbit.kernels.quant_linear import set_backend
from lowbit.kernels.storage import format_of
from lowbit.quant.apply import quantize_
from lowbit.quant.fake_quant import PBLLMLSQ, QAT_QUANTIZERS, MinMaxLSQ
from lowbit.quant.methods import METHODS, QuantContext, method_names
from lowbit.quant.pbllm import salient_mask
from lowbit.quant.qat import convert_qat, prepare_qat, qat_layers, qat_parameters
from lowbit.quant.recipe import load_recipe
from lowbit.workflows.checkpoint import load_quantized, save_quantized
from tests.quant.qat_tiny import TinyDual, tiny_data

MINMAX = "*=w4g8:minmax"
PBLLM_HESSIAN = "*=w1:pbllm-hessian"


class DiagonalHessian:
    """A calibration provider whose Hessian ranks the LAST input columns highest, so the Hessian mask differs
    from the magnitude mask (deterministic, no forward passes)."""

    def stats_for(self, tower: str, module_name: str, module: nn.Module) -> QuantContext:
        k = module.weight[0].numel()
        return QuantContext(hessian=torch.diag(torch.linspace(0.01, 10.0, k) ** 4))


def _batch(model: TinyDual) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    data = tiny_data(8, captions=True)
    return model.preprocess(data.images), model.tokenize(data.captions)


def _outputs(model: TinyDual, pixels: torch.Tensor, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([model.encode_image(pixels), model.encode_text(tokens)])


def _prepare(recipe: str) -> TinyDual:
    model = TinyDual()
    prepare_qat(model, recipe, calibration=DiagonalHessian() if "hessian" in recipe else None)
    return model


def test_every_method_is_registered_for_qat() -> None:
    # lowbit's own methods (other tests register throwaway ones in the same process)
    own = {n for n in method_names() if type(METHODS.get(n)).__module__.startswith("lowbit.")}
    assert own >= {"rtn", "gptq", "awq", "minmax", "pbllm", "pbllm-hessian"}
    # post-training transforms over a base method, and kquant (a trained grid's steps would be re-rounded to 6 bits
    # after training: no exact fold): QAT refuses them in one line
    ptq_only = {"smoothquant", "repq", "kquant"}
    assert own - ptq_only <= set(QAT_QUANTIZERS.names())
    for name in ptq_only:
        with pytest.raises(LowbitError, match=f"unknown QAT quantizer .*'{name}'; choose one of"):
            prepare_qat(TinyDual(), f"vision=w8:{name}")


def test_pbllm_hessian_needs_calibration_and_ranks_by_it() -> None:
    with pytest.raises(LowbitError, match="needs calibration data"):
        prepare_qat(TinyDual(), PBLLM_HESSIAN)
    model = _prepare(PBLLM_HESSIAN)
    layers = qat_layers(model)
    assert layers and all(isinstance(layer.quantizer, PBLLMLSQ) for _, layer in layers)
    for _, layer in layers:
        w = layer.latent_matrix()
        hessian = DiagonalHessian().stats_for("", "", layer.module).hessian
        assert torch.equal(layer.quantizer.mask, salient_mask(w, 0.1, hessian))
    w = layers[-1][1].latent_matrix()
    assert not torch.equal(layers[-1][1].quantizer.mask, salient_mask(w, 0.1))  # not the magnitude mask


@pytest.mark.parametrize("recipe", [MINMAX, PBLLM_HESSIAN])
def test_untrained_fold_is_the_ptq_model(recipe: str) -> None:
    pixels, tokens = _batch(TinyDual())
    qat, ptq = _prepare(recipe), TinyDual()
    report = convert_qat(qat)
    ptq_report = quantize_(ptq, recipe, calibration=DiagonalHessian(), progress=False)
    with torch.no_grad():
        assert torch.equal(_outputs(qat, pixels, tokens), _outputs(ptq, pixels, tokens))
    assert [(m.kind, m.packed_bytes) for m in report.modules] == [(m.kind, m.packed_bytes) for m in ptq_report.modules]


@pytest.mark.parametrize(("recipe", "row", "kind"), [(MINMAX, "offset4", "offset_linear"),
                                                      (PBLLM_HESSIAN, "pbllm", "pbllm_linear")])
def test_a_qat_step_trains_and_folds_into_its_storage_format(recipe: str, row: str, kind: str,
                                                             tmp_path: Path) -> None:
    model = _prepare(recipe)
    pixels, tokens = _batch(model)
    params = qat_parameters(model)
    before = {id(p): p.detach().clone() for group in params.values() for p in group}
    with torch.no_grad():
        start = _outputs(model, pixels, tokens)
    opt = torch.optim.SGD([p for group in params.values() for p in group], lr=0.05)
    img, txt = model.encode_image(pixels), model.encode_text(tokens)
    (img @ txt.T).pow(2).sum().backward()
    opt.step()
    # Latent weights and every layer's step moved, and the fake-quantized model computes something new.
    assert all(not torch.equal(p, before[id(p)]) for p in params["weights"])
    for name, layer in qat_layers(model):
        assert not torch.equal(layer.quantizer.scale, before[id(layer.quantizer.scale)]), name
    with torch.no_grad():
        trained = _outputs(model, pixels, tokens)
    assert not torch.equal(trained, start)
    fake_weights = {n: layer.weight.detach().clone() for n, layer in qat_layers(model)}
    kinds = {n: layer.kind for n, layer in qat_layers(model)}
    report = convert_qat(model)
    assert {m.kind for m in report.modules if kinds[m.path] == "linear"} == {kind}
    for name, w in fake_weights.items():  # folded bit for bit into the row's storage
        folded = model.get_submodule(name)
        assert format_of(folded.packed).name == row
        assert torch.equal(folded.effective_weight(), w), name
    if row == "offset4":
        assert all(isinstance(model.get_submodule(n).packed, OffsetPacked) for n in fake_weights)
    set_backend(model, "reference")
    with torch.no_grad():
        folded_out = _outputs(model, pixels, tokens)
    torch.testing.assert_close(folded_out, trained, rtol=0, atol=1e-6)
    save_quantized(model, report, load_recipe(recipe), tmp_path / "ck")
    loaded = load_quantized(tmp_path / "ck", build_float=lambda source: TinyDual())
    set_backend(loaded, "reference")
    with torch.no_grad():
        assert torch.equal(_outputs(loaded, pixels, tokens), folded_out)


def test_minmax_estimator_starts_on_the_ptq_grid_and_learns_step_and_minimum() -> None:
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    q = QAT_QUANTIZERS.get("minmax").make(w, load_recipe("*=w3g8:minmax").rules[0].spec, {}, "linear",
                                          QuantContext())
    assert isinstance(q, MinMaxLSQ)
    with torch.no_grad():
        q.scale.mul_(0.8)  # some weights now clip at the top code: the minimum gets gradient from them
    wl = w.clone().requires_grad_(True)
    q(wl).pow(2).sum().backward()
    assert wl.grad is not None and q.scale.grad is not None and q.minimum.grad is not None
    assert q.scale.grad.abs().sum() > 0 and q.minimum.grad.abs().sum() > 0
    assert torch.equal(q(w), q.pack(w).packed.dequantize())
