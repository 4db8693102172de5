"""Embedding tables and LM heads as recipe kinds, tied tables packed once, floats stored as fp16."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit.errors import LowbitError
from lowbit.eval.footprint import state_bytes, weight_bytes
from lowbit.kernels.quant_embedding import QuantEmbedding
from lowbit.kernels.quant_linear import QuantLinear
from lowbit.quant.apply import quantize_
from lowbit.quant.recipe import Recipe, load_recipe, parse_short


def _tiny_lm(tied: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


def test_short_form_kinds_and_float_dtype():
    r = parse_short("model@embedding=w4g32a,model=w4g32,floats=fp16")
    assert r.float_dtype == "fp16" and r.rules[0].kinds == ("embedding",)
    assert r.rules[0].matches("model", "embed_tokens", "embedding")
    assert not r.rules[1].matches("model", "embed_tokens", "embedding")  # embeddings are opt-in
    assert r.rules[1].matches("model", "lm_head", "lm_head")  # a kind-less rule takes the head
    assert parse_short("model@linear=w4").rules[0].matches("model", "lm_head", "lm_head")  # the head is a linear
    assert not parse_short("model@lm_head=w8").rules[0].matches("model", "q_proj", "linear")
    assert load_recipe("w4").float_dtype == "fp16" and load_recipe("vision=w4").float_dtype == "fp32"
    assert Recipe.from_dict(r.to_dict()).float_dtype == "fp16"  # survives the manifest round trip
    for bad, what in (("model@tokens=w4", "unknown kind 'tokens'"), ("floats=fp8,model=w4", "floats takes"),
                      ("floats=fp16", "no quantization rule")):
        with pytest.raises(LowbitError, match=what):
            parse_short(bad)


def test_tied_head_shares_the_tables_packed_copy():
    lm = _tiny_lm()
    ref = copy.deepcopy(lm)
    report = quantize_(lm, "model@embedding=w8g32,model=w4g32", progress=False)
    table, head = lm.model.embed_tokens, lm.lm_head
    assert isinstance(table, QuantEmbedding) and isinstance(head, QuantLinear)
    for name in ("qweight", "scales"):
        assert getattr(head, name) is getattr(table, name)  # one tensor, not a copy
    entry = next(m for m in report.modules if m.name == "lm_head")
    assert entry.method == "tied:model.embed_tokens" and entry.packed_bytes == 0
    # bytes counted once: in memory and in the state dict
    table_bytes = sum(t.nbytes for t in (table.qweight, table.scales))
    assert weight_bytes(lm)["weight_bytes"] < weight_bytes(ref)["weight_bytes"] / 3
    assert state_bytes(lm) < state_bytes(ref) / 3 and table_bytes == 512 * 64 + 512 * 2 * 2
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        a, b = ref(ids).logits, lm(ids).logits
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


def test_untied_head_is_quantized_on_its_own_and_rules_can_single_it_out():
    lm = _tiny_lm(tied=False)
    report = quantize_(lm, "model@lm_head=w8,model@embedding=w4g32,model=w4g32", progress=False)
    rows = {m.name: m for m in report.modules}
    assert rows["lm_head"].bits == 8 and rows["model.embed_tokens"].bits == 4
    assert rows["model.layers.0.self_attn.q_proj"].bits == 4
    assert lm.lm_head.qweight is not lm.model.embed_tokens.qweight


def test_embedding_refuses_a_calibrated_method_and_storage_without_a_lookup():
    with pytest.raises(LowbitError, match="embedding table takes a method without calibration"):
        quantize_(_tiny_lm(), "model@embedding=w4g32:gptq,model=w4g32", progress=False)
    with pytest.raises(LowbitError, match="minmax supports layer kinds linear, conv1x1, conv; received .embedding."):
        quantize_(_tiny_lm(), "model@embedding=w4g32:minmax,model=w4g32", progress=False)


def test_fp16_floats_are_rounded_in_place_and_reported_at_two_bytes():
    model = nn.Sequential(nn.Linear(32, 32), nn.LayerNorm(32))
    with torch.no_grad():
        model[1].weight.add_(torch.randn(32) * 1e-3)
    fp32 = quantize_(copy.deepcopy(model), "model/0=w8", progress=False)
    quantized = copy.deepcopy(model)
    fp16 = quantize_(quantized, "model/0=w8,floats=fp16", progress=False)
    norm = quantized[1].weight
    assert norm.dtype == torch.float32 and torch.equal(norm, norm.half().float())
    assert not torch.equal(norm, model[1].weight)  # really rounded
    assert torch.equal(quantized[0].bias, model[0].bias.half().float())  # a packed layer's bias too
    assert fp16.totals()["total"]["float_bytes"] * 2 == fp32.totals()["total"]["float_bytes"]


def test_qat_folds_embedding_tables_and_refuses_tied_heads():
    from lowbit.quant.qat import convert_qat, prepare_qat, qat_layers

    lm = _tiny_lm(tied=False)
    prepare_qat(lm, "model@embedding=w4g32a,model=w4g32,floats=fp16")
    assert "embedding" in {layer.kind for _, layer in qat_layers(lm)}
    ids = torch.randint(0, 512, (1, 7))
    lm(ids).logits.sum().backward()  # the table trains through its fake quantizer
    assert lm.model.embed_tokens.module.weight.grad is not None
    report = convert_qat(lm)
    assert isinstance(lm.model.embed_tokens, QuantEmbedding) and report.recipe_spec["float_dtype"] == "fp16"
    norm = lm.model.norm.weight
    assert torch.equal(norm, norm.half().float())  # floats rounded as quantize_ rounds them
    with pytest.raises(LowbitError, match="tied to its embedding table"):
        prepare_qat(_tiny_lm(tied=True), "model@embedding=w4g32a,model=w4g32")
