"""Fused sibling projections (lowbit.kernels.fusion): one kernel call, the same outputs as the separate layers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.kernels import fast
from lowbit.kernels.fusion import SHARED_INPUT_CHILDREN, fuse_shared_inputs, unfuse_shared_inputs
from lowbit.kernels.quant_linear import GROUP_ATTR, QuantLinear, set_backend
from lowbit.quant.apply import quantize_
from lowbit.quant.primitives import QuantSpec, to_packed
from lowbit.quant.recipe import Recipe


def recipe(bits: int, group: int | None) -> Recipe:
    return Recipe.from_dict({"version": 1, "rules": [{"tower": "*", "pattern": "*", "kinds": ["linear"],
                                                      "method": "rtn", "bits": bits, "group_size": group}]})


class Pair(nn.Module):
    """Test parent: its forward calls ``a`` and ``b`` on the same input."""

    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x), self.b(x)


PAIR = f"{Pair.__module__}.{Pair.__qualname__}"
if PAIR not in SHARED_INPUT_CHILDREN:
    SHARED_INPUT_CHILDREN.register(PAIR)((("a", "b"),))


def needs_kernels() -> None:
    if not fast.is_available():
        pytest.skip(f"kernels unavailable: {fast.unavailable_reason()}")


def packed_linear(n: int, k: int, bits: int = 4, group: int = 32, seed: int = 0, bias: bool = True) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    return QuantLinear.from_packed(to_packed(w, QuantSpec(bits, group)), torch.randn(n, generator=g) if bias else None)


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_quantized_llama_links_qkv_and_gate_up_and_fused_equals_unfused() -> None:
    needs_kernels()
    from transformers import DynamicCache

    model = tiny_llama()
    float_model = copy.deepcopy(model)
    quantize_(model, recipe(4, 32), progress=False)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        group = attn.q_proj.__dict__[GROUP_ATTR][0]
        qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
        assert [m.__dict__[GROUP_ATTR] for m in qkv] == [(group, i) for i in range(3)]
        assert mlp.gate_proj.__dict__[GROUP_ATTR][0] is mlp.up_proj.__dict__[GROUP_ATTR][0]
        assert GROUP_ATTR not in attn.o_proj.__dict__ and GROUP_ATTR not in mlp.down_proj.__dict__
    unfused = copy.deepcopy(model)
    unfuse_shared_inputs(unfused)
    reference = copy.deepcopy(model)
    set_backend(reference, "reference")
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        logits = {}
        for name, m in (("fused", model), ("unfused", unfused), ("reference", reference), ("float", float_model)):
            cache = DynamicCache()
            prefill = m(ids, past_key_values=cache, use_cache=True).logits  # M = 7: the panel GEMM
            step = m(ids[:, -1:], past_key_values=cache, use_cache=True).logits  # M = 1: the fused GEMV
            logits[name] = (prefill, step)
    for fused, unfused_y in zip(logits["fused"], logits["unfused"], strict=True):
        assert torch.equal(fused, unfused_y)  # every output from the same int8 activations: bit-identical
    # ... and within the kernels' percent-level rounding of the dequantized float32 model.
    for fused, ref in zip(logits["fused"], logits["reference"], strict=True):
        assert 0 < ((fused - ref).norm() / ref.norm()).item() < 2e-2


def test_sibling_called_on_another_input_computes_on_its_own() -> None:
    needs_kernels()
    pair = Pair(packed_linear(24, 64, seed=1), packed_linear(40, 64, seed=2))
    alone = copy.deepcopy(pair)
    assert fuse_shared_inputs(pair) == 1
    g = torch.Generator().manual_seed(3)
    x, other = torch.randn(2, 64, generator=g), torch.randn(2, 64, generator=g)
    with torch.no_grad():
        assert torch.equal(pair.a(x), alone.a(x))
        assert torch.equal(pair.b(other), alone.b(other))  # not the pending output for x
        ya = pair.a(x)
        x.mul_(2)  # same tensor, new contents: the pending output of b for the old x must not be served
        assert torch.equal(pair.b(x), alone.b(x))
        assert not torch.equal(ya, pair.a(x))
        clone = copy.deepcopy(pair)  # caches hold extension objects: a copy rebuilds them
        assert torch.equal(clone(x)[1], pair(x)[1])


def test_group_follows_a_siblings_new_weights_and_falls_back_for_autograd() -> None:
    needs_kernels()
    pair = Pair(packed_linear(16, 64, seed=4), packed_linear(16, 64, seed=5, bias=False))
    fuse_shared_inputs(pair)
    x = torch.randn(3, 64)
    with torch.no_grad():
        before = pair(x)
        other = packed_linear(16, 64, seed=6, bias=False)
        pair.b.load_state_dict(other.state_dict())
        after = pair(x)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], other(x))
    xg = x.clone().requires_grad_(True)
    ya, yb = pair(xg)  # autograd: the reference path of each layer, exact float semantics
    assert torch.equal(ya, F.linear(xg, pair.a.dequantized_weight(), pair.a.bias))
    (ya.sum() + yb.sum()).backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


@pytest.mark.parametrize("second", ["bits", "width", "input_scale"])
def test_incompatible_siblings_stay_apart(second: str) -> None:
    a = packed_linear(16, 64)
    if second == "bits":
        b = packed_linear(16, 64, bits=8)
    elif second == "width":
        b = packed_linear(16, 96)
    else:
        w = torch.randn(16, 64)
        b = QuantLinear.from_packed(to_packed(w, QuantSpec(4, 32)), None, torch.rand(64) + 0.5)
    pair = Pair(a, b)
    assert fuse_shared_inputs(pair) == 0 and GROUP_ATTR not in a.__dict__


def test_offset_siblings_fuse_and_equal_their_own_outputs() -> None:
    """``minmax`` (offset storage: w = q * s + m) q/k/v and gate/up fuse too: one kernel call plus one group-term
    product for all siblings, equal to each layer's own kernel + group term (float32 rounding of the product)."""
    needs_kernels()
    model = tiny_llama()
    quantize_(model, Recipe.from_dict({"version": 1, "rules": [{"tower": "*", "pattern": "*", "kinds": ["linear"],
                                                                "method": "minmax", "bits": 4, "group_size": 32}]}),
              progress=False)
    attn = model.model.layers[0].self_attn
    group = attn.q_proj.__dict__[GROUP_ATTR][0]
    assert [m.__dict__[GROUP_ATTR] for m in (attn.q_proj, attn.k_proj, attn.v_proj)] == [(group, i) for i in range(3)]
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(2)) * 3
    unfused = copy.deepcopy(model)
    unfuse_shared_inputs(unfused)
    alone = unfused.model.layers[0].self_attn
    with torch.inference_mode():
        fused = group.outputs(x)
        assert fused is not None
        for m, y in zip((alone.q_proj, alone.k_proj, alone.v_proj), fused, strict=True):
            want = m(x)
            assert y.shape == want.shape
            assert (y - want).abs().max() <= 1e-5 * want.abs().max()
        # A sibling called through its module gets the group's output (one call for the three).
        assert torch.equal(attn.q_proj(x), fused[0]) and torch.equal(attn.k_proj(x), fused[1])
