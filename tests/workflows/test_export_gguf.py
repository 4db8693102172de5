"""GGUF export: lowbit grids written exactly (checked with gguf-py's own dequantization), the rest refused in one
line or re-quantized with the error reported, and llama.cpp itself loads the file and agrees on the logits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels.quant_linear import is_quantized
from lowbit.quant.apply import quantize_
from lowbit.workflows.export import export

TEXTS = ["the quick brown fox jumps over the lazy dog", "a small model on a laptop answers questions",
         "low bit weights keep most of the accuracy", "What is this item? It is a sneaker."] * 8


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                 unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    hf.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    return hf


class TinyChat(nn.Module):
    """What the exporter reads from a llava or a loaded causal LM: ``language`` and ``tokenizer``."""

    def __init__(self, model_type: str = "llama", hidden: int = 64, inter: int = 128, seed: int = 0) -> None:
        import transformers

        super().__init__()
        config_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                                 "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                                 "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel)}[model_type]
        self.tokenizer = tiny_tokenizer()
        torch.manual_seed(seed)
        kwargs = dict(vocab_size=len(self.tokenizer), tie_word_embeddings=True)
        if model_type != "gpt2":
            kwargs.update(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0)
        self.language = model_cls(config_cls(**kwargs)).eval()


def gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    from gguf import GGUFReader, quants

    reader = GGUFReader(str(path))
    return {t.name: quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row order."""
    rows = w.shape[0]
    order = np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)
    out = np.empty_like(w)
    out[order] = w
    return out


def lowbit_weight(module: nn.Module) -> np.ndarray:
    if is_quantized(module):
        return module.packed.dequantize().float().numpy()
    return module.weight.detach().float().numpy()


def assert_exact(model: TinyChat, path: Path) -> dict[str, np.ndarray]:
    lm = model.language
    got = gguf_tensors(path)
    blk0 = lm.model.layers[0]
    pairs = {"token_embd.weight": lm.model.embed_tokens, "blk.0.attn_v.weight": blk0.self_attn.v_proj,
             "blk.0.ffn_down.weight": blk0.mlp.down_proj, "blk.1.ffn_gate.weight": lm.model.layers[1].mlp.gate_proj,
             "output_norm.weight": lm.model.norm}
    for name, module in pairs.items():
        np.testing.assert_array_equal(got[name].reshape(lowbit_weight(module).shape), lowbit_weight(module), name)
    heads = {"attn_q": lm.config.num_attention_heads, "attn_k": lm.config.num_key_value_heads}
    for leaf, module in (("attn_q", blk0.self_attn.q_proj), ("attn_k", blk0.self_attn.k_proj)):
        np.testing.assert_array_equal(unpermute(got[f"blk.0.{leaf}.weight"], heads[leaf]), lowbit_weight(module))
    assert "output.weight" not in got  # the tied head is the embedding table, stored once
    return got


@pytest.mark.parametrize(("recipe", "types"), [
    ("model=w4g32,model@embedding=w8g32", {"Q4_0", "Q8_0", "F32"}),
    ("model=w4g128,model@embedding=w8", {"Q4_0", "Q8_0", "F32"}),  # g128 and per-row: every 32-block exact
    ("model=w4g32:minmax,model@embedding=w8g32", {"Q4_1", "Q8_0", "F32"}),  # SmolLM2's own GGUF layout
    ("model=w3g32:minmax,model@embedding=w8g32", {"Q4_1", "Q8_0", "F32"}),
    # narrower symmetric grids widen into Q4_0 with the same values
    ("model=w3g32,model@embedding=w8g32", {"Q4_0", "Q8_0", "F32"}),
    ("model=w2g64,model@embedding=w8g32", {"Q4_0", "Q8_0", "F32"}),
    ("model=w1g32,model@embedding=w8g32", {"Q4_0", "Q8_0", "F32"}),
    ("model=w1.58g32,model@embedding=w8g32", {"Q4_0", "Q8_0", "F32"}),  # ternary below TQ2_0's 256
])
def test_exact_grids_round_trip_through_gguf_py(tmp_path: Path, recipe: str, types: set[str]) -> None:
    model = TinyChat()
    quantize_(model.language, recipe, progress=False)
    report = export(model, "gguf", tmp_path / "m.gguf")
    assert report["exact"] and set(report["tensor_types"]) == types
    assert report["tensors"] == 1 + 2 * 9 + 1 and report["file_bytes"] == (tmp_path / "m.gguf").stat().st_size
    assert_exact(model, tmp_path / "m.gguf")


