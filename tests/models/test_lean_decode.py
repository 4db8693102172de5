"""The lean decoder equals transformers' forward/generate on the same modules (float and packed)."""

from __future__ import annotations

import copy

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.models.lean_decode import LeanDecoder, lean_generate, unsupported_reason
from lowbit.quant.recipe import Recipe

VOCAB, PROMPT, STEPS = 97, 7, 20


def tiny_lm(model_type: str = "llama", kv_heads: int = 2, seed: int = 0):
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[model_type]
    torch.manual_seed(seed)
    config = config_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
                        rope_theta=1000.0, tie_word_embeddings=True)
    return model_cls(config).eval()


def hf_generate(model, steps: int = STEPS, **inputs):
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)


def prompt() -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(1))


# A packed model's engine runs the kernels' RMSNorm / attention / silu (cpu/kernels_decode_impl.h), equal to
# torch's to float32 rounding; one rounding step can move an int8 activation of the next packed matmul by one
# level (the kernels' bound, a_b / 2 per input): observed up to 2.5e-3 of the largest logit, on one step in 20.
PACKED_REL = 1e-2


def assert_matches(ref, out, rel: float = 1e-4) -> None:
    """Tokens equal and every step's logits (prefill first) within ``rel`` of transformers' (relative to max)."""
    new = ref.sequences[:, -STEPS:]
    assert out.tokens.tolist() == new.tolist()
    assert len(out.logits) == len(ref.logits) == STEPS
    for a, b in zip(ref.logits, out.logits, strict=True):
        assert float((a.float() - b).abs().max() / a.float().abs().max()) < rel


@pytest.mark.parametrize(("model_type", "kv_heads"), [("llama", 2), ("llama", 4), ("mistral", 2), ("qwen2", 1)])
def test_greedy_matches_transformers_from_ids(model_type: str, kv_heads: int) -> None:
    model = tiny_lm(model_type, kv_heads)
    ids = prompt()
    ref = hf_generate(model, input_ids=ids, attention_mask=torch.ones_like(ids))
    assert_matches(ref, LeanDecoder(model).generate(ids, max_new_tokens=STEPS, return_logits=True))


def test_bfloat16_model_matches_transformers() -> None:
    model = tiny_lm().to(torch.bfloat16)
    ids = prompt()
    ref = hf_generate(model, input_ids=ids, attention_mask=torch.ones_like(ids))
    assert_matches(ref, LeanDecoder(model).generate(ids, max_new_tokens=STEPS, return_logits=True))


def test_greedy_matches_transformers_from_embeddings() -> None:
    model = tiny_lm()
    with torch.inference_mode():
        embeds = model.model.embed_tokens(prompt()) + 0.01 * torch.randn(1, PROMPT, 64)  # not any token's row
    ref = hf_generate(model, inputs_embeds=embeds, attention_mask=torch.ones(1, PROMPT, dtype=torch.long))
    assert_matches(ref, lean_generate(model, inputs_embeds=embeds, max_new_tokens=STEPS, return_logits=True))


def test_prefill_logits_match_a_full_forward() -> None:
    model = tiny_lm()
    ids = prompt()
    with torch.inference_mode():
        full = model(ids).logits[:, -1]  # [1, V]
    logits = LeanDecoder(model).prefill(ids)
    assert float((logits - full).abs().max() / full.abs().max()) < 1e-5


def test_packed_model_runs_its_fused_kernels_like_transformers() -> None:
    from lowbit.kernels.quant_linear import GROUP_ATTR
    from lowbit.quant.apply import quantize_

    model = tiny_lm()
    recipe = Recipe.from_dict({"version": 1, "name": "w4g32", "rules": [
        {"tower": "*", "pattern": "*", "kinds": ["linear"], "method": "rtn", "bits": 4, "group_size": 32,
         "symmetric": True}]})
    quantize_(model, recipe, progress=False)
    assert sum(GROUP_ATTR in m.__dict__ for m in model.modules()) == 3 * 5  # q/k/v and gate/up of 3 layers
    engine = LeanDecoder(model, native=False)
    assert engine._prefill_kernel  # the prefill's attention on the kernels (GQA, causal), not SDPA
    calls = [0]
    group = model.model.layers[0].self_attn.q_proj.__dict__[GROUP_ATTR][0]
    outputs = group.outputs
    group.outputs = lambda x: (calls.__setitem__(0, calls[0] + 1), outputs(x))[1]
    ids = prompt()
    ref = hf_generate(copy.deepcopy(model), input_ids=ids, attention_mask=torch.ones_like(ids))
    out = engine.generate(ids, max_new_tokens=STEPS, return_logits=True)
    assert calls[0] == STEPS  # one fused q/k/v call per forward (prefill + 19 steps)
    assert_matches(ref, out, PACKED_REL)
    # The native prefill and step (the kernels' DecoderStack: the same ops from C++, one call per prompt and per
    # token) are bit-equal.
    native = LeanDecoder(model)
    got = native.generate(ids, max_new_tokens=STEPS, return_logits=True)
    assert native._stack is not None
    assert calls[0] == STEPS  # nothing of it went through Python's fused calls
    assert all(torch.equal(a, b) for a, b in zip(out.logits, got.logits, strict=True))
    assert_matches(ref, got, PACKED_REL)


