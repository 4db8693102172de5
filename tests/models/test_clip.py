"""The clip family: tiny random HF CLIP/SigLIP saved to disk load back with identical embeddings."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lowbit.errors import LowbitError
from lowbit.models import load_model, resolve_family


def _images() -> list[Image.Image]:
    return [Image.new("RGB", (40, 40), c) for c in ("red", "blue", "green")]


TEXTS = ["a red circle on the left", "a blue square", "a photo of the green triangle"]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_saved_checkpoint_gives_identical_embeddings(kind, tiny_clip_dir, tiny_siglip_dir):
    from transformers import AutoModel, AutoTokenizer, CLIPImageProcessor

    path = tiny_clip_dir if kind == "clip" else tiny_siglip_dir
    model = load_model(str(path))
    assert resolve_family(str(path))[0].name == "clip"
    assert model.model_type == kind

    # Upstream computation, straight from transformers, on the same files.
    upstream = AutoModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    proc = CLIPImageProcessor.from_pretrained(path)
    padding = "max_length" if kind == "siglip" else True
    enc = tok(TEXTS, padding=padding, max_length=16, truncation=True, return_tensors="pt")
    text_kwargs = {"input_ids": enc["input_ids"]}
    if kind == "clip":
        text_kwargs["attention_mask"] = enc["attention_mask"]
    pixels = proc(images=_images(), return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        ref_img = upstream.get_image_features(pixel_values=pixels)
        ref_txt = upstream.get_text_features(**text_kwargs)
        ref_img = ref_img if isinstance(ref_img, torch.Tensor) else ref_img.pooler_output
        ref_txt = ref_txt if isinstance(ref_txt, torch.Tensor) else ref_txt.pooler_output
        img = model.embed_images(_images())
        txt = model.embed_texts(TEXTS)
    # Same files, same math: equal up to float32 summation order inside SDPA attention (<= 1e-6 absolute).
    torch.testing.assert_close(img, torch.nn.functional.normalize(ref_img, dim=-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(txt, torch.nn.functional.normalize(ref_txt, dim=-1), rtol=0, atol=1e-6)
    assert img.shape == (3, ref_img.shape[-1])

    logits = model.similarity(img, txt)
    assert logits.shape == (3, 3)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_towers_are_disjoint_and_cover_the_weights(kind, tiny_clip_dir, tiny_siglip_dir):
    model = load_model(str(tiny_clip_dir if kind == "clip" else tiny_siglip_dir))
    towers = model.towers()
    assert set(towers) == {"vision", "text", "projector"}
    seen: dict[int, str] = {}
    for tower, module in towers.items():
        for sub in module.modules():
            if isinstance(sub, torch.nn.Linear):
                assert id(sub) not in seen, f"{sub} in both {seen[id(sub)]} and {tower}"
                seen[id(sub)] = tower
    all_linears = {id(m) for m in model.model.modules() if isinstance(m, torch.nn.Linear)}
    assert all_linears == set(seen)


def test_non_clip_directory_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(LowbitError, match="unknown directory"):
        load_model(str(tmp_path))