def test_ternary_writes_tq2_0_exactly(tmp_path: Path) -> None:
    model = TinyChat(hidden=256, inter=512)
    quantize_(model.language, "model=w1.58g256,model@embedding=w1.58g256", progress=False)
    report = export(model, "gguf", tmp_path / "t.gguf")
    # 7 linears per block, and the tied head quantized as the embedding table (one copy)
    assert report["tensor_types"] == {"TQ2_0": 2 * 7 + 1, "F32": 2 * 2 + 1}
    got = assert_exact(model, tmp_path / "t.gguf")
    assert set(np.unique(got["blk.0.ffn_up.weight"] / np.abs(got["blk.0.ffn_up.weight"]).max(1, keepdims=True))) \
        <= {-1.0, 0.0, 1.0}


def test_inexact_grid_refused_in_one_line_or_requantized_with_its_error(tmp_path: Path) -> None:
    model = TinyChat()
    quantize_(model.language, "model=w4g32a,model@embedding=w8g32", progress=False)  # zero points: no GGUF type
    out = tmp_path / "m.gguf"
    with pytest.raises(LowbitError, match=r"^layer model\.layers\.0\.self_attn\.q_proj: uint4 storage has no GGUF "
                                          r"type; the nearest exact recipe is w4g32 .*--requantize") as err:
        export(model, "gguf", out)
    assert "\n" not in str(err.value) and not out.exists() and not list(tmp_path.iterdir())
    report = export(model, "gguf", out, requantize=True)
    assert not report["exact"] and len(report["requantized"]) == 2 * 7
    errors = [r["relative_rms_error"] for r in report["requantized"]]
    assert all(0 < e < 0.2 for e in errors)  # zero-point grid -> Q4_0: a measured, small, non-zero error
    assert gguf_tensors(out)["blk.0.attn_v.weight"].shape == (32, 64)


def test_other_architectures_and_options_refused(tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match="Llama-family language model .* model_type 'gpt2'"):
        export(TinyChat("gpt2"), "gguf", tmp_path / "g.gguf")
    with pytest.raises(LowbitError, match="does not take requantise; accepted options: requantize"):
        export(TinyChat(), "gguf", tmp_path / "g.gguf", requantise=True)
    assert not list(tmp_path.iterdir())


def test_cli_bad_model_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "lowbit.cli", "export", "lit-fashion", "--format", "gguf", "--out",
                           str(tmp_path / "x.gguf")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "Llama-family" in proc.stderr and not (tmp_path / "x.gguf").exists()


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def lowbit_logits(model: TinyChat, ids: list[int]) -> np.ndarray:
    from lowbit.kernels.quant_linear import set_backend

    set_backend(model.language, "reference")  # dequantized weights, float activations: the numbers in the file
    with torch.no_grad():
        return model.language(torch.tensor([ids])).logits[0].double().numpy()


def kl_rows(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    p = torch.log_softmax(torch.from_numpy(p_logits), -1)
    q = torch.log_softmax(torch.from_numpy(q_logits), -1)
    return (p.exp() * (p - q)).sum(-1).numpy()


@pytest.mark.parametrize("recipe", ["model=w4g32,model@embedding=w8g32", "model=w4g32:minmax"])
def test_llama_cpp_loads_the_file_and_matches_lowbit_logits(tmp_path: Path, recipe: str) -> None:
    model = TinyChat()
    quantize_(model.language, recipe, progress=False)
    export(model, "gguf", tmp_path / "m.gguf")
    ids = model.tokenizer("the quick brown fox answers a small question about low bit weights")["input_ids"]
    ours, theirs = lowbit_logits(model, ids), llama_cpp_logits(tmp_path / "m.gguf", ids)
    # llama.cpp multiplies Q4/Q8 blocks with activations rounded to 8 bits per 32: the only difference.
    # Stated bound: mean KL <= 1e-3 and the same top token at every position.
    assert float(kl_rows(ours, theirs).mean()) < 1e-3
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}  # a 64-token original context: two frequencies in the smooth band