def test_native_step_only_where_every_layer_qualifies() -> None:
    from lowbit.quant.apply import quantize_

    float_model = tiny_lm(kv_heads=4)
    assert LeanDecoder(float_model)._stack is None
    engine = LeanDecoder(float_model)
    engine.prefill(prompt())
    assert engine._stack is None  # float projections: the Python loop
    model = copy.deepcopy(float_model)
    quantize_(model, Recipe.from_dict({"version": 1, "name": "w8", "rules": [
        {"tower": "*", "pattern": "model.layers.0.*", "kinds": ["linear"], "method": "rtn", "bits": 8, "group_size": 32,
         "symmetric": True}]}), progress=False)
    engine = LeanDecoder(model)
    engine.prefill(prompt())
    assert engine._stack is None  # layers 1 and 2 are float
    model = copy.deepcopy(float_model)
    quantize_(model, Recipe.from_dict({"version": 1, "name": "w8", "rules": [
        {"tower": "*", "pattern": "*", "kinds": ["linear"], "method": "rtn", "bits": 8, "group_size": None,
         "symmetric": True}]}), progress=False)
    ids = prompt()
    ref = hf_generate(copy.deepcopy(model), input_ids=ids, attention_mask=torch.ones_like(ids))
    engine = LeanDecoder(model)
    out = engine.generate(ids, max_new_tokens=STEPS, return_logits=True)
    assert engine._stack is not None  # MHA (kv_heads == heads), per-channel 8-bit: native
    assert_matches(ref, out, PACKED_REL)
    engine.prefill(ids, max_len=PROMPT + 1)
    engine.step(out.tokens[:, 0])
    with pytest.raises(LowbitError, match="past the"):
        engine.step(out.tokens[:, 1])


def test_stop_ids_callback_and_sampling() -> None:
    model = tiny_lm()
    ids = prompt()
    engine = LeanDecoder(model)
    greedy = engine.generate(ids, max_new_tokens=STEPS).tokens[0].tolist()
    stop = greedy[5]
    seen: list[int] = []
    out = engine.generate(ids, max_new_tokens=STEPS, stop_ids=[stop], callback=lambda t: seen.append(int(t[0])))
    assert out.tokens[0].tolist() == greedy[:greedy.index(stop) + 1] == seen  # the stop token is kept, then stops
    assert engine.generate(ids, max_new_tokens=STEPS, do_sample=True, top_k=1, seed=3).tokens[0].tolist() == greedy
    a = engine.generate(ids, max_new_tokens=STEPS, do_sample=True, temperature=1.5, top_p=0.9, seed=7).tokens
    b = engine.generate(ids, max_new_tokens=STEPS, do_sample=True, temperature=1.5, top_p=0.9, seed=7).tokens
    c = engine.generate(ids, max_new_tokens=STEPS, do_sample=True, temperature=1.5, top_p=0.9, seed=8).tokens
    assert a.tolist() == b.tolist() != c.tolist()
    # top-p keeps the smallest prefix reaching p: with p tiny only the argmax survives
    assert engine.generate(ids, max_new_tokens=STEPS, do_sample=True, top_p=1e-6, seed=1).tokens[0].tolist() == greedy
    # every sampled token is one of the top-2 of its step's logits (transformers' top-k warper)
    top2 = engine.generate(ids, max_new_tokens=STEPS, do_sample=True, temperature=3.0, top_k=2, seed=5,
                           return_logits=True)
    for step, token in enumerate(top2.tokens[0].tolist()):
        assert token in top2.logits[step][0].topk(2).indices.tolist()  # type: ignore[index]
    with pytest.raises(LowbitError, match=r"top_p must be in \(0, 1\]; received 0"):
        engine.generate(ids, do_sample=True, top_p=0)


def test_unsupported_models_and_windows_give_one_line() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16))
    with pytest.raises(LowbitError, match="does not support model_type 'gpt2'; accepted: llama, mistral, qwen2"):
        LeanDecoder(gpt2)
    mistral = tiny_lm("mistral")
    mistral.config.sliding_window = 8
    assert unsupported_reason(mistral) is None
    with pytest.raises(LowbitError, match="exceed the mistral sliding window of 8"):
        LeanDecoder(mistral).generate(prompt(), max_new_tokens=5)


