"""save_quantized / load_quantized: exact round trip, real packed size on disk, atomicity, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from torch import nn

import lowbit.workflows.checkpoint as ckpt
from lowbit.errors import LowbitError
from lowbit.models.base import DualEncoder
from lowbit.quant.apply import quantize_
from lowbit.quant.methods import METHODS, QuantContext, QuantResult
from lowbit.quant.primitives import QuantSpec, to_packed
from lowbit.quant.recipe import load_recipe
from lowbit.workflows.checkpoint import load_quantized, save_quantized


class _ScaledRTN:
    """Test-only method returning an AWQ-style per-input-channel scale."""

    needs_calibration = False

    def quantize_weight(self, weight: torch.Tensor, spec: QuantSpec, ctx: QuantContext,
                        options: dict) -> QuantResult:
        s = torch.linspace(0.5, 2.0, weight.shape[1])  # [K]
        return QuantResult(to_packed(weight * s, spec), input_scale=s)


if "test-scaled" not in METHODS:
    METHODS.register("test-scaled")(_ScaledRTN())


class TinyDual(DualEncoder):
    """A two-tower toy: conv image tower (1x1 + depthwise), embedding/linear text tower with a tied head."""

    family = "tiny"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.vision = nn.Sequential(nn.Conv2d(3, 256, 1), nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1, groups=256),
                                    nn.Conv2d(256, 128, 1, bias=False))
        self.embed = nn.Embedding(64, 256)
        self.text = nn.ModuleDict({"fc": nn.Linear(256, 384), "out": nn.Linear(384, 128)})
        self.lm_head = nn.Linear(256, 64, bias=False)
        self.lm_head.weight = self.embed.weight  # tied: shared storage in the state dict
        self.proj = nn.Linear(128, 128)
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.source = {"family": "tiny", "name": "tiny", "options": {"seed": seed}}

    def towers(self) -> dict[str, nn.Module]:
        return {"vision": self.vision, "text": nn.ModuleDict({"embed": self.embed, "mlp": self.text}),
                "projector": self.proj}

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(self.vision(pixels).mean(dim=(2, 3)))

    def text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.embed(tokens["input_ids"]).mean(1)  # [B, 256]
        return self.proj(self.text["out"](torch.relu(self.text["fc"](h))) + 0 * self.lm_head(h).sum())

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.scale


def build(source: dict[str, Any]) -> nn.Module:
    return TinyDual(seed=source["options"]["seed"] + 1)  # different init: loading must overwrite everything


RECIPE = "projector=w8,vision=w4g128,text/mlp*=w4g128a"
PIX = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(3))
TOK = {"input_ids": torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(4))}


def _quantized(tmp_path: Path) -> tuple[TinyDual, Path]:
    model = TinyDual().eval()
    recipe = load_recipe(RECIPE)
    report = quantize_(model, recipe, progress=False)
    out = save_quantized(model, report, recipe, tmp_path / "ckpt", extra={"note": "test"})
    return model, out


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    model, out = _quantized(tmp_path)
    loaded = load_quantized(out, build)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(PIX), model.encode_image(PIX))
        assert torch.equal(loaded.encode_text(TOK), model.encode_text(TOK))
    assert loaded.lm_head.weight.data_ptr() == loaded.embed.weight.data_ptr()  # tie survives
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == model.source and manifest["extra"] == {"note": "test"}
    assert manifest["modules"]["text.fc"] == {
        "tower": "text", "name": "mlp.fc", "kind": "linear", "bits": 4, "group_size": 128, "symmetric": False,
        "method": "rtn", "shape": [384, 256], "has_input_scale": False}
    assert manifest["modules"]["vision.2"]["kind"] == "conv" and manifest["modules"]["vision.0"]["kind"] == "conv1x1"
    assert manifest["modules"]["proj"]["name"] == ""  # a tower that is itself a layer


def test_round_trip_with_input_scale(tmp_path: Path) -> None:
    model = TinyDual().eval()
    recipe = load_recipe("vision=w8:test-scaled,text=w4g64:test-scaled,projector=w8")
    report = quantize_(model, recipe, progress=False)
    assert all(m.has_input_scale for m in report.modules if m.tower != "projector")
    out = save_quantized(model, report, recipe, tmp_path / "ckpt")
    loaded = load_quantized(out, build)
    assert loaded.vision[2].input_scale.shape == (9,)  # depthwise conv: K = 1*3*3, folded into .weight
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(PIX), model.encode_image(PIX))
        assert torch.equal(loaded.encode_text(TOK), model.encode_text(TOK))


def _bytes_on_disk(f: Any, key: str) -> int:
    sl = f.get_slice(key)
    return math.prod(sl.get_shape()) * {"U8": 1, "F16": 2, "F32": 4}[sl.get_dtype()]


def test_w4_g128_layers_are_packed_on_disk(tmp_path: Path) -> None:
    _, out = _quantized(tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    checked = []
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        for path, meta in manifest["modules"].items():
            if meta["bits"] != 4 or meta["group_size"] != 128:
                continue  # 8-bit projector, and layers with K < 128 (per-channel)
            assert f"{path}.weight" not in keys
            stored = sum(_bytes_on_disk(f, f"{path}.{b}") for b in ("qweight", "scales", "zeros")
                         if f"{path}.{b}" in keys)
            # 4 bits + one fp16 scale (+ one uint8 zero) per 128 weights: 0.129 (0.130) of fp32
            assert stored <= 0.15 * 4 * math.prod(meta["shape"]), (path, stored)
            checked.append(path)
    assert sorted(checked) == ["text.fc", "text.out", "vision.3"]
    float_bytes = sum(4 * p.numel() for p in TinyDual().parameters())
    assert (out / "model.safetensors").stat().st_size < 0.3 * float_bytes  # the float embedding dominates


def test_crash_mid_save_leaves_no_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = TinyDual()
    recipe = load_recipe("*=w8")
    report = quantize_(model, recipe, progress=False)

    def explode(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", explode)
    with pytest.raises(LowbitError, match="disk full; nothing was written"):
        save_quantized(model, report, recipe, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_bad_checkpoints_raise_lowbit_errors(tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match="no manifest.json"):
        load_quantized(tmp_path, build)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(LowbitError, match="not valid JSON"):
        load_quantized(tmp_path, build)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(LowbitError, match="'format' is 'other'; accepted: 'lowbit-packed'"):
        load_quantized(tmp_path, build)
    _, out = _quantized(tmp_path)
    (out / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(LowbitError, match=r"cannot read|8 per byte of the weights file"):
        load_quantized(out, build)
