"""Footprint: byte accounting equals the tensors' bytes; latency counts calls; disk sums safetensors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lowbit.errors import LowbitError
from lowbit.eval.footprint import disk_bytes, measure_footprint, weight_bytes


def test_weight_bytes_is_sum_of_tensor_bytes(fake_model) -> None:
    fp = weight_bytes(fake_model)
    # proj 192x16 fp32 + words 64x16 fp32 + scale fp32; packed 16x8 uint8 buffer counted as stored.
    assert fp["parameters"] == 192 * 16 + 64 * 16 + 1
    assert fp["parameter_bytes"] == (192 * 16 + 64 * 16 + 1) * 4 == 16388
    assert fp["buffer_bytes"] == 128
    assert fp["weight_bytes"] == 16388 + 128
    expected = sum(t.numel() * t.element_size() for t in [*fake_model.parameters(), *fake_model.buffers()])
    assert fp["weight_bytes"] == expected


def test_tied_weights_counted_once() -> None:
    a, b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    b.weight = a.weight
    assert weight_bytes(nn.Sequential(a, b))["weight_bytes"] == 16 * 4


class Counting(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[tuple[str, int]] = []

    def __getattr__(self, name: str):  # delegate preprocess/tokenize/... to the wrapped model
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls.append(("image", pixels.shape[0]))
        return self.inner.encode_image(pixels)

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        self.calls.append(("text", tokens["input_ids"].shape[0]))
        return self.inner.encode_text(tokens)


def test_measure_footprint_numbers(fake_model, toy_set) -> None:
    data = toy_set(5)
    model = Counting(fake_model)
    model.train()
    fp = measure_footprint(model, data.images, data.captions, repeats=5, batch_repeats=3)
    # One warm-up plus the timed repeats, at batch 1 and at batch 32 (5 samples cycled to 32).
    assert model.calls.count(("image", 1)) == 1 + 5 and model.calls.count(("image", 32)) == 1 + 3
    assert model.calls.count(("text", 1)) == 1 + 5 and model.calls.count(("text", 32)) == 1 + 3
    assert model.training  # state restored
    assert fp["weight_bytes"] == 16388 + 128 and fp["disk_bytes"] is None
    for key in ("image_ms_b1", "image_ms_b32", "text_ms_b1", "text_ms_b32"):
        assert isinstance(fp[key], float) and fp[key] > 0
    assert fp["peak_rss_mib"] > 10
    assert fp["threads"] == torch.get_num_threads()
    assert "encode only" in fp["latency_scope"] and "process" in fp["peak_rss_scope"]


def test_no_samples_gives_none(fake_model) -> None:
    fp = measure_footprint(fake_model, [], [], batch_sizes=(1,))
    assert fp["image_ms_b1"] is None and fp["text_ms_b1"] is None


def test_disk_bytes(tmp_path, fake_model) -> None:
    ckpt = tmp_path / "ckpt"
    (ckpt / "sub").mkdir(parents=True)
    save_file({"w": torch.zeros(10)}, ckpt / "model.safetensors")
    save_file({"w": torch.zeros(3, dtype=torch.uint8)}, ckpt / "sub" / "extra.safetensors")
    (ckpt / "manifest.json").write_text("{" + " " * 1000 + "}")  # not weights: ignored
    sizes = (ckpt / "model.safetensors").stat().st_size + (ckpt / "sub" / "extra.safetensors").stat().st_size
    assert disk_bytes(ckpt) == sizes
    assert disk_bytes(ckpt / "model.safetensors") == (ckpt / "model.safetensors").stat().st_size
    fp = measure_footprint(fake_model, [], ["a"], checkpoint=ckpt, batch_sizes=(1,), repeats=1)
    assert fp["disk_bytes"] == sizes


def test_errors(tmp_path, fake_model) -> None:
    with pytest.raises(LowbitError, match="safetensors"):
        disk_bytes(tmp_path / "missing")
    with pytest.raises(LowbitError, match="safetensors"):
        disk_bytes(tmp_path)
    with pytest.raises(LowbitError, match="repeats"):
        measure_footprint(fake_model, [], [], repeats=0)
