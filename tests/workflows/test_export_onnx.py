"""``lowbit export --format onnx``: the repack into MatMulNBits / DequantizeLinear is bit-exact, ONNX Runtime's
embeddings match lowbit's, unsupported layers and models are said, not hidden."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels import fast
from lowbit.kernels.quant_linear import QuantLinear
from lowbit.kernels.storage import storage_format
from lowbit.workflows.export import export

pytest.importorskip("onnxruntime")
onnx_export = pytest.importorskip("lowbit.workflows.export.onnx")


def _layer(name: str, n: int, k: int, group: int, seed: int = 0) -> nn.Module:
    packed = storage_format(name).sample(n, k, group, torch.Generator().manual_seed(seed))
    return storage_format(name).module.from_packed(packed, bias=None)


def _run(layer: nn.Module, x: torch.Tensor, accuracy_level: int) -> tuple[np.ndarray, dict]:
    proto, plans = onnx_export.export_module(nn.Sequential(layer), (x,), ["x"], "y", {"x": {0: "m"}},
                                             accuracy_level=accuracy_level)
    y = onnx_export.ort_session(proto).run(None, {"x": x.numpy()})[0]
    return y, plans[0].record()


# (rows, inputs, lowbit group) -> MatMulNBits block: a power of two >= 16, or per channel (one padded block)
NBITS_SHAPES = [(48, 128, 32), (40, 96, 16), (16, 256, 128), (8, 70, 32), (24, 40, 40), (12, 1280, 1280)]


@pytest.mark.parametrize("fmt", ["int4", "uint4", "int8", "uint8"])
@pytest.mark.parametrize("shape", NBITS_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matmul_nbits_weight_is_bit_exact(fmt, shape):
    """An identity input at accuracy_level 0 reads the weight back: ORT's dequantization equals lowbit's, bit
    for bit; at accuracy_level 4 (int8 activations) the output stays within lowbit's own int8-activation bound."""
    n, k, group = shape
    layer = _layer(fmt, n, k, group)
    w = layer.packed.dequantize()
    got, record = _run(layer, torch.eye(k), accuracy_level=0)
    assert record["op"] == "MatMulNBits" and record["bits"] == storage_format(fmt).bits
    assert np.array_equal(got, w.T.numpy())
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(1))
    y4, _ = _run(layer, x, accuracy_level=4)
    ref = (x.double() @ w.double().T).numpy()
    bound = fast.error_bound(x, w, record["block_size"]).numpy() + 1e-5 * (x.abs() @ w.abs().T).double().numpy()
    assert (np.abs(y4 - ref) <= bound).all()


# (format, rows, inputs, group): per-channel 8-bit wider than lowbit's 128-input activation block (the projector
# heads), a group of 256 (two activation blocks per group), zero points, a group the kernels leave to the
# reference path (16: float activations in lowbit, so float compute in ORT), a row shorter than a block
DEFAULT_LEVEL_SHAPES = [("int8", 64, 1280, 1280), ("uint8", 16, 200, 200), ("int4", 32, 512, 256),
                        ("uint4", 32, 192, 64), ("int4", 24, 40, 40), ("int4", 16, 128, 16)]


