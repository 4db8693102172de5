"""HF export: compressed-tensors pack-quantized directories that transformers loads with lowbit's numbers."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.kernels.formats import PackedWeight, pack_codes
from lowbit.kernels.quant_linear import set_backend
from lowbit.quant.apply import quantize_
from lowbit.workflows.export import export
from lowbit.workflows.export.hf import packed_int32
from tests.workflows.test_export_gguf import TinyChat

pytest.importorskip("compressed_tensors")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k", [64, 48, 70])  # whole words, and rows compressed-tensors pads
def test_lowbit_rows_are_compressed_tensors_words(bits: int, k: int) -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    g = torch.Generator().manual_seed(bits * k)
    codes = torch.randint(0, 1 << bits, (5, k), generator=g, dtype=torch.uint8)
    packed = PackedWeight(pack_codes(codes, bits), torch.ones(5, 1, dtype=torch.float16), None, bits, k, (5, k))
    signed = (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
    assert torch.equal(packed_int32(packed), pack_to_int32(signed, bits))


def loaded_and_ours(tmp_path, recipe: str, **options):
    from transformers import LlamaForCausalLM

    model = TinyChat()
    quantize_(model.language, recipe, progress=False)
    report = export(model, "hf", tmp_path / "hf", **options)
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    set_backend(model.language, "reference")
    return model, theirs, report


def test_transformers_loads_the_export_with_lowbit_weights(tmp_path) -> None:
    model, theirs, report = loaded_and_ours(tmp_path, "model/*mlp*=w8,model=w4g32")
    assert report["exact"] and report["config_groups"] == 2 and report["packed_layers"] == 2 * 7 + 1
    ours = model.language
    ids = torch.tensor([model.tokenizer("the quick brown fox answers a small question")["input_ids"]])
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits  # compressed-tensors decompresses at the first forward
    # stated bound: fp16 rounding of the weights (relative 2^-11 each) moves logits by < 1e-2 of their range
    assert float((a - b).abs().max() / a.abs().max()) < 1e-2 and torch.equal(a.argmax(-1), b.argmax(-1))
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"):
        w_lowbit = ours.get_submodule(path).packed.dequantize()
        w_hf = theirs.get_submodule(path).weight.float()
        # compressed-tensors decompresses q * scale in the scale's dtype (fp16): lowbit's weight rounded to fp16
        torch.testing.assert_close(w_hf, w_lowbit.half().float(), rtol=0, atol=0)
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


def test_grids_without_a_compressed_tensors_form_refused_or_dequantized(tmp_path) -> None:
    model = TinyChat()
    quantize_(model.language, "model/*mlp*=w4g32a,model=w4g32", progress=False)
    with pytest.raises(LowbitError, match="mlp.gate_proj: uint4 zero points do not load in transformers"):
        export(model, "hf", tmp_path / "hf")
    model = TinyChat()
    quantize_(model.language, "model=w4g32:minmax", progress=False)
    with pytest.raises(LowbitError, match=r"^layer model\.layers\.0\.self_attn\.q_proj: OffsetLinear has no "
                                          r"compressed-tensors form .* dequantize=True") as err:
        export(model, "hf", tmp_path / "hf")
    assert "\n" not in str(err.value) and not (tmp_path / "hf").exists()
    _, theirs, report = loaded_and_ours(tmp_path, "model/*mlp*=w4g32,model=w4g32:minmax", dequantize=True)
    assert not report["exact"] and len(report["dequantized"]) == 2 * 4 + 1  # q, k, v, o and the head
    assert all(r["relative_error"] < 1e-6 for r in report["dequantized"])  # float32 model: stored exactly


def test_lowbit_architectures_refused_and_save_pretrained_guarded(tmp_path) -> None:
    import lowbit

    with pytest.raises(LowbitError, match="lowbit's own architecture: export it as onnx"):
        export(lowbit.load("lit-fashion"), "hf", tmp_path / "x")
    model = TinyChat()
    quantize_(model.language, "model=w4g32", progress=False)
    with pytest.raises(LowbitError, match=r"LlamaForCausalLM\.save_pretrained would write .* lowbit\.export"):
        model.language.save_pretrained(tmp_path / "raw")
    assert not (tmp_path / "raw").exists()
