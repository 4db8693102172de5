"""Activation quantization: recipe schemes, the grid, static calibration, save/load of the scales, SmoothQuant."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels import act_quant
from lowbit.kernels.act_quant import ActSpec
from lowbit.kernels.attn_quant import AttnQuant, AttnSpec, quantize_probs
from lowbit.kernels.quant_linear import QuantLinear
from lowbit.quant.act_calibration import collect_ranges
from lowbit.quant.apply import quantize_
from lowbit.quant.calibration import ActivationCalibrator, ModuleCalibrator
from lowbit.quant.methods import QuantContext, get_method
from lowbit.quant.primitives import QuantSpec
from lowbit.quant.recipe import Recipe, load_recipe
from lowbit.workflows.checkpoint import load_quantized, save_quantized


# --- recipes ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "weights", "acts"), (
    ("*=w8a8", "w8", ActSpec(8)),
    ("*=w4g64a8:gptq", "w4g64", ActSpec(8)),
    ("*=w4g64aa4z", "w4g64a", ActSpec(4, symmetric=False)),
    ("*=w8a8dk", "w8", ActSpec(8, dynamic=True, granularity="token")),
    ("*=w8a8g64", "w8", ActSpec(8, granularity="group", group_size=64)),
    ("*=w4a", "w4a", None),
    ("*=w8a16", "w8", None),
))
def test_short_form_reads_activation_schemes(text: str, weights: str, acts: ActSpec | None) -> None:
    rule = load_recipe(text).rules[0]
    assert rule.spec.short() == weights and rule.activations == acts
    again = Recipe.from_dict(load_recipe(text).to_dict())
    assert again.rules[0].activations == acts  # the manifest's recipe reads back
    if acts is not None:
        assert acts.short() in rule.describe()


@pytest.mark.parametrize(("text", "match"), (
    ("*=w8a8k", "token' is dynamic only"), ("*=w8a9", "activation bits 9"), ("*=w8a8x", "unexpected 'x'"),
    ("*=w8a8g", "group size"),
))
def test_bad_short_schemes_are_one_line(text: str, match: str) -> None:
    with pytest.raises(LowbitError, match=match):
        load_recipe(text)


def test_yaml_rule_takes_a_mapping_or_a_short_string() -> None:
    recipe = Recipe.from_dict({"rules": [
        {"tower": "vision", "bits": 8, "activations": {"bits": 8, "calibration": "percentile", "percentile": 99.9}},
        {"tower": "text", "bits": 4, "activations": "a4z"},
        {"tower": "*", "bits": 8, "activations": "a16"}]})
    assert recipe.rules[0].activations == ActSpec(8, calibration="percentile", percentile=99.9)
    assert recipe.rules[1].activations == ActSpec(4, symmetric=False) and recipe.rules[2].activations is None
    with pytest.raises(LowbitError, match="rule 0 field 'activations'"):
        Recipe.from_dict({"rules": [{"bits": 8, "activations": {"bits": 8, "sym": True}}]})
    with pytest.raises(LowbitError, match="a skip rule takes only"):
        Recipe.from_dict({"rules": [{"skip": True, "activations": "a8"}]})


# --- the grid -----------------------------------------------------------------------------------------------
def test_static_grid_is_integer_codes_times_the_scale() -> None:
    x = torch.randn(50, 70, generator=torch.Generator().manual_seed(0)) * 4
    for spec, zero in ((ActSpec(8), None), (ActSpec(4), None), (ActSpec(4, symmetric=False), torch.tensor([6.0]))):
        scale = torch.tensor([0.05])
        xq = act_quant.fake_quant(x, spec, scale, zero)
        codes = xq / 0.05
        torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)
        lo, hi = act_quant.grid_limits(spec, zero)
        assert float(codes.min()) >= float(lo) - 1e-4 and float(codes.max()) <= float(hi) + 1e-4
        assert torch.equal(act_quant.fake_quant(xq, spec, scale, zero), xq)  # idempotent


def test_dynamic_per_token_follows_each_row() -> None:
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    x[2] *= 100
    xq = act_quant.fake_quant(x, ActSpec(8, dynamic=True, granularity="token"))
    rel = (xq - x).abs().amax(dim=1) / x.abs().amax(dim=1)
    assert float(rel.max()) <= 0.5 / 127 + 1e-6  # each row rounded on its own range


# --- quantize_, static calibration, save / load ------------------------------------------------------------
class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(96, 128), nn.Linear(128, 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_minmax_calibration_gives_the_range_of_each_input() -> None:
    model = _MLP().eval()
    batches = [torch.randn(8, 96, generator=torch.Generator().manual_seed(i)) * (i + 1) for i in range(3)]
    with torch.no_grad():
        h = torch.relu(model.fc1(torch.cat(batches)))
    quantize_(model, "*=w8a8", calibration=ModuleCalibrator(model, batches), progress=False)
    assert isinstance(model.fc1, QuantLinear) and model.fc1.act_spec == ActSpec(8)
    top = float(torch.cat(batches).abs().max())
    torch.testing.assert_close(model.fc1.act_scale, torch.tensor([top / 127]))
    # fc2 sees fc1's quantized-weight output (calibrated after every weight is quantized): close to the float one
    assert abs(float(model.fc2.act_scale) * 127 / float(h.max()) - 1) < 0.02
    with pytest.raises(LowbitError, match="static scales, which need calibration"):
        quantize_(_MLP(), "*=w8a8", progress=False)
    quantize_(_MLP(), "*=w8a8dk", progress=False)  # dynamic: no calibration needed


def test_percentile_clips_rare_outliers() -> None:
    model = _MLP().eval()
    x = torch.randn(400, 96, generator=torch.Generator().manual_seed(0))
    x[0, 0] = 1000.0
    targets = [("model", "fc1", model.fc1)]
    model.fc1 = QuantLinear.from_packed(get_method("rtn").quantize_weight(
        model.fc1.weight.detach(), QuantSpec(8), QuantContext(), {}).packed, model.fc1.bias)
    targets = [("model", "fc1", model.fc1)]
    calib = ModuleCalibrator(model, [x])
    (lo_m, hi_m), = collect_ranges(calib, targets, [ActSpec(8)])
    (lo_p, hi_p), = collect_ranges(calib, targets, [ActSpec(8, calibration="percentile", percentile=99.9)])
    assert float(hi_m) == 1000.0 and float(hi_p) < 5.0 and float(lo_p) > -5.0


def _tiny_clip(tmp_path: Path):  # type: ignore[no-untyped-def]
    from lowbit.models import load_model
    from tests.models.conftest import write_tiny

    return load_model(str(write_tiny(tmp_path / "clip", "clip")))


IMAGES = [Image.new("RGB", (40, 40), c) for c in ("red", "blue", "green", "white")]
TEXTS = ["a red circle on the left", "a blue square", "a photo of the green triangle", "the right"]


@pytest.mark.parametrize("recipe", ("vision=w8a8,text=w8a8,projector=w8a8,attention=a8",
                                    "vision=w4g32a8:smoothquant,text=w8a4z,projector=w8a8g16,attention=a4l"))
def test_static_scales_round_trip_through_save_and_load(tmp_path: Path, recipe: str) -> None:
    model = _tiny_clip(tmp_path).eval()
    calib = ActivationCalibrator(model, IMAGES, TEXTS, batch_size=2)
    parsed = load_recipe(recipe)
    report = quantize_(model, parsed, calibration=calib, progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.act_spec is not None and float(m.act_scale.min()) > 0 for m in layers)
    out = save_quantized(model, report, parsed, tmp_path / "ckpt")
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(("activations" in meta) == (meta["kind"] == "linear") for meta in manifest["modules"].values())
    assert report.modules[0].kind == "conv" and report.modules[0].activations is None  # k x k: float inputs
    assert len(report.attention) == 4 and manifest["recipe"]["attention"]["bits"] == parsed.attention.bits
    loaded = load_quantized(out)
    assert sum(isinstance(m, AttnQuant) for m in loaded.modules()) == 4
    pix = model.preprocess(IMAGES)
    tok = model.tokenize(TEXTS)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(pix), model.encode_image(pix))
        assert torch.equal(loaded.encode_text(tok), model.encode_text(tok))
    for a, b in zip(layers, [m for m in loaded.modules() if isinstance(m, QuantLinear)], strict=True):
        assert a.act_spec == b.act_spec and torch.equal(a.act_scale, b.act_scale)
        assert (a._buffers.get("act_zero") is None) == (b._buffers.get("act_zero") is None)


def test_a_bad_manifest_activation_scheme_is_refused(tmp_path: Path) -> None:
    model = _MLP().eval()
    from lowbit.workflows.manifest import validate_manifest

    meta = {"tower": "model", "name": "fc1", "kind": "linear", "bits": 8, "group_size": 96, "symmetric": True,
            "method": "rtn", "shape": [128, 96], "has_input_scale": False, "activations": {"bits": 9}}
    manifest = {"format": "lowbit-packed", "format_version": 2, "modules": {"fc1": meta}}
    with pytest.raises(LowbitError, match="field 'activations'"):
        validate_manifest(manifest, tmp_path / "manifest.json", "lowbit-packed", (1, 2), ("fp32", "fp16"))
    del model


# --- SmoothQuant --------------------------------------------------------------------------------------------
def test_smoothquant_leaves_the_float_function_unchanged() -> None:
    from lowbit.quant.smoothquant import smoothing_scale

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g)
    x = torch.randn(200, 96, generator=g)
    x[:, 3] *= 50  # an outlier channel
    for alpha in (0.3, 0.5, 0.8):
        s = smoothing_scale(x.abs().amax(0), w, alpha)
        torch.testing.assert_close((x / s) @ (w * s).T, x @ w.T, rtol=1e-5, atol=1e-4)
        assert float((x / s).abs().amax(0)[3]) < float(x.abs().amax(0)[3])  # the outlier channel shrank


def test_smoothquant_beats_plain_w8a8_on_an_outlier_channel() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g) * 0.05
    x = torch.randn(512, 128, generator=g)
    x[:, :4] *= 60  # outlier channels, as in transformer activations
    act_max = x.abs().amax(0)
    ctx = QuantContext(inputs=x, hessian=2 / x.shape[0] * x.double().T @ x.double(),
                       extra={"act_abs_max": act_max, "act_spec": ActSpec(8)})
    result = get_method("smoothquant").quantize_weight(w.clone(), QuantSpec(8), ctx, {})
    assert result.input_scale is not None and ctx.extra["smoothquant_alpha"] is not None

    def w8a8_error(wq: torch.Tensor, s: torch.Tensor) -> float:
        xs = x / s
        xq = act_quant.fake_quant(xs, ActSpec(8), (xs.abs().max() / 127).reshape(1))
        return float((x @ w.T - xq @ wq.T).norm() / (x @ w.T).norm())

    plain = w8a8_error(get_method("rtn").quantize_weight(w, QuantSpec(8), QuantContext(), {}).packed.dequantize(),
                       torch.ones(128))
    smooth = w8a8_error(result.packed.dequantize(), result.input_scale)
    assert smooth < 0.5 * plain, (smooth, plain)
    gptq = get_method("smoothquant").quantize_weight(w.clone(), QuantSpec(4, 32), ctx, {"base": "gptq"})
    assert gptq.input_scale is not None
    with pytest.raises(LowbitError, match="base="):
        get_method("smoothquant").quantize_weight(w, QuantSpec(8), ctx, {"base": "awq"})


class _Block(nn.Module):
    """A norm read by two linears (pre-norm, ``post_ln=False``) or also by the residual (post-LN)."""

    def __init__(self, post_ln: bool, norm: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.post_ln = post_ln
        self.inp = nn.Linear(32, 48)
        self.norm = norm(48)
        self.q, self.k = nn.Linear(48, 48), nn.Linear(48, 48)
        self.out = nn.Linear(48, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.inp(x))
        z = self.q(y) * torch.sigmoid(self.k(y))
        return self.out(z + y if self.post_ln else z)


def _outlier_inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(64, 32, generator=g) for _ in range(2)]


def _with_outliers(block: _Block) -> _Block:
    with torch.no_grad():  # outlier channels in the norm's output, as in transformer activations
        block.norm.weight[:3] = 40.0
    return block.eval()


@pytest.mark.parametrize("norm", (nn.LayerNorm, nn.RMSNorm), ids=("layernorm", "rmsnorm"))
def test_smoothquant_folds_into_the_norm_exactly(norm: type[nn.Module]) -> None:
    from lowbit.quant.smoothquant import fold_into_norms

    model = _with_outliers(_Block(post_ln=False, norm=norm))
    x = torch.cat(_outlier_inputs())
    with torch.no_grad():
        ref, top = model(x), model.norm(model.inp(x)).abs().amax(0)
    rule = load_recipe("*=w8a8:smoothquant").rules[0]
    targets = [("model", n, m, rule) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    done = fold_into_norms(ModuleCalibrator(model, _outlier_inputs()), {"model": model}, targets)
    assert list(done["folded"]) == ["model/norm"] and done["folded"]["model/norm"] is not None
    assert sorted(done["layers"]) == ["model/k", "model/q"]  # one shared scale for the norm's two readers
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-4)  # the float function is unchanged
        assert float(model.norm(model.inp(x)).abs().amax(0)[:3].max()) < float(top[:3].min())  # outliers shrank


def test_smoothquant_keeps_an_input_scale_where_the_norm_feeds_a_residual() -> None:
    model = _with_outliers(_Block(post_ln=True))
    x = torch.cat(_outlier_inputs())
    with torch.no_grad():
        ref = model(x)
    norm_weight = model.norm.weight.clone()
    report = quantize_(model, "*=w8a8:smoothquant", calibration=ModuleCalibrator(model, _outlier_inputs()),
                       progress=False)
    assert report.transforms["smoothquant"] == {"folded": {}, "layers": []}  # the fold was tried and undone
    assert torch.equal(model.norm.weight, norm_weight)
    assert model.q.input_scale is not None  # per layer, as an input scale
    with torch.no_grad():
        assert float(torch.nn.functional.cosine_similarity(model(x), ref).min()) > 0.99


def test_smoothquant_folded_layers_carry_no_input_scale(tmp_path: Path) -> None:
    torch.manual_seed(0)
    float_model = _with_outliers(_Block(post_ln=False))
    x = torch.cat(_outlier_inputs())

    def readers_error(m: _Block) -> float:  # relative error of the norm's two readers' outputs
        with torch.no_grad():
            y, y_ref = m.norm(m.inp(x)), float_model.norm(float_model.inp(x))
            ref = torch.cat([float_model.q(y_ref), float_model.k(y_ref)])
            return float((torch.cat([m.q(y), m.k(y)]) - ref).norm() / ref.norm())

    plain = copy.deepcopy(float_model)
    quantize_(plain, "*=w8a8", calibration=ModuleCalibrator(plain, _outlier_inputs()), progress=False)
    model = copy.deepcopy(float_model)
    recipe = load_recipe("*=w8a8:smoothquant")
    report = quantize_(model, recipe, calibration=ModuleCalibrator(model, _outlier_inputs()), progress=False)
    assert sorted(report.transforms["smoothquant"]["layers"]) == ["model/k", "model/q"]
    assert model.q.input_scale is None and model.k.input_scale is None  # no division left at run time
    assert readers_error(model) < 0.5 * readers_error(plain)
    loaded = load_quantized(save_quantized(model, report, recipe, tmp_path / "ckpt"),
                            build_float=lambda source: copy.deepcopy(float_model))  # the folded norm is saved
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


# --- attention matmuls --------------------------------------------------------------------------------------
def test_attention_schemes_parse() -> None:
    assert load_recipe("*=w8a8,attention=a8").attention == AttnSpec(8, "uniform", 8)
    assert load_recipe("*=w4a4,attention=a4l").attention == AttnSpec(4, "log2", 4)
    assert load_recipe("*=w8,attention=a8p4l").attention == AttnSpec(8, "log2", 4)
    assert load_recipe("*=w8,attention=a16").attention is None
    assert Recipe.from_dict(load_recipe("*=w8,attention=a4l").to_dict()).attention == AttnSpec(4, "log2", 4)
    with pytest.raises(LowbitError, match="aBITS"):
        load_recipe("*=w8,attention=a9")


def test_log2_probabilities_keep_the_small_ones() -> None:
    p = torch.softmax(torch.randn(64, 197, generator=torch.Generator().manual_seed(0)) * 3, dim=-1)
    log2 = quantize_probs(p, AttnSpec(4, "log2", 4))
    uniform = quantize_probs(p, AttnSpec(4, "uniform", 4))
    assert torch.all((log2 == 0) | (torch.log2(log2) == torch.log2(log2).round()))  # powers of two
    # at 4 bits the uniform grid (step 1/15) zeroes nearly every probability; log2 keeps the mass
    assert float((p - log2).abs().sum(-1).mean()) < 0.6 * float((p - uniform).abs().sum(-1).mean())


def test_quantized_attention_stays_close_to_float(tmp_path: Path) -> None:
    model = _tiny_clip(tmp_path).eval()
    pix = model.preprocess(IMAGES)
    with torch.no_grad():
        ref = model.encode_image(pix)
    quantize_(model, "vision=w8,text=w8,projector=w8,attention=a8",
              calibration=ActivationCalibrator(model, IMAGES, TEXTS, batch_size=2), progress=False)
    with torch.no_grad():
        got = model.encode_image(pix)
    assert float(torch.nn.functional.cosine_similarity(got, ref).min()) > 0.99


# --- RepQ-ViT -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", (ActSpec(4, symmetric=False), ActSpec(4)), ids=lambda s: s.short())
def test_repq_reparameterisation_is_exact_in_float(tmp_path: Path, spec: ActSpec) -> None:
    from lowbit.quant.repq import reparameterize

    model = _tiny_clip(tmp_path).eval()
    pix, tok = model.preprocess(IMAGES), model.tokenize(TEXTS)
    with torch.no_grad():
        ref_img, ref_txt = model.encode_image(pix), model.encode_text(tok)
    towers = model.towers()
    targets = [(t, n, m) for t, root in towers.items() for n, m in root.named_modules() if isinstance(m, nn.Linear)]
    ln = towers["vision"].encoder.layers[0].layer_norm1
    before = ln.weight.clone()
    changed = reparameterize(ActivationCalibrator(model, IMAGES, TEXTS, batch_size=2), towers, targets,
                             [spec] * len(targets))
    assert "vision/encoder.layers.0.layer_norm1" in changed and len(changed) == 9  # 2 per layer, + the pooled one
    assert not torch.equal(ln.weight, before)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pix), ref_img, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_text(tok), ref_txt, rtol=1e-5, atol=1e-5)
    # the reparameterised post-LayerNorm channels share one range: their per-channel grids are now equal
    q = towers["vision"].encoder.layers[0].self_attn.q_proj
    seen: list[torch.Tensor] = []
    handle = q.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model.encode_image(pix)
    handle.remove()
    x = torch.cat(seen)
    width = x.amax(0) - x.amin(0) if not spec.symmetric else x.abs().amax(0)
    assert float(width.std() / width.mean()) < 0.05


def test_repq_recipe_quantizes_and_round_trips(tmp_path: Path) -> None:
    model = _tiny_clip(tmp_path).eval()
    recipe = load_recipe("vision=w8a4z:repq,text=w8a8,projector=w8a8,attention=a4l")
    report = quantize_(model, recipe, calibration=ActivationCalibrator(model, IMAGES, TEXTS, batch_size=2),
                       progress=False)
    assert len(report.transforms["repq"]["repq_layernorms"]) == 4  # the vision tower's 2 layers x 2 norms
    out = save_quantized(model, report, recipe, tmp_path / "ckpt")
    loaded = load_quantized(out)
    pix = model.preprocess(IMAGES)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(pix), model.encode_image(pix))


def test_export_refuses_quantized_activations(tmp_path: Path) -> None:
    from lowbit.workflows.export import export

    model = _tiny_clip(tmp_path).eval()
    quantize_(model, "vision=w8a8dk,text=w8,projector=w8", progress=False)
    with pytest.raises(LowbitError, match="quantize their activations"):
        export(model, "onnx", tmp_path / "onnx")