@pytest.mark.skipif(not fast.is_available(), reason="lowbit's CPU kernels are not built here")
@pytest.mark.parametrize("spec", DEFAULT_LEVEL_SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_int8_export_computes_as_lowbit_kernels(spec):
    """At accuracy_level 4 each MatMulNBits rounds activations where and as lowbit's kernel does (its activation
    blocks, or float where lowbit runs float): ORT's output equals lowbit's kernels' to float rounding, not merely
    within two independent int8 errors (~1.5% each: what per-channel blocks spanning the row gave). By default
    (level 0) it equals lowbit's reference backend."""
    from lowbit.kernels.quant_linear import set_backend

    fmt, n, k, group = spec
    layer = _layer(fmt, n, k, group)
    x = torch.randn(33, k, generator=torch.Generator().manual_seed(2)) * torch.linspace(0.1, 4, k)
    for level, backend in ((4, "cpu"), (None, "reference")):
        proto, plans = onnx_export.export_module(nn.Sequential(layer), (x,), ["x"], "y", {"x": {0: "m"}},
                                                 **({} if level is None else {"accuracy_level": level}))
        got = torch.from_numpy(onnx_export.ort_session(proto).run(None, {"x": x.numpy()})[0]).double()
        set_backend(layer, backend)
        with torch.no_grad():
            ours = layer(x).double()
        record = plans[0].record()
        assert record["accuracy_level"] == (0 if group == 16 or level is None else 4), record
        if record["accuracy_level"] == 4:
            assert record["block_size"] == min(record["lowbit_activation_block"], max(16, 1 << (k - 1).bit_length()))
        assert float((got - ours).norm() / ours.norm()) < 2e-6, record


def test_matmul_nbits_zero_points_only_when_stored():
    sym, _ = onnx_export.export_module(nn.Sequential(_layer("int4", 8, 64, 32)), (torch.randn(1, 64),), ["x"], "y")
    asym, _ = onnx_export.export_module(nn.Sequential(_layer("uint4", 8, 64, 32)), (torch.randn(1, 64),), ["x"], "y")
    inputs = {len(n.input) for p in (sym, asym) for n in p.graph.node if n.op_type == "MatMulNBits"}
    assert inputs == {3, 4}  # A, B, scales (+ zero_points for uint4): lowbit's implied zero is the op's default 8
    node = next(n for n in sym.graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: a.i for a in node.attribute}
    assert attrs == {"K": 64, "N": 8, "bits": 4, "block_size": 32, "accuracy_level": 0}


@pytest.mark.parametrize("fmt,group,why", [
    ("int4", 24, "not a power of two"), ("int3", 32, "3-bit"), ("uint2", 32, "2-bit"), ("binary", 32, "1-bit"),
    ("offset4", 32, "OffsetPacked"), ("offset3", 64, "OffsetPacked"), ("ternary-base3", 32, "Base3Packed"),
])
def test_dequantize_linear_fallback_is_bit_exact(fmt, group, why):
    """Grids MatMulNBits cannot hold go through DequantizeLinear (packed, exact), and the report says which."""
    layer = _layer(fmt, 16, 128, group)
    got, record = _run(layer, torch.eye(128), accuracy_level=0)
    assert record["op"] == "DequantizeLinear" and record["packed"] and record["exact_weight"]
    assert np.array_equal(got, layer.packed.dequantize().T.numpy()), why


def test_unsupported_format_is_written_float_and_reported():
    """PB-LLM's sparse side has no ONNX op: the layer is the exact float weight and the report says so."""
    layer = _layer("pbllm", 16, 128, 32)
    got, record = _run(layer, torch.eye(128), accuracy_level=0)
    assert record["op"] == "float" and not record["packed"]
    assert "not packed" in record["note"]
    assert np.array_equal(got, layer.packed.dequantize().T.numpy())


def test_input_scale_bias_and_conv_layers():
    """AWQ's input scale and the bias are applied as lowbit applies them; a 3x3 conv reads a DequantizeLinear
    weight; outputs equal lowbit's reference path."""
    from lowbit.kernels.formats import PackedWeight, pack_codes
    from lowbit.kernels.quant_linear import QuantWeightParam, set_backend

    g = torch.Generator().manual_seed(3)
    packed = storage_format("int4").sample(32, 64, 32, g)
    linear = QuantLinear.from_packed(packed, bias=torch.randn(32, generator=g),
                                     input_scale=torch.rand(64, generator=g) + 0.5)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    with torch.no_grad():  # its bias from g too: the global RNG's state depends on which tests ran before
        conv.bias.copy_(torch.rand(8, generator=g) - 0.5)
    codes = torch.randint(0, 16, (8, 72), generator=g, dtype=torch.uint8)
    QuantWeightParam.attach(conv, PackedWeight(pack_codes(codes, 4), torch.rand(8, 3, generator=g).half(), None, 4,
                                               32, (8, 8, 3, 3)))
    model = nn.Sequential(conv, nn.Flatten(2), nn.Unflatten(2, (4, 8)), nn.Flatten(1, 2), nn.Flatten(1),
                          nn.Unflatten(1, (4, 64)), linear).eval()
    set_backend(model, "reference")
    x = torch.randn(2, 8, 4, 8, generator=g)
    proto, plans = onnx_export.export_module(model, (x,), ["x"], "y", accuracy_level=0)
    assert [p.op for p in plans] == ["DequantizeLinear", "MatMulNBits"]
    with torch.no_grad():
        want = model(x).numpy()
    got = onnx_export.ort_session(proto).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert isinstance(model[0], QuantWeightParam) and isinstance(model[-1], QuantLinear)  # swapped back


def test_torch_onnx_export_of_a_packed_module_refuses(tmp_path):
    """The original complaint: torch.onnx.export of packed modules wrote a graph of one Constant node."""
    model = nn.Sequential(_layer("int4", 8, 64, 32)).eval()
    with pytest.raises(LowbitError, match="lowbit export MODEL --format onnx"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 64),), str(tmp_path / "m.onnx"), dynamo=False)


