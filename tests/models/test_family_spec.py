"""One spec per model family: a family added by one file (tests/models/tiny_family.py) and one
``register_family`` call is quantized (GPTQ), block-wise reconstructed (Block-AP), saved, reloaded and run on
the CPU kernels, with fused q/k/v and gate/up, same-padding convs and clamp activations handled as for the
built-in families."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lowbit.data.shapes import generate_shapes
from lowbit.kernels.fuse_act import FusedActivation
from lowbit.kernels.fusion import SHARED_INPUT_CHILDREN
from lowbit.kernels.inference import optimize_for_inference_
from lowbit.kernels.quant_linear import GROUP_ATTR, QuantLinear, is_quantized, set_backend
from lowbit.kernels.static_padding import registered_same_padding
from lowbit.models.spec import FAMILY_SPECS, embedding_tail, register_family, tower_blocks
from lowbit.quant.apply import layer_kind
from lowbit.quant.block_ap import BlockAPConfig, block_ap_
from lowbit.quant.qat import convert_qat, prepare_qat
from lowbit.quant.recipe import load_recipe
from lowbit.workflows.checkpoint import save_quantized
from lowbit.workflows.load import load
from lowbit.workflows.quantize import quantize, save
from tests.models.tiny_family import FAMILY, SPEC, TinyFamilyModel, write_tiny_family

PTQ_RECIPE = "vision=w4g32:gptq,text=w4g32:gptq,projector=w8"
QAT_RECIPE = "vision=w2g32,text=w2g32,projector=skip"
TEXT_LAYERS, VISION_BLOCKS = 2, 2


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_family(tmp_path_factory.mktemp("tiny-family"))


def _inputs(model: TinyFamilyModel, n: int = 16, seed: int = 3) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    data = generate_shapes(n, seed=seed)
    return model.preprocess(data.images), model.tokenize(data.captions)


def _embeddings(model: TinyFamilyModel, inputs: tuple[torch.Tensor, dict[str, torch.Tensor]]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model.encode_image(inputs[0]), model.encode_text(inputs[1])])  # [2N, D], unit rows


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Lowest cosine similarity between matching rows."""
    return float(nn.functional.cosine_similarity(a, b, dim=-1).min())


def _packed_on_kernels(model: nn.Module) -> list[QuantLinear]:
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.backend == "cpu" for m in layers)
    return layers


def _fused_groups(model: nn.Module) -> int:
    return len({id(m.__dict__[GROUP_ATTR][0]) for m in model.modules() if GROUP_ATTR in m.__dict__})


def test_one_registration_fills_what_every_layer_reads(family_dir: Path) -> None:
    model = load(f"{FAMILY}:{family_dir}")
    assert isinstance(model, TinyFamilyModel) and FAMILY_SPECS.get(FAMILY) is SPEC
    block = model.vision.blocks[0]
    assert tower_blocks(model.vision) == list(model.vision.blocks)  # Block-AP chains
    assert tower_blocks(model.text) == list(model.text.layers)
    assert isinstance(embedding_tail(model, "vision"), nn.Sequential) and embedding_tail(model, "text") is None
    # a SameConv has its own forward: only the spec makes its 1x1 a channel-wise linear
    assert [layer_kind(m)[0] for m in (block.expand, block.depthwise, block.project)] == ["conv1x1", "conv", "conv1x1"]
    assert registered_same_padding(block.depthwise)  # static padding and the depthwise kernel know its padding
    assert SHARED_INPUT_CHILDREN.get("tests.models.tiny_family.GatedMLP") == (("gate_proj", "up_proj"),)
    with pytest.raises(ValueError, match="already registered"):  # registered once
        register_family(SPEC)


