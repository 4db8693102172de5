"""GGUF import: the file's Q8_0/Q4_0/Q4_1/TQ2_0 blocks packed into lowbit layers equal gguf-py's own
dequantization, run on lowbit's kernels, and export back to the same bytes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit.kernels.quant_embedding import QuantEmbedding
from lowbit.kernels.quant_linear import is_quantized, set_backend
from lowbit.models.gguf_import import pack_from_gguf
from lowbit.quant.apply import quantize_
from lowbit.workflows.export import export
from tests.workflows.test_export_gguf import TinyChat


def float_twin(model: TinyChat) -> torch.nn.Module:
    """The float model transformers' GGUF loader would build: lowbit's dequantized weights in plain layers."""
    import copy

    config = model.language.config
    twin = TinyChat(hidden=config.hidden_size, inter=config.intermediate_size)
    state = {}
    for name, module in model.language.named_modules():
        if is_quantized(module):
            state[f"{name}.weight"] = module.packed.dequantize()
    twin.language.load_state_dict({**{k: v for k, v in copy.deepcopy(model.language).state_dict().items()
                                      if k in twin.language.state_dict()}, **state}, strict=False)
    return twin


@pytest.mark.parametrize(("recipe", "hidden"), [("model=w4g32,model@embedding=w8g32", 64),
                                                ("model=w4g32:minmax,model@embedding=w8g32", 64),
                                                ("model=w8g64,model@embedding=w8g32", 64),
                                                ("model=w1.58g256,model@embedding=w8g32", 256)])
def test_export_import_round_trip_is_exact(tmp_path: Path, recipe: str, hidden: int) -> None:
    from gguf import GGUFReader

    model = TinyChat(hidden=hidden, inter=2 * hidden)
    quantize_(model.language, recipe, progress=False)
    export(model, "gguf", tmp_path / "a.gguf")
    twin = float_twin(model)  # what a float load of the file gives
    report = pack_from_gguf(twin.language, tmp_path / "a.gguf")
    assert len(report["packed"]) == 2 * 7 + 1 + 1 and not report["float"]  # linears, table, tied head
    lm = twin.language
    assert isinstance(lm.model.embed_tokens, QuantEmbedding) and lm.lm_head.qweight is lm.model.embed_tokens.qweight
    for name, module in model.language.named_modules():
        if is_quantized(module):
            np.testing.assert_array_equal(lm.get_submodule(name).packed.dequantize().numpy(),
                                          module.packed.dequantize().numpy(), name)
    export(twin, "gguf", tmp_path / "b.gguf")  # and back: the same blocks, byte for byte
    a, b = GGUFReader(str(tmp_path / "a.gguf")), GGUFReader(str(tmp_path / "b.gguf"))
    for ta, tb in zip(a.tensors, b.tensors, strict=True):
        assert ta.name == tb.name and ta.tensor_type == tb.tensor_type
        assert np.array_equal(np.asarray(ta.data), np.asarray(tb.data)), ta.name


def test_imported_model_runs_on_the_kernels_within_their_bound(tmp_path: Path) -> None:
    model = TinyChat()
    quantize_(model.language, "model=w4g32,model@embedding=w8g32", progress=False)
    export(model, "gguf", tmp_path / "a.gguf")
    twin = float_twin(model)
    ids = torch.tensor([model.tokenizer("the quick brown fox answers a small question")["input_ids"]])
    with torch.no_grad():
        float_logits = twin.language(ids).logits
        pack_from_gguf(twin.language, tmp_path / "a.gguf")
        set_backend(twin.language, "reference")
        assert torch.allclose(twin.language(ids).logits, float_logits, atol=1e-5, rtol=0)
        set_backend(twin.language, "cpu")  # int8 activations: the kernels' stated bound, same top tokens
        kernel_logits = twin.language(ids).logits
    assert torch.equal(kernel_logits.argmax(-1), float_logits.argmax(-1))
    assert float((kernel_logits - float_logits).abs().max() / float_logits.abs().max()) < 0.05


@pytest.mark.slow
def test_smollm2_gguf_packs_losslessly() -> None:
    """The shipped SmolLM2 GGUF (Q4_1 blocks, Q8_0 table) on lowbit's kernels: transformers' float logits exactly
    on the reference backend."""
    from lowbit.models.smollm import gguf_path, load_smollm2

    lm, tokenizer = load_smollm2()
    ids = torch.tensor([tokenizer("The capital of France is a city where")["input_ids"]])
    with torch.no_grad():
        float_logits = lm(ids).logits
        report = pack_from_gguf(lm, gguf_path())
        set_backend(lm, "reference")
        packed_logits = lm(ids).logits
    assert set(report["packed"].values()) == {"Q4_1", "Q8_0"} and len(report["packed"]) == 30 * 7 + 2
    assert torch.equal(packed_logits, float_logits)


def test_lowbit_load_packs_a_gguf_and_a_quantized_hf_directory(tmp_path: Path) -> None:
    import lowbit
    from lowbit.errors import LowbitError

    model = TinyChat()
    quantize_(model.language, "model=w4g32,model@embedding=w8g32", progress=False)
    export(model, "gguf", tmp_path / "m.gguf")
    export(model, "hf", tmp_path / "ct", dequantize=True)  # the packed table goes float: compressed-tensors has none
    ids = torch.tensor([model.tokenizer("the quick brown fox")["input_ids"]])
    set_backend(model.language, "reference")
    with torch.no_grad():
        want = model.language(ids).logits
    for path, packed in ((tmp_path / "m.gguf", 2 * 7 + 2), (tmp_path / "ct", 2 * 7 + 1)):
        loaded = lowbit.load(str(path))
        report = loaded.lowbit_import
        assert len(report.get("packed", {})) == packed or report.get("packed_layers") == packed
        set_backend(loaded.language, "reference")
        with torch.no_grad():
            torch.testing.assert_close(loaded.language(ids).logits, want, rtol=0, atol=1e-5)
        assert_resaves_exactly(loaded, tmp_path / f"saved-{path.name}", ids, packed)
    float_model = lowbit.load(str(tmp_path / "m.gguf"), packed=False)
    assert not hasattr(float_model, "lowbit_import")
    with pytest.raises(LowbitError, match="no packed layer to save"):
        float_model.lowbit_import = {"packed": {}}
        lowbit.save(float_model, tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


def assert_resaves_exactly(loaded: torch.nn.Module, out: Path, ids: torch.Tensor, layers: int) -> None:
    """``lowbit.save`` of an imported model: a normal packed checkpoint holding the producer's integers, which
    loads back to the same outputs (reference and kernels) and saves again to the same bytes."""
    import lowbit

    lowbit.save(loaded, out)
    manifest = json.loads((out / "manifest.json").read_text())
    methods = {m["method"] for m in manifest["modules"].values()}
    assert len(manifest["modules"]) == layers and len(methods) == 1 and methods.pop().startswith("import:")
    assert manifest["extra"]["imported"] == json.loads(json.dumps(loaded.lowbit_import))
    back = lowbit.load(str(out))
    for backend in ("reference", "cpu"):
        set_backend(loaded.language, backend)
        set_backend(back.language, backend)
        with torch.no_grad():
            assert torch.equal(back.language(ids).logits, loaded.language(ids).logits), backend
    lowbit.save(back, out.with_name(out.name + "-again"))
    assert (out / "model.safetensors").read_bytes() == (out.with_name(out.name + "-again") /
                                                        "model.safetensors").read_bytes()


def test_imported_q4_1_and_tq2_0_save_as_their_variant_kinds(tmp_path: Path) -> None:
    """GGUF Q4_1 layers import as lowbit's offset (minmax) layers and TQ2_0 as ternary: both re-save and reload."""
    import lowbit

    for recipe, hidden, kinds in (("model=w4g32:minmax,model@embedding=w8g32", 64, {"offset_linear", "embedding",
                                                                                     "linear"}),
                                  ("model=w1.58g256,model@embedding=w8g32", 256, {"linear", "embedding"})):
        model = TinyChat(hidden=hidden, inter=2 * hidden)
        quantize_(model.language, recipe, progress=False)
        path = tmp_path / f"m{hidden}.gguf"
        export(model, "gguf", path)
        loaded = lowbit.load(str(path))
        ids = torch.tensor([model.tokenizer("the quick brown fox")["input_ids"]])
        out = tmp_path / f"saved{hidden}"
        assert_resaves_exactly(loaded, out, ids, 2 * 7 + 2)
        assert {m["kind"] for m in json.loads((out / "manifest.json").read_text())["modules"].values()} == kinds