# --- the built-in models: the numbers (500 images, every prompt) ------------------------------------------
# A low-bit layout that reaches every exported op (4-bit embeddings with zero points, 8-bit projector and convs,
# 4-bit group-128 linears and 1x1 convs: the w4 preset's before its convs became data-free, issue 20) with RTN
# everywhere: GPTQ's calibration would take minutes; the export does not care who chose the codes.
W4_RTN = {"version": 1, "rules": [
    {"tower": "*", "pattern": "*", "kinds": ["embedding"], "method": "rtn", "bits": 4, "group_size": 32,
     "symmetric": False},
    {"tower": "projector", "pattern": "*", "method": "rtn", "bits": 8},
    {"tower": "*", "pattern": "*", "kinds": ["conv"], "method": "rtn", "bits": 8},
    {"tower": "*", "pattern": "*", "kinds": ["linear", "conv1x1"], "method": "rtn", "bits": 4, "group_size": 128},
]}


# --- whole models ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from tests.models.conftest import write_tiny

    return {kind: write_tiny(tmp_path_factory.mktemp(f"onnx-{kind}"), kind) for kind in ("clip", "siglip")}


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_tiny_dual_encoder_exports_and_matches(kind, tiny_dirs, tmp_path):
    from PIL import Image

    import lowbit
    from lowbit.quant.recipe import Recipe

    model = lowbit.load(str(tiny_dirs[kind]))
    lowbit.quantize(model, Recipe.from_dict(W4_RTN, "w4-rtn"), progress=False)  # embeddings and the patch conv too
    report = export(model, "onnx", tmp_path / "out")
    assert report["ops"]["DequantizeLinear"] >= 3  # token + position tables, the patch conv
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {"image.onnx", "text.onnx", "lowbit_onnx.json", "tokenizer"}
    assert report["ops"]["MatMulNBits"] >= 8 and report["probe_cosine"]["image"] > 0.999
    meta = json.loads((out / "lowbit_onnx.json").read_text())
    assert meta["embedding"]["normalized"] and meta["image"]["preprocess"]["input_size"] == [3, 32, 32]
    assert (meta["logit_bias"] is None) == (kind == "clip")
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    ort_model = onnx_export.OrtDualEncoder(out, model)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(5)]
    texts = ["a photo of a red circle", "green square on the left", "a", "blue triangle on the right side"]
    with torch.inference_mode():
        pairs = [(model.embed_images(images), ort_model.embed_images(images)),
                 (model.embed_texts(texts), ort_model.embed_texts(texts))]
    for lowbit_emb, ort_emb in pairs:
        assert torch.nn.functional.cosine_similarity(lowbit_emb, ort_emb, dim=-1).min() > 0.999


