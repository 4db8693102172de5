"""Whole-model quantization of a LLaVA model through the shared recipes, and the quantized KV cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from lowbit.errors import LowbitError
from tests.models.llava_tiny import write_tiny_llava

QUESTION = "what is this item ?"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llava(tmp_path_factory.mktemp("tiny-llava-q"))


def _image() -> Image.Image:
    img = Image.new("RGB", (32, 32), (240, 240, 240))
    img.paste((30, 60, 220), (4, 4, 20, 28))
    return img


@pytest.mark.parametrize("method", ["gptq", "minmax"])
def test_recipe_quantizes_all_three_towers_and_reloads(tiny_dir: Path, tmp_path: Path, method: str) -> None:
    import lowbit

    model = lowbit.load(str(tiny_dir))
    report = lowbit.quantize(model, f"language=w4g16:{method},vision=w8,projector=w8", calib_data="shapes",
                             calib_samples=8, progress=False)
    towers = {m.tower for m in report.modules}
    assert towers == {"vision", "projector", "language"}
    assert {m.method for m in report.modules if m.tower == "language"} == {method}
    answer = model.chat(_image(), QUESTION, max_new_tokens=6)
    lowbit.save(model, tmp_path / "q", report=report)
    reloaded = lowbit.load(str(tmp_path / "q"))
    assert reloaded.chat(_image(), QUESTION, max_new_tokens=6) == answer
    assert (tmp_path / "q" / "model.safetensors").stat().st_size < 0.6 * sum(
        f.stat().st_size for f in tiny_dir.glob("*.safetensors"))


@pytest.mark.parametrize(("bits", "bound"), [(8, 0.006), (4, 0.09)])
def test_quantized_kv_entries_within_stated_error(bits: int, bound: float) -> None:
    from lowbit.models.llava_kvcache import dequantize_groups, quantize_groups

    x = torch.randn(2, 3, 40, 64, generator=torch.Generator().manual_seed(0))
    q = quantize_groups(x, bits, 32)
    err = (dequantize_groups(*q, bits, 32, torch.float32) - x).pow(2).mean().sqrt() / x.pow(2).mean().sqrt()
    assert float(err) < bound
    assert q[0].nbytes == x.numel() * bits // 8  # 4-bit codes are packed two per byte


@pytest.mark.parametrize(("bits", "bound"), [(8, 0.006), (4, 0.09)])
def test_generation_with_quantized_kv_cache_tracks_float_cache(tiny_dir: Path, bits: int, bound: float,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import DynamicCache

    from lowbit.models import load_model
    from lowbit.models.llava_generate import Decoding, generate_batch
    from lowbit.models.llava_kvcache import LowbitKVLayer, quantized_kv_cache

    model = load_model(str(tiny_dir))
    pixels = model.preprocess([_image()])
    ref = generate_batch(model, pixels, [QUESTION], Decoding(10), first_logprobs=True)
    calls: list[int] = []
    real_update = LowbitKVLayer.update
    monkeypatch.setattr(LowbitKVLayer, "update", lambda self, k, v, *a, **kw: calls.append(k.shape[-2])
                        or real_update(self, k, v, *a, **kw))
    out = generate_batch(model, pixels, [QUESTION], Decoding(10, kv_bits=bits), first_logprobs=True)
    assert calls and calls[0] > 16 and 1 in calls  # prefill, then one token per step went through our cache
    # The first token comes from the prefill, which attends in full precision: identical distributions.
    assert torch.allclose(ref.first_logprobs, out.first_logprobs, atol=1e-5)
    if bits == 8:
        assert out.token_ids == ref.token_ids
    # What later tokens read back from the quantized cache stays within the stated error of the float cache.
    embeds, mask = model.prompt_embeddings(model.visual_embeddings(pixels), [QUESTION])
    float_cache, q_cache = DynamicCache(config=model.language.config), quantized_kv_cache(model.language.config, bits)
    with torch.no_grad():
        for cache in (float_cache, q_cache):
            model.language(inputs_embeds=embeds, attention_mask=mask, cache=cache, use_cache=True)
    for f_layer, q_layer in zip(float_cache.layers, q_cache.layers, strict=True):
        for name, exact in (("k", f_layer.keys), ("v", f_layer.values)):
            got = q_layer._cached(name)
            rel = (got - exact).pow(2).mean().sqrt() / exact.pow(2).mean().sqrt()
            assert float(rel) < bound
    assert q_cache.layers[0].get_seq_length() == embeds.shape[1]


def test_bad_kv_bits_is_a_clear_error(tiny_dir: Path) -> None:
    from lowbit.models import load_model

    with pytest.raises(LowbitError, match="kv_bits must be 8 or 4"):
        load_model(str(tiny_dir), kv_bits=3)
