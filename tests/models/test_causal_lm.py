"""The ``causal-lm`` family: tiny random models of every claimed architecture loaded from a transformers directory,
quantized, saved, reloaded by path, and decoded (lean engine or transformers' generate) token for token as
transformers' ``generate`` decodes the same quantized model."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.kernels.quant_linear import set_backend
from lowbit.models.causal_lm import CausalLM, LeanFallbackNote, generate_ids, lean_unsupported
from tests.models.causal_lm_tiny import FAMILIES, save_tiny_causal_lm

LEAN = {"llama", "mistral", "qwen2", "qwen3"}  # the lean engine runs these; the rest fall back, noted once


@torch.no_grad()
def greedy(model: CausalLM, ids: torch.Tensor, lean: bool) -> list[int]:
    return generate_ids(model, ids, 16, stop=[], lean=lean)[0].tolist()


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_load_quantize_save_reload_generate(model_type: str, tmp_path: Path) -> None:
    source = save_tiny_causal_lm(model_type, tmp_path / "float")
    model = lowbit.load(str(source))
    assert isinstance(model, CausalLM) and model.language.config.model_type == model_type
    ids = torch.tensor([model.prompt_ids("hello, tiny model")])
    with torch.no_grad():
        float_logits = model.language(ids).logits
    report = lowbit.quantize(model, "language=w4g32", progress=False)
    set_backend(model, "reference")  # as the reloaded one below: exact float matmuls of the packed weights
    assert report.modules and all(m.tower == "language" and m.bits == 4 for m in report.modules)
    lowbit.save(model, tmp_path / "w4", report)
    loaded = lowbit.load(str(tmp_path / "w4"), backend="reference")
    assert isinstance(loaded, CausalLM) and loaded.lowbit_manifest["architecture"]["family"] == "causal-lm"
    with torch.no_grad():
        logits = loaded.language(ids).logits
    assert torch.equal(logits, model.language(ids).logits)  # the reloaded model is the quantized one
    cos = torch.nn.functional.cosine_similarity(logits.flatten(1), float_logits.flatten(1))
    assert float(cos.min()) > 0.9  # w4 g32 of a random model: close to float, not equal
    assert (lean_unsupported(loaded.language, 64) is None) == (model_type in LEAN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LeanFallbackNote)
        assert greedy(loaded, ids, lean=True) == greedy(loaded, ids, lean=False)  # lean (or fallback) == generate


def test_fallback_is_noted_once(tmp_path: Path) -> None:
    from lowbit.models import causal_lm

    model = lowbit.load(str(save_tiny_causal_lm("phi3", tmp_path / "phi3")))
    causal_lm._FALLBACK_NOTED.discard("phi3")
    ids = torch.tensor([model.prompt_ids("hi")])
    with pytest.warns(LeanFallbackNote, match="phi3 decodes with transformers' generate"):
        greedy(model, ids, lean=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LeanFallbackNote)
        greedy(model, ids, lean=True)  # the second time: silent


def test_chat_text_only_and_gptq_calibrated_data_free(tmp_path: Path) -> None:
    model = lowbit.load(str(save_tiny_causal_lm("qwen3", tmp_path / "qwen3")))
    pieces: list[str] = []
    answer = lowbit.chat(model, None, "Say something.", max_new_tokens=8, stream=pieces.append)
    assert answer == "".join(pieces).strip()
    with pytest.raises(LowbitError, match="takes no image"):
        lowbit.chat(model, "x.png", "Say something.")
    report = lowbit.quantize(model, "language=w4g32:gptq", calib_samples=8, progress=False)
    assert report.calibration == {"source": "self-generated", "kind": "self-generated (chat template)",
                                  "samples": 8, "tokens": 8 * 128, "seed": 0, "default": True}


def test_self_generated_calibration_is_deterministic(tmp_path: Path) -> None:
    from lowbit.models.causal_lm import chat_prefix_ids, self_generated_windows

    model = lowbit.load(str(save_tiny_causal_lm("llama", tmp_path / "llama")))
    first = self_generated_windows(model, 3, 24, seed=5)
    assert [w.tolist() for w in first] == [w.tolist() for w in self_generated_windows(model, 3, 24, seed=5)]
    assert [w.tolist() for w in first] != [w.tolist() for w in self_generated_windows(model, 3, 24, seed=6)]
    prefix = chat_prefix_ids(model)
    assert model.tokenizer.decode(prefix) == "<|im_start|>user\n"  # sampled inside the chat template
    assert all(w.numel() == 24 and w[:len(prefix)].tolist() == prefix for w in first)


def test_wrong_configs_are_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert",
                                                                 "architectures": ["BertForCausalLM"]}))
    with pytest.raises(LowbitError, match=r"'bert' model .*not a text-only causal LM.*accepted model_types: llama"):
        lowbit.load(str(tmp_path / "bert"))
    # a text-only LM handed to the llava family: refused from its config, before any weight is allocated
    source = save_tiny_causal_lm("llama", tmp_path / "llama")
    with pytest.raises(LowbitError, match="'llama' config without a vision_config, not a Llava model"):
        lowbit.load(f"llava:{source}")


def test_cli_chat_text_only_and_recipe_matching_nothing_exits_2(tmp_path: Path, capsys) -> None:
    from lowbit.cli import main

    source = str(save_tiny_causal_lm("qwen2", tmp_path / "qwen2"))
    assert main(["chat", source, "Hello?", "--max-new-tokens", "4", "--no-stream"]) in (0, None)
    code = main(["quantize", source, "--recipe", "vision=w4", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "matches no layer" in err and "language/model.layers.0.self_attn.q_proj (linear)" in err
    assert not (tmp_path / "out").exists()


def test_llava_from_any_causal_lm_saves_quantized_and_loads_by_path(tmp_path: Path) -> None:
    from PIL import Image

    from lowbit.models.llava import LlavaModel, from_parts

    model = from_parts("lit-fashion", str(save_tiny_causal_lm("qwen3", tmp_path / "qwen3")))
    report = lowbit.quantize(model, "language=w4g32,projector=w8", progress=False)
    set_backend(model, "reference")
    lowbit.save(model, tmp_path / "vlm", report)
    loaded = lowbit.load(str(tmp_path / "vlm"), backend="reference")
    assert isinstance(loaded, LlavaModel) and loaded.lowbit_manifest["architecture"]["family"] == "llava"
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    assert lowbit.chat(loaded, image, "What is it?", max_new_tokens=5) == lowbit.chat(
        model, image, "What is it?", max_new_tokens=5)


def test_presets_apply_without_warnings_or_calibration_they_do_not_need(tmp_path: Path) -> None:
    model = lowbit.load(str(save_tiny_causal_lm("llama", tmp_path / "llama")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the presets' projector and conv rules are optional: no "matches no module"
        report = lowbit.quantize(model, "w8", progress=False)
    assert report.calibration is None  # w8's GPTQ rule is for k x k convs, which a language model lacks
    kinds = {m.kind for m in report.modules}
    assert kinds == {"embedding", "linear"} and any(m.method.startswith("tied:") for m in report.modules)