def test_bad_inputs_are_one_line(tiny_dirs, tmp_path):
    import lowbit
    from tests.models.llava_tiny import write_tiny_llava

    llava = lowbit.load(str(write_tiny_llava(tmp_path / "llava")))
    with pytest.raises(LowbitError, match="onnx export takes dual encoders") as err:
        export(llava, "onnx", tmp_path / "x")
    assert "\n" not in str(err.value) and not (tmp_path / "x").exists()
    with pytest.raises(LowbitError, match="onnx export takes dual encoders"):
        export(nn.Linear(2, 2), "onnx", tmp_path / "x")
    model = lowbit.load(str(tiny_dirs["clip"]))
    with pytest.raises(LowbitError, match="accuracy_level 2 is not accepted"):
        export(model, "onnx", tmp_path / "x", accuracy_level=2)
    with pytest.raises(LowbitError, match="accepted options: accuracy_level"):
        export(model, "onnx", tmp_path / "x", level=4)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(LowbitError) as err:
        export(model, "onnx", blocker / "out")
    assert "\n" not in str(err.value)


def test_failed_export_leaves_nothing_under_the_name(tiny_dirs, tmp_path, monkeypatch):
    import lowbit

    model = lowbit.load(str(tiny_dirs["clip"]))

    def broken(*args, **kwargs):
        raise LowbitError("onnx export: the image graph came out empty")

    monkeypatch.setattr(onnx_export, "_check_graph", broken)
    with pytest.raises(LowbitError, match="came out empty"):
        export(model, "onnx", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lit-fashion", "clip-vit-tiny-fashion"])
def test_builtin_model_ort_matches_lowbit(name, tmp_path, monkeypatch):
    """On 500 Fashion-MNIST images and every prompt, the issue's bounds for the default export (float compute):
    ORT's embeddings equal lowbit's quantized model (reference backend) and give the same top-1. At
    accuracy_level 4 (int8 activations in lowbit's own blocks) ORT stays as close to lowbit's kernels as int8
    rounding through EfficientNet allows: lowbit's own output moves as far under a 1e-7 input perturbation.
    The kernels' float path of small weights is off here (ORT's level 4 rounds every layer's activations; with
    it on, lit-fashion's first blocks are exact on lowbit's side: min cosine 0.990 to ORT's int8)."""
    import lowbit
    from lowbit.data.resolve import resolve_dataset
    from lowbit.kernels import fast
    from lowbit.kernels.quant_linear import set_backend
    from lowbit.quant.recipe import Recipe

    monkeypatch.setattr(fast, "DENSE_MAX_WEIGHTS", 0)

    model = lowbit.load(name)
    lowbit.quantize(model, Recipe.from_dict(W4_RTN, "w4-rtn"), progress=False)
    report = export(model, "onnx", tmp_path / "float")
    export(model, "onnx", tmp_path / "int8", accuracy_level=4)
    assert report["ops"]["MatMulNBits"] >= 40 and "float" not in report["ops"]
    assert report["accuracy_level"]["per_layer"] == {"0": report["ops"]["MatMulNBits"]}
    data = resolve_dataset("fashion-mnist", limit=500)
    kernels = onnx_export.compare_with_lowbit(model, tmp_path / "int8", data)
    assert kernels["n_images"] == 500 and kernels["n_prompts"] == 10 * len(data.templates)
    assert kernels["image_cosine_min"] >= 0.995 and kernels["text_cosine_min"] >= 0.999, kernels
    assert kernels["image_cosine_mean"] >= 0.999 and abs(kernels["top1_delta_pt"]) <= 1.0, kernels
    set_backend(model, "reference")
    exact = onnx_export.compare_with_lowbit(model, tmp_path / "float", data)
    assert exact["image_cosine_min"] >= 0.99999 and exact["text_cosine_min"] >= 0.99999, exact
    assert exact["top1_delta_pt"] == 0, exact


def test_metadata_describes_lit_preprocessing():
    """lit-fashion's preprocessing as written in the JSON (no model load: the function reads the constants)."""
    from lowbit.models.towers import IMAGENET_MEAN

    class Fake:
        image_processor = None

    info = onnx_export._image_preprocessing(Fake(), torch.zeros(1, 3, 96, 96))  # type: ignore[arg-type]
    assert info["resize"] == [96, 96] and info["image_mean"] == list(IMAGENET_MEAN) and info["channel_order"] == "RGB"
    assert Path(onnx_export.METADATA_FILE).suffix == ".json"