def test_gptq_save_reload_runs_on_the_kernels(family_dir: Path, tmp_path: Path) -> None:
    model = load(f"{FAMILY}:{family_dir}")
    inputs = _inputs(model)
    ref = _embeddings(model, inputs)
    # GPTQ calibrates every k x k SameConv (stem, depthwise) on patches padded by the spec's input_padding
    report = quantize(model, PTQ_RECIPE, calib_data="shapes", calib_samples=32, progress=False)
    kinds = sorted({m.kind for m in report.modules})
    assert kinds == ["conv", "conv1x1", "linear"] and len(report.modules) == 1 + 3 * VISION_BLOCKS + 7 * TEXT_LAYERS + 2
    assert _fused_groups(model) == 2 * TEXT_LAYERS  # q/k/v and gate/up of every text layer
    quantized = _embeddings(model, inputs)
    assert _cosine(quantized, ref) > 0.999  # measured 0.9996 (w4 GPTQ, float projector at w8)
    out = save(model, tmp_path / "w4", report)

    packed = load(str(out))
    assert isinstance(packed, TinyFamilyModel)
    assert len(_packed_on_kernels(packed)) == 2 * VISION_BLOCKS + 7 * TEXT_LAYERS + 2  # 1x1 convs and linears
    assert _fused_groups(packed) == 2 * TEXT_LAYERS
    reloaded = _embeddings(packed, inputs)
    torch.testing.assert_close(reloaded, quantized, rtol=0, atol=1e-6)  # same packed weights, same kernels
    set_backend(packed, "reference")  # dequantize + float matmul: the kernels' int8 activations stay close
    assert _cosine(_embeddings(packed, inputs), reloaded) > 0.9995  # measured 0.99996
    set_backend(packed, "cpu")

    # inference transforms: stride-1 same padding made static, depthwise convs on the kernel, clamps fused
    fast = optimize_for_inference_(packed)
    assert fast.static_padding == fast.depthwise_kernels == VISION_BLOCKS  # the 3x3 SameConvs at stride 1
    # Clamp6 after each packed 1x1 expand, each depthwise kernel and the stem (its k x k conv on im2col + the GEMM)
    assert fast.fused_activations == 2 * VISION_BLOCKS + 1
    assert sum(isinstance(m, FusedActivation) for m in packed.modules()) == fast.fused_activations
    # The packed depthwise convs (per image and channel) and the stem (on the int8 GEMM) now run int8
    # activations, where the unoptimized model computes them in float: close, not equal.
    assert fast.conv_gemm_kernels == 1
    assert _cosine(_embeddings(packed, inputs), reloaded) > 0.9999  # measured 0.99998


def test_block_ap_save_reload_runs_on_the_kernels(family_dir: Path, tmp_path: Path) -> None:
    teacher = load(f"{FAMILY}:{family_dir}")
    student, ptq = load(f"{FAMILY}:{family_dir}"), load(f"{FAMILY}:{family_dir}")
    for m in (student, ptq):
        prepare_qat(m, QAT_RECIPE)
    data = generate_shapes(48, seed=1)
    calibration = {"vision": [student.preprocess(data.images[i : i + 16]) for i in range(0, 48, 16)],
                   "text": [student.tokenize(data.captions[i : i + 16]) for i in range(0, 48, 16)]}
    bap = block_ap_(student, teacher, calibration, BlockAPConfig(steps=60, lr=3e-3, scale_lr=1e-2, float_lr=1e-2))
    assert [(b.tower, b.index) for b in bap.blocks] == [("vision", 0), ("vision", 1), ("text", 0), ("text", 1)]
    for b in bap.blocks:  # measured: 7.4x, 13.9x lower (vision; the last through the tail), 7.7x, 5.7x (text)
        assert b.quant_layers > 0 and b.error_after < 0.5 * b.error_start, b

    inputs = _inputs(teacher)
    ref = _embeddings(teacher, inputs)
    err_ptq, err_bap = (1.0 - _cosine(_embeddings(m, inputs), ref) for m in (ptq, student))
    assert err_bap < 0.25 * err_ptq, (err_bap, err_ptq)  # measured 1 - cos: 0.084 (PTQ start) -> 0.0033
    report = convert_qat(student)
    assert all(is_quantized(m) for m in (student.text.layers[0].attn.q_proj, student.vision.stem))
    quantized = _embeddings(student, inputs)
    out = save_quantized(student, report, load_recipe(QAT_RECIPE), tmp_path / "bap")

    packed = load(str(out))
    _packed_on_kernels(packed)
    assert _fused_groups(packed) == 2 * TEXT_LAYERS
    torch.testing.assert_close(_embeddings(packed, inputs), quantized, rtol=0, atol=1e-6)
    assert 1.0 - _cosine(_embeddings(packed, inputs), ref) < 0.01  # measured 0.0033