def converter_rope_factors(theta: float, dim: int, factor: float, low: float, high: float, context: int) -> np.ndarray:
    """llama.cpp's ``convert_hf_to_gguf.py`` (LlamaModel.generate_extra_tensors) rope_freqs for llama3, as written
    there: per frequency 1, ``factor``, or the smoothed divisor in between."""
    import math

    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low_wavelen, high_wavelen = context / low, context / high
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_llama3_rope_parameters_recovered_from_a_converter_rope_freqs_tensor() -> None:
    """A Llama 3.2-shaped RoPE (head_dim 64, theta 5e5, factor 32): the parameters read back from the factors alone
    equal the config's, and transformers' frequencies from them equal the converter's tensor."""
    import transformers

    from lowbit.models.gguf_import import _llama3_from_factors, rope_frequency_factors

    config = transformers.LlamaConfig(hidden_size=2048, num_attention_heads=32, head_dim=64,
                                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    factors = converter_rope_factors(500000.0, 64, 32.0, 1.0, 4.0, 8192)
    params = _llama3_from_factors(config, factors)
    assert params == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}
    config.rope_parameters = {**params, "rope_theta": 500000.0}
    np.testing.assert_allclose(rope_frequency_factors(config), factors, rtol=1e-6)


def test_k_quants_load_dequantized_with_a_warning(tmp_path: Path) -> None:
    """A GGUF quantized by llama.cpp's own quantize to Q4_K_M: K-quant layers (their 256-weight super-blocks of
    6-bit sub-scales have no lowbit layout) run on transformers' dequantized floats, with one warning naming the
    types; the model's logits equal transformers' float load of the file."""
    import warnings

    import lowbit

    llama_cpp = pytest.importorskip("llama_cpp")
    model = TinyChat(hidden=256, inter=512)
    export(model, "gguf", tmp_path / "f32.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert llama_cpp.llama_model_quantize(str(tmp_path / "f32.gguf").encode(), str(tmp_path / "k.gguf").encode(),
                                          params) == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = lowbit.load(str(tmp_path / "k.gguf"))
    said = [str(w.message) for w in caught if "have no lowbit layout" in str(w.message)]
    assert len(said) == 1 and "Q4_K" in said[0] and "Q6_K" in said[0], said
    assert set(loaded.lowbit_import["float"].values()) >= {"Q4_K", "Q6_K"}
    reference = lowbit.load(str(tmp_path / "k.gguf"), packed=False)
    ids = torch.tensor([model.tokenizer("the quick brown fox")["input_ids"]])
    set_backend(loaded.language, "reference")
    with torch.no_grad():
        torch.testing.assert_close(loaded.language(ids).logits, reference.language(ids).logits, rtol=0, atol=1e-5)