def scaled_rope_chat(scaling: dict) -> TinyChat:
    """A tiny llama with RoPE scaling, weights drawn wide enough (std 0.1) that the scaling moves the logits."""
    model = TinyChat()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.language.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    config = model.language.config
    config.rope_parameters = {**config.rope_parameters, **scaling}
    model.language.model.rotary_emb = type(model.language.model.rotary_emb)(config=config)
    return model


@pytest.mark.parametrize(("scaling", "lowbit_key"), [(LLAMA3, True), (LLAMA3, False),
                                                     ({"rope_type": "linear", "factor": 4.0}, True)],
                         ids=["llama3", "llama3-converter-layout", "linear"])
def test_rope_scaling_exported_and_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scaling: dict,
                                            lowbit_key: bool) -> None:
    """llama3 RoPE scaling goes out as llama.cpp's rope_freqs tensor, linear as its scaling metadata: llama.cpp
    then rotates as transformers does (KL against lowbit far below the scaling's own effect), and lowbit's import
    restores the config, from its own key or (``lowbit_key=False``: a file as llama.cpp's converter writes it)
    from the tensor alone."""
    import lowbit
    from lowbit.kernels.quant_linear import set_backend
    from lowbit.workflows.export import gguf as gguf_export

    if not lowbit_key:
        monkeypatch.setattr(gguf_export, "ROPE_KEY", "general.unused_test_key")
    model = scaled_rope_chat(scaling)
    quantize_(model.language, "model=w4g32,model@embedding=w8g32", progress=False)
    report = export(model, "gguf", tmp_path / "r.gguf")
    tensors = gguf_tensors(tmp_path / "r.gguf")
    assert ("rope_freqs.weight" in tensors) == (scaling["rope_type"] == "llama3"), report
    ids = model.tokenizer(" ".join([TEXTS[0], TEXTS[1], TEXTS[2]] * 4))["input_ids"]
    ours, theirs = lowbit_logits(model, ids), llama_cpp_logits(tmp_path / "r.gguf", ids)
    rotary, config = model.language.model.rotary_emb, model.language.config
    model.language.model.rotary_emb = type(rotary)(config=type(config)(**{**config.to_dict(), "rope_parameters": {
        "rope_type": "default", "rope_theta": 10000.0}}))
    unscaled = lowbit_logits(model, ids)  # the same weights without the scaling: what the file must not give
    model.language.model.rotary_emb = rotary
    assert float(kl_rows(ours, theirs).mean()) < 1e-3 < float(kl_rows(ours, unscaled).mean()) / 10
    back = lowbit.load(str(tmp_path / "r.gguf"))
    want = {**scaling, "rope_theta": 10000.0}
    assert {k: back.language.config.rope_parameters[k] for k in want} == want
    set_backend(back.language, "reference")
    with torch.no_grad():
        got = back.language(torch.tensor([ids])).logits[0].double().numpy()
    np.testing.assert_allclose(got, ours, rtol=0, atol=1e-5)


def test_other_rope_scaling_refused_in_one_line(tmp_path: Path) -> None:
    model = TinyChat()
    model.language.config.rope_parameters = {**model.language.config.rope_parameters, "rope_type": "yarn",
                                             "factor": 4.0}
    with pytest.raises(LowbitError, match=r"^GGUF export: RoPE scaling 'yarn' is not written; accepted: plain "
                                          r"RoPE, linear, llama3$"):
        export(model, "gguf", tmp_path / "y.gguf")
    assert not list(tmp_path.iterdir())