@pytest.mark.slow
def test_smollm2_greedy_equals_generate_fp32_and_w4() -> None:
    from lowbit.models.smollm import load_smollm2
    from lowbit.quant.apply import quantize_

    lm, tokenizer = load_smollm2()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Describe an ankle boot."}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids
    recipe = Recipe.from_dict({"version": 1, "name": "w4g32", "rules": [
        {"tower": "*", "pattern": "*", "kinds": ["linear"], "method": "rtn", "bits": 4, "group_size": 32,
         "symmetric": True}]})
    packed = copy.deepcopy(lm)
    quantize_(packed, recipe, progress=False)
    for model in (lm, packed):  # each against transformers running the same (float or packed) modules
        with torch.inference_mode():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                                 do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True,
                                 return_dict_in_generate=True)
        want = ref.sequences[0, ids.shape[1]:].tolist()
        got = LeanDecoder(model).generate(ids, max_new_tokens=32).tokens[0].tolist()
        if model is lm:
            assert got == want
            continue
        # Packed: the engine's RMSNorm / attention / silu are the kernels' (PACKED_REL), and over 30 layers their
        # rounding moves logits by up to ~1: the tokens are transformers' until a near tie, if any, late.
        first = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), None)
        if first is not None:
            logits = ref.logits[first][0]
            assert first >= 16 and float(logits.max() - logits[got[first]]) < 0.5


def fastv_reference(model, ids: torch.Tensor, prune) -> tuple[torch.Tensor, object]:
    """FastV without the engine: transformers' eager attention ranks the span in layer ``prune.layer``, then
    generation runs with the dropped positions masked out as keys in every later layer (what dropping them
    means for the kept tokens, which keep their positions)."""
    with torch.inference_mode():
        att = model(input_ids=ids, output_attentions=True).attentions[prune.layer - 1]  # [B, H, T, T]
    span = slice(prune.start, prune.start + prune.count)
    scores = att[:, :, prune.start + prune.count:, span].mean(dim=(1, 2))  # [B, count]
    chosen = set((scores[0].topk(prune.keep).indices + prune.start).tolist())
    dropped = [p for p in range(prune.start, prune.start + prune.count) if p not in chosen]

    def mask_dropped(_module, args, kwargs):
        mask = kwargs["attention_mask"].clone()  # [B, 1, T, S] additive (eager)
        mask[..., dropped] = torch.finfo(mask.dtype).min
        kwargs["attention_mask"] = mask
        return args, kwargs

    hooks = [layer.register_forward_pre_hook(mask_dropped, with_kwargs=True)
             for layer in model.model.layers[prune.layer:]]
    try:
        ref = hf_generate(model, input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for h in hooks:
            h.remove()
    return scores, ref


@pytest.mark.parametrize(("layer", "kv_heads"), [(1, 2), (2, 4), (2, 1)])
def test_fastv_prune_inside_the_lm_matches_masked_transformers(layer: int, kv_heads: int) -> None:
    from lowbit.models.token_pruning import InLayerPrune

    model = tiny_lm(kv_heads=kv_heads)
    model.config._attn_implementation = "eager"  # the reference needs materialised masks and attention maps
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    prune = InLayerPrune(layer=layer, start=3, count=8, keep=3)
    scores, ref = fastv_reference(model, ids, prune)
    engine = LeanDecoder(model)
    out = engine.generate(ids, max_new_tokens=STEPS, return_logits=True, prune=prune)
    assert_matches(ref, out)
    assert engine.fill == [16 + STEPS - 1] * layer + [16 - 5 + STEPS - 1] * (3 - layer)  # later layers: 5 fewer
    # keep == count drops nothing: the plain prefill, bit for bit
    full = engine.generate(ids, max_new_tokens=STEPS, return_logits=True)
    same = engine.generate(ids, max_new_tokens=STEPS, return_logits=True,
                           prune=InLayerPrune(layer=layer, start=3, count=8, keep=8))
    assert full.tokens.tolist() == same.tokens.tolist()
    assert all(torch.equal(a, b) for a, b in zip(full.logits, same.logits, strict=True))
    assert float((full.logits[0] - out.logits[0]).abs().max()) > 1e-3  # pruning did change the prefill
    assert scores.shape == (1, 8)


def test_fastv_bad_settings_give_one_line() -> None:
    from lowbit.models.token_pruning import InLayerPrune

    engine = LeanDecoder(tiny_lm())
    ids = prompt()
    with pytest.raises(LowbitError, match=r"prune_layer must be in \[1, 2\] for this 3-layer language model"):
        engine.generate(ids, prune=InLayerPrune(layer=3, start=1, count=3, keep=1))
    with pytest.raises(LowbitError, match="at least one token after it"):
        engine.generate(ids, prune=InLayerPrune(layer=1, start=4, count=3, keep=1))


def test_kv_buffers_reused_only_after_their_engine_is_gone() -> None:
    import gc

    model = tiny_lm()
    ids = prompt()
    first = LeanDecoder(model)
    first.prefill(ids)
    alive = LeanDecoder(model)
    alive.prefill(ids)  # the first engine is alive: its buffers are not shared
    assert alive.k_cache.data_ptr() != first.k_cache.data_ptr()  # type: ignore[union-attr]
    ptr = alive.k_cache.data_ptr()  # type: ignore[union-attr]
    logits = alive.prefill(ids)
    del alive
    gc.collect()
    again = LeanDecoder(model)
    assert torch.equal(again.prefill(ids), logits)  # same results on the reused (uncleared) buffers
    assert again.k_cache.data_ptr() == ptr  # type: ignore[union-attr]
