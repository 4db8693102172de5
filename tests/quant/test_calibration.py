"""ActivationCalibrator on a tiny fake DualEncoder: right rows, shapes, statistics and early stopping."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.base import DualEncoder
from lowbit.quant.calibration import (
    ActivationCalibrator,
    CalibrationWarning,
    calibration_texts,
    grouped_input_rows,
    input_rows,
)
from lowbit.quant.methods import CalibrationProvider, get_method
from lowbit.quant.primitives import QuantSpec


class TinyDual(DualEncoder):
    """Vision: 3x3 stem -> 1x1 conv (3->6) -> pool; text: embedding -> Linear(5->7); projector heads."""

    family = "tiny"

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.vision = nn.Sequential(
            nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 6, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.text = nn.ModuleDict({"embed": nn.Embedding(20, 5), "fc": nn.Linear(5, 7)})
        self.projector = nn.ModuleDict({"image": nn.Linear(6, 4), "text": nn.Linear(7, 4)})
        self.calls = {"preprocess": 0, "tokenize": 0, "text_fc": 0}

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        self.calls["preprocess"] += 1
        arrays = [torch.from_numpy(np.asarray(im, dtype=np.float32)) / 255 for im in images]  # [4, 4, 3] each
        return torch.stack(arrays).permute(0, 3, 1, 2)  # [B, 3, 4, 4]

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        self.calls["tokenize"] += 1
        t = max(len(s.split()) for s in texts)
        ids = torch.zeros(len(texts), t, dtype=torch.long)
        mask = torch.zeros(len(texts), t, dtype=torch.long)
        for i, s in enumerate(texts):
            words = s.split()
            ids[i, : len(words)] = torch.tensor([1 + len(w) % 19 for w in words])
            mask[i, : len(words)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projector["image"](self.vision(pixels))

    def text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        self.calls["text_fc"] += 1
        h = self.text["fc"](self.text["embed"](tokens["input_ids"]))  # [B, T, 7]
        m = tokens["attention_mask"].unsqueeze(-1).float()
        return self.projector["text"]((h * m).sum(1) / m.sum(1))

    def towers(self) -> dict[str, nn.Module]:
        return {"vision": self.vision, "text": self.text, "projector": self.projector}

    @property
    def logit_scale(self) -> torch.Tensor:
        return torch.tensor(1.0)


def images(n: int) -> list[Image.Image]:
    g = torch.Generator().manual_seed(1)
    return [Image.fromarray((torch.rand(4, 4, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]


TEXTS = ["a red shirt", "boots", "a pair of blue jeans today", "bag", "one small sandal"]


@pytest.fixture()
def model() -> TinyDual:
    return TinyDual()


def test_conv1x1_rows_and_hessian(model: TinyDual) -> None:
    cal = ActivationCalibrator(model, images(10), TEXTS, batch_size=4, max_rows=50)
    assert isinstance(cal, CalibrationProvider)
    conv = model.vision[2]
    ctx = cal.stats_for("vision", "2", conv)
    # exact rows: the 1x1 conv's input [B, 3, 4, 4] -> [B*16, 3]
    x = torch.cat([model.vision[1](model.vision[0](p)) for p in cal.pixel_batches()])
    rows = x.permute(0, 2, 3, 1).reshape(-1, 3)  # [160, 3]
    assert ctx.inputs.shape == (50, 3) and ctx.hessian.shape == (3, 3) and ctx.hessian.dtype == torch.float64
    assert torch.allclose(ctx.hessian, 2 / 160 * rows.double().T @ rows.double())
    assert torch.allclose(ctx.extra["act_abs_mean"], rows.abs().mean(0))
    assert ctx.kind == "conv1x1" and ctx.tower == "vision" and ctx.name == "2"
    # the subsample consists of real rows
    assert all(any(torch.equal(r, s) for s in rows) for r in ctx.inputs)
    assert cal.stats_for("vision", "2", conv).inputs.equal(ctx.inputs)  # seeded


def test_linear_rows_skip_padding_and_stop_early(model: TinyDual) -> None:
    cal = ActivationCalibrator(model, images(3), TEXTS, batch_size=2)
    ctx = cal.stats_for("text", "fc", model.text["fc"])
    n_tokens = sum(len(t.split()) for t in TEXTS)
    assert ctx.inputs.shape == (n_tokens, 5) and ctx.extra["n_rows"] == n_tokens
    before = dict(model.calls)
    cal.stats_for("text", "fc", model.text["fc"])
    # tokens are cached; the forward is cut at the hooked module, before the projector runs
    assert model.calls["tokenize"] == before["tokenize"] == 3
    calls = []
    h = model.projector["text"].register_forward_hook(lambda *a: calls.append(1))
    cal.stats_for("text", "fc", model.text["fc"])
    h.remove()
    assert not calls


def test_projector_runs_both_paths(model: TinyDual) -> None:
    cal = ActivationCalibrator(model, images(5), TEXTS, batch_size=8)
    assert cal.stats_for("projector", "image", model.projector["image"]).inputs.shape == (5, 6)
    assert cal.stats_for("projector", "text", model.projector["text"]).inputs.shape == (5, 7)


def test_sees_replaced_earlier_modules(model: TinyDual) -> None:
    cal = ActivationCalibrator(model, images(4), TEXTS)
    before = cal.stats_for("projector", "image", model.projector["image"]).hessian
    model.vision[2] = nn.Conv2d(3, 6, 1)  # what quantize_ does to an earlier layer
    after = cal.stats_for("projector", "image", model.projector["image"]).hessian
    assert not torch.allclose(before, after)


def test_gptq_through_calibrator(model: TinyDual) -> None:
    cal = ActivationCalibrator(model, images(8), TEXTS)
    conv = model.vision[2]
    ctx = cal.stats_for("vision", "2", conv)
    result = get_method("gptq").quantize_weight(conv.weight.detach().reshape(6, 3), QuantSpec(4), ctx, {})
    assert result.packed.shape == (6, 3)


def test_kxk_conv_unfolds_and_errors(model: TinyDual) -> None:
    conv = nn.Conv2d(3, 2, 3, padding=1)
    x = torch.randn(2, 3, 5, 5)
    rows = input_rows(conv, x)  # [2*25, 27]
    assert rows.shape == (50, 27)
    assert torch.allclose(rows @ conv.weight.reshape(2, -1).T + conv.bias, conv(x).permute(0, 2, 3, 1).reshape(-1, 2),
                          atol=1e-5)
    with pytest.raises(LowbitError, match="depthwise"):
        input_rows(nn.Conv2d(4, 4, 3, groups=4), torch.randn(1, 4, 5, 5))
    cal = ActivationCalibrator(model, None, TEXTS)
    with pytest.raises(LowbitError, match="images"):
        cal.stats_for("vision", "2", model.vision[2])
    stray = nn.Linear(5, 5)  # not on any encode path
    with pytest.warns(CalibrationWarning, match="saw no input"):
        ctx = cal.stats_for("text", "stray", stray)
    assert ctx.hessian is None and ctx.extra["n_rows"] == 0
    rtn = get_method("rtn").quantize_weight(stray.weight, QuantSpec(4), ctx, {}).packed
    for method in ("gptq", "awq"):  # fall back to the RTN grid for a layer that never runs
        assert torch.equal(get_method(method).quantize_weight(stray.weight, QuantSpec(4), ctx, {}).packed.qweight,
                           rtn.qweight)
    with pytest.raises(LowbitError):
        ActivationCalibrator(model, [], [])


def test_calibration_texts() -> None:
    assert calibration_texts(["x", "y", "z"], None, [], 2) == ["x", "y"]
    prompts = calibration_texts(None, ["shirt", "bag"], ["a {}.", "the {}"], 10, seed=3)
    assert sorted(prompts) == sorted(["a shirt.", "the shirt", "a bag.", "the bag"])
    assert calibration_texts(None, None, ["a {}"], 5) == []
    # templated captions repeat: duplicates are dropped and the prompt templates top the set up
    caps = ["a bag."] * 5 + ["a shirt."] * 5
    texts = calibration_texts(caps, ["shirt", "bag"], ["a {}.", "the {}", "my {}"], 5)
    assert texts[:2] == ["a bag.", "a shirt."] and len(texts) == len(set(texts)) == 5
    assert set(texts[2:]) <= {"the shirt", "the bag", "my shirt", "my bag"}


@pytest.mark.parametrize("groups,out_ch", [(6, 6), (2, 4)])
def test_grouped_conv_rows_and_per_group_hessians(model: TinyDual, groups: int, out_ch: int) -> None:
    conv = nn.Conv2d(6, out_ch, 3, padding=1, stride=2, groups=groups)
    x = torch.randn(2, 6, 7, 7)
    rows = grouped_input_rows(conv, x)  # [G, 2*4*4, 6/G*9]
    assert rows.shape == (groups, 32, 6 // groups * 9)
    per = out_ch // groups
    w = conv.weight.reshape(out_ch, -1)  # [N, Kg]
    out = conv(x).permute(1, 0, 2, 3).reshape(out_ch, -1) - conv.bias[:, None]  # [N, B*L]
    for o in range(out_ch):  # each output channel is its own group's rows times its weight row
        assert torch.allclose(rows[o // per] @ w[o], out[o], atol=1e-5)
    # through the calibrator: one Hessian per conv group, from the model's own forward
    dual = TinyDual()
    dual.vision[0] = nn.Conv2d(3, 3, 3, padding=1, groups=3)
    cal = ActivationCalibrator(dual, images(4), None)
    ctx = cal.stats_for("vision", "0", dual.vision[0])
    pixels = torch.cat(cal.pixel_batches())
    r = grouped_input_rows(dual.vision[0], pixels).double()  # [3, S, 9]
    assert ctx.hessian is None and ctx.extra["n_rows"] == r.shape[1]
    assert torch.allclose(ctx.extra["group_hessians"], 2.0 / r.shape[1] * r.transpose(1, 2) @ r)
    packed = get_method("gptq").quantize_weight(dual.vision[0].weight, QuantSpec(4), ctx, {}).packed
    assert packed.shape == (3, 1, 3, 3)


def test_efficientnet_same_padding_conv_rows() -> None:
    from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding

    torch.manual_seed(0)
    conv = Conv2dDynamicSamePadding(3, 4, 3, stride=2, bias=False)
    x = torch.randn(2, 3, 9, 9)
    rows = input_rows(conv, x)  # [2*5*5, 27]
    out = conv(x)  # [2, 4, 5, 5]
    assert torch.allclose(rows @ conv.weight.reshape(4, -1).T, out.permute(0, 2, 3, 1).reshape(-1, 4), atol=1e-5)


def test_sequential_quantize_with_calibrator(model: TinyDual) -> None:
    from lowbit.quant.apply import quantize_

    imgs = images(8)
    cal = ActivationCalibrator(model, imgs, TEXTS)
    pixels, tokens = model.preprocess(imgs), model.tokenize(TEXTS)
    with torch.no_grad():
        ref_img, ref_txt = model.encode_image(pixels), model.encode_text(tokens)
    seen = []
    stats_for = cal.stats_for
    cal.stats_for = lambda tower, name, module: seen.append(module) or stats_for(tower, name, module)  # type: ignore[method-assign]
    report = quantize_(model, "vision=w8:gptq,text=w8:awq,projector=w8:gptq", calibration=cal, progress=False)
    assert len(report.modules) == 5 and len(seen) == 5
    assert getattr(model.text["fc"], "input_scale", None) is not None  # AWQ's scale reached the layer
    with torch.no_grad():
        img, txt = model.encode_image(pixels), model.encode_text(tokens)
    assert (img * ref_img).sum(-1).min() > 0.99 and (txt * ref_txt).sum(-1).min() > 0.99


class BlockDual(TinyDual):
    """TinyDual whose vision tower is a stem conv + a ModuleList of two conv blocks (two 1x1 convs each)."""

    def __init__(self) -> None:
        super().__init__()
        blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 3, 1)) for _ in range(2))
        stem, head = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.vision = nn.ModuleDict({"stem": stem, "blocks": blocks, "head": head})
        self.passes = 0

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        self.passes += 1
        x = self.vision["stem"](pixels)
        for block in self.vision["blocks"]:
            x = x + block(x)
        return self.projector["image"](self.vision["head"](x).mean(dim=(2, 3)))


class _Recording:
    """A calibration provider that records the Hessian it served for each layer."""

    def __init__(self, cal: ActivationCalibrator, served: dict, mode: str) -> None:
        self.cal, self.served, self.mode = cal, served, mode

    def stats_for(self, tower: str, name: str, module: nn.Module) -> object:
        ctx = self.cal.stats_for(tower, name, module)
        self.served[self.mode, name] = ctx.hessian
        return ctx

    def on_quantized(self, *args: object) -> None:
        self.cal.on_quantized(*args)


def test_block_sequential_mode() -> None:
    from lowbit.quant.apply import quantize_

    names = ["stem", "blocks.0.0", "blocks.0.2", "blocks.1.0", "blocks.1.2", "head"]
    hessians = {}
    for mode in ("layer", "block"):
        model = BlockDual()
        cal = ActivationCalibrator(model, images(8), None, batch_size=4, sequential=mode)
        assert cal._block_of("vision", "blocks.1.2") == "blocks.1" and cal._block_of("vision", "head") == "head"
        # float model: both modes see the same inputs for every layer
        hessians[mode] = {n: cal.stats_for("vision", n, model.vision.get_submodule(n)).hessian for n in names}
        model.passes = 0
        quantize_(model, "vision=w2:gptq", calibration=cal, progress=False)
        assert model.passes == 2 * (6 if mode == "layer" else 4)  # 2 batches x (layers | blocks)
    for n in names:
        assert torch.allclose(hessians["layer"][n], hessians["block"][n])
    # during quantization: a block's second layer sees its own block's first layer in float only in block mode
    served = {}
    for mode in ("layer", "block"):
        model = BlockDual()
        cal = ActivationCalibrator(model, images(8), None, batch_size=4, sequential=mode)

        quantize_(model, "vision=w2:gptq", calibration=_Recording(cal, served, mode), progress=False)
        if mode == "block":
            partly = BlockDual()
            partly.vision["stem"] = model.vision["stem"]  # the quantized stem, block 0 in float
            ref = ActivationCalibrator(partly, images(8), None, batch_size=4)
            own_block_float = ref.stats_for("vision", "blocks.0.2", partly.vision.get_submodule("blocks.0.2")).hessian
    assert torch.allclose(served["block", "blocks.0.2"], own_block_float)
    assert not torch.allclose(served["layer", "blocks.0.2"], own_block_float)  # sees the quantized blocks.0.0
    assert torch.allclose(served["layer", "blocks.0.0"], served["block", "blocks.0.0"])  # first of a block: same
    with pytest.raises(LowbitError, match="sequential"):
        ActivationCalibrator(BlockDual(), images(2), None, sequential="tree")
