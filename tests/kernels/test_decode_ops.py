"""The decode step's small float ops on the kernels (cpu/kernels_decode_impl.h, scalar twin in
kernels_scalar.cpp): RMSNorm, silu(gate) * up and one-token attention over a KV cache, against torch's
``F.rms_norm``, ``F.silu`` and ``F.scaled_dot_product_attention`` (GQA).

They sum in float32 in another order than torch (and the SIMD exp is a polynomial, relative error < 2e-7),
so they equal torch to float32 rounding: asserted at 2e-6 relative to the output's scale, on every ISA, with
1 and 2 threads, over odd sizes (vector tails: D, n, hd not multiples of 8; one cached entry; B = 2; GQA).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowbit.kernels import fast
from tests.kernels.conftest import needs_kernels

REL = 2e-6


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


@pytest.fixture(params=[1, 2])
def threads(request: pytest.FixtureRequest):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 33), (1, 576), (4, 1, 64)])
def test_rms_norm_equals_torch(isa: str, threads: int, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(*shape, generator=g) * 3
    w = torch.randn(shape[-1], generator=g)
    got = fast.extension().rms_norm(x, w, 1e-5)  # type: ignore[union-attr]
    assert got.shape == x.shape
    assert rel_err(got, F.rms_norm(x, (shape[-1],), w, 1e-5)) < REL
    strided = x.reshape(-1, shape[-1]).T.contiguous().T  # any layout: the same rows
    assert torch.equal(fast.extension().rms_norm(strided, w, 1e-5), got.reshape(-1, shape[-1]))  # type: ignore[union-attr]


@pytest.mark.parametrize("n", [1, 7, 8, 45, 1536])
def test_silu_mul_equals_torch(isa: str, threads: int, n: int) -> None:
    g = torch.Generator().manual_seed(n)
    gu = torch.randn(2, 1, 2 * n, generator=g) * 6  # exp over a wide range, large negative gates included
    gate, up = gu.split(n, dim=-1)  # strided views, as the fused gate/up call returns them
    got = fast.extension().silu_mul(gate, up)  # type: ignore[union-attr]
    assert rel_err(got, F.silu(gate) * up) < REL


# (B, heads, kv_heads, hd, n cached, max_len)
ATTENTION = [(1, 9, 3, 64, 1, 4), (1, 9, 3, 64, 161, 200), (2, 4, 2, 12, 17, 17), (1, 3, 3, 20, 9, 31),
             (2, 2, 1, 8, 40, 41), (1, 1, 1, 6, 5, 5)]


@pytest.mark.parametrize(("b", "heads", "kv", "hd", "n", "max_len"), ATTENTION)
def test_decode_attention_equals_sdpa(isa: str, threads: int, b: int, heads: int, kv: int, hd: int, n: int,
                                      max_len: int) -> None:
    g = torch.Generator().manual_seed(n * hd)
    q = torch.randn(b, heads, 1, hd, generator=g) * 2
    k = torch.randn(b, kv, max_len, hd, generator=g) * 2
    v = torch.randn(b, kv, max_len, hd, generator=g)
    k[:, :, n:] = v[:, :, n:] = float("nan")  # entries past n are never read
    got = fast.extension().decode_attention(q, k, v, n)  # type: ignore[union-attr]
    want = F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n], enable_gqa=heads != kv)
    assert got.shape == want.shape
    assert rel_err(got, want) < REL


# (B, heads, kv_heads, hd, T queries, n keys, max_len): T not a multiple of the 16-row block, GQA 3 and 1, hd 64,
# 32 and odd (vector tails), T == 1 over many keys (the trimmed last layer), T < n (rows past a filled prefix).
PREFILL = [(1, 9, 3, 64, 181, 181, 200), (1, 9, 3, 64, 1, 181, 181), (1, 3, 3, 32, 37, 37, 40),
           (2, 4, 2, 32, 16, 16, 16), (1, 2, 1, 12, 9, 20, 31), (1, 1, 1, 20, 33, 33, 33)]


@pytest.mark.parametrize(("b", "heads", "kv", "hd", "t", "n", "max_len"), PREFILL)
def test_prefill_attention_equals_sdpa(isa: str, threads: int, b: int, heads: int, kv: int, hd: int, t: int, n: int,
                                       max_len: int) -> None:
    """Causal attention of T query rows over n cached keys (row i sees keys <= i + n - T) equals SDPA with that
    mask, GQA expanded; q in the strided [B, T, H, hd] -> [B, H, T, hd] layout lean_decode passes."""
    g = torch.Generator().manual_seed(t * hd + n)
    q = (torch.randn(b, t, heads, hd, generator=g) * 2).transpose(1, 2)
    k = torch.randn(b, kv, max_len, hd, generator=g) * 2
    v = torch.randn(b, kv, max_len, hd, generator=g)
    k[:, :, n:] = v[:, :, n:] = float("nan")  # entries past n are never read
    got = fast.extension().prefill_attention(q, k, v, n)  # type: ignore[union-attr]
    mask = torch.ones(t, n, dtype=torch.bool).tril(n - t)
    want = F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n], attn_mask=mask, enable_gqa=heads != kv)
    assert got.shape == (b, t, heads * hd)
    assert rel_err(got, want.transpose(1, 2).reshape(b, t, heads * hd)) < REL


@pytest.mark.parametrize(("b", "t", "heads", "kv", "hd", "fill"), [(1, 37, 9, 3, 64, 0), (2, 5, 4, 2, 12, 3)])
def test_rope_cache_equals_the_python_formula(threads: int, b: int, t: int, heads: int, kv: int, hd: int,
                                              fill: int) -> None:
    """RoPE of q and k rows (two products, one sum: torch's) and the cache write, from strided views of one fused
    q/k/v output, bit-equal to lean_decode's ``_rope`` on the transposed heads."""
    g = torch.Generator().manual_seed(t)
    qkv = torch.randn(b, t, (heads + 2 * kv) * hd, generator=g)
    q, k, v = qkv.split([heads * hd, kv * hd, kv * hd], dim=-1)
    cos, sin = torch.randn(t, hd, generator=g), torch.randn(t, hd, generator=g)
    kc, vc = torch.zeros(b, kv, fill + t + 2, hd), torch.zeros(b, kv, fill + t + 2, hd)
    got = fast.extension().rope_cache(q, k, v, cos, sin, kc, vc, fill, heads)  # type: ignore[union-attr]

    def rope(x: torch.Tensor) -> torch.Tensor:  # lean_decode.LeanDecoder._rope on [B, n, T, hd]
        swapped = x.reshape(*x.shape[:3], 2, hd // 2).flip(-2).reshape(x.shape)
        return x * cos + swapped * sin

    heads_of = lambda x, n: x.reshape(b, t, n, hd).transpose(1, 2)  # noqa: E731
    assert got.shape == (b, heads, t, hd) and torch.equal(got, rope(heads_of(q, heads)))
    assert torch.equal(kc[:, :, fill:fill + t], rope(heads_of(k, kv))) and not kc[:, :, :fill].any()
    assert torch.equal(vc[:, :, fill:fill + t], heads_of(v, kv)) and not vc[:, :, fill + t:].any()


def test_decode_ops_refuse_bad_input() -> None:
    needs_kernels()
    ext = fast.extension()
    q, k = torch.zeros(1, 4, 1, 8), torch.zeros(1, 2, 5, 8)
    with pytest.raises(RuntimeError, match="1 <= n <= max_len"):
        ext.decode_attention(q, k, k, 6)  # type: ignore[union-attr]
    with pytest.raises(RuntimeError, match="T <= n <= max_len"):
        ext.prefill_attention(torch.zeros(1, 4, 3, 8), k, k, 2)  # type: ignore[union-attr]
    with pytest.raises(RuntimeError, match="float32 x"):
        ext.rms_norm(torch.zeros(2, 3), torch.zeros(4), 1e-5)  # type: ignore[union-attr]
    with pytest.raises(RuntimeError, match="one shape"):
        ext.silu_mul(torch.zeros(3), torch.zeros(4))  # type: ignore[union-attr]


@pytest.mark.parametrize("bits", [4, 8])
def test_native_step_equals_the_python_loop(isa: str, threads: int, bits: int) -> None:
    """The decoder stack's one parallel region per token (TokenPhases) computes every op as the Python loop's
    separate kernel calls do: bit-equal logits on every ISA, 1 and 2 threads, two rows (B = 2), GQA, odd sizes
    (hidden 72 and MLP 100: partial K-blocks and groups; vocab 97: a partial tile), the packed head included."""
    import transformers

    from lowbit.models.lean_decode import LeanDecoder
    from lowbit.quant.apply import quantize_
    from lowbit.quant.recipe import Recipe

    torch.manual_seed(bits)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=97, hidden_size=72, intermediate_size=100, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=1000.0, tie_word_embeddings=True)).eval()
    quantize_(model, Recipe.from_dict({"version": 1, "name": f"w{bits}", "rules": [
        {"tower": "*", "pattern": "*", "kinds": ["linear"], "method": "rtn", "bits": bits, "group_size": 32,
         "symmetric": True}]}), progress=False)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(bits))
    native = LeanDecoder(model)
    got = native.generate(ids, max_new_tokens=12, return_logits=True)
    assert native._stack is not None and native._stack.has_head
    want = LeanDecoder(model, native=False).generate(ids, max_new_tokens=12, return_logits=True)
    assert torch.equal(got.tokens, want.tokens)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits, strict=True))
