"""``kquant``: the minmax grid with 6-bit group steps and minima per super-block (``lowbit.kernels.superblock``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.kernels.formats import expand_groups
from lowbit.kernels.quant_embedding import embedding_reference
from lowbit.kernels.quant_linear import QUANT_KINDS
from lowbit.kernels.storage import default_act_block, format_of
from lowbit.kernels.superblock import SuperBlockEmbedding, SuperBlockLinear, SuperBlockPacked, num_super
from lowbit.quant.kquant import kquant_pack
from lowbit.quant.methods import QuantContext, get_method
from lowbit.quant.minmax import minmax_pack
from lowbit.quant.primitives import QuantSpec
from tests.models.llava_tiny import write_tiny_lm
from tests.workflows.test_self_contained import assert_same_bytes

G = torch.Generator().manual_seed(16)


def q41_weight(n: int, k: int) -> torch.Tensor:
    """Weights on a GGUF Q4_1 grid (fp16 step and minimum per 32), like SmolLM2's dequantized layers."""
    d = (torch.rand(n, k // 32, generator=G) * 0.01 + 0.002).to(torch.float16).float()
    m = (-8 * d * (1 + 0.2 * torch.randn(n, k // 32, generator=G))).to(torch.float16).float()
    codes = torch.randint(0, 16, (n, k), generator=G).float()
    codes[:, ::32], codes[:, 1::32] = 0, 15  # Q4_1 puts each block's minimum and maximum on codes 0 and 15
    return codes * expand_groups(d, k, 32) + expand_groups(m, k, 32)


def test_super_blocks_and_stored_bits() -> None:
    packed = kquant_pack(q41_weight(8, 576), QuantSpec(4, 32))  # 18 groups: super-blocks of 8 and 10
    assert isinstance(packed, SuperBlockPacked) and num_super(18) == 2
    assert packed.super_scales.shape == (8, 2) and packed.sub_scales.shape == (8, 14)  # 18 6-bit codes
    assert packed.nbytes == 8 * (288 + 2 * 14 + 2 * 2 * 2)  # codes + sc/mn + fp16 d/dmin: 4.5 bits per weight
    assert format_of(packed).name == "superblock4"
    assert kquant_pack(torch.randn(4, 2048, generator=G), QuantSpec(4, 32)).nbytes * 8 == 4.5 * 4 * 2048  # Q4_K's


def test_super_groups_set_the_stored_width_and_a_module_loads_any() -> None:
    w = q41_weight(6, 1536)  # 48 groups
    packed = kquant_pack(w, QuantSpec(4, 32), super_groups=16)
    assert packed.super_scales.shape == (6, 3) and packed.nbytes * 8 < 4.45 * w.numel()
    state = SuperBlockLinear.from_packed(packed).state_dict()
    empty = SuperBlockLinear(1536, 6, 4, 32, bias=False)  # from the manifest's fields alone: S = 48 // 8
    assert empty.super_scales.shape == (6, 6)
    empty.load_state_dict(state)  # the stored width wins
    assert torch.equal(empty.dequantized_weight(), packed.dequantize())
    with pytest.raises(LowbitError, match="super_groups"):
        get_method("kquant").quantize_weight(w, QuantSpec(4, 32), QuantContext(None, None, kind="linear"),
                                             {"super_groups": 0})
    with pytest.raises(LowbitError, match="super_scales"):
        SuperBlockPacked.build(packed.qweight, packed.sub_scales, packed.sub_mins, torch.zeros(6, 0).half(),
                               torch.zeros(6, 0).half(), 4, 32, (6, 1536))


def test_codes_are_rounded_on_the_stored_grid() -> None:
    w = torch.randn(16, 300, generator=G)  # a short last group, one super-block of 10 groups
    packed = kquant_pack(w, QuantSpec(3, 32))
    s, m = (expand_groups(t.float(), 300, 32) for t in (packed.scales, packed.offsets))
    nearest = torch.round((w - m) / s).clamp(0, 7)  # the grid the format rebuilds, the one the kernels read
    assert torch.equal(packed.codes().float(), nearest)
    assert torch.equal(SuperBlockPacked.build(packed.qweight, packed.sub_scales, packed.sub_mins, packed.super_scales,
                                              packed.super_mins, 3, 32, (16, 300)).dequantize(), packed.dequantize())


def test_q41_weights_lose_a_twentieth_of_a_step() -> None:
    w = q41_weight(64, 1536)
    exact = minmax_pack(w, QuantSpec(4, 32))
    assert torch.equal(exact.dequantize(), w)  # the minmax grid is Q4_1's
    err = (kquant_pack(w, QuantSpec(4, 32)).dequantize() - w).pow(2).mean().sqrt()
    step = exact.scales.float().pow(2).mean().sqrt()
    assert err < 0.07 * step  # SmolLM2's layers: 0.046-0.051 of a step (fresh 4-bit rounding: ~0.29)


def test_kquant_refuses_what_its_grid_cannot_hold() -> None:
    with pytest.raises(LowbitError, match="kquant needs 2 to 8 bits"):
        get_method("kquant").quantize_weight(torch.randn(4, 64), QuantSpec(4, 32, False),
                                             QuantContext(None, None, kind="linear"), {})


def test_table_gather_equals_the_dequantized_reference() -> None:
    emb = torch.nn.Embedding(300, 576, padding_idx=0)
    result = get_method("kquant").quantize_weight(emb.weight.detach(), QuantSpec(5, 64),
                                                  QuantContext(None, None, kind="embedding"), {})
    assert result.kind == "superblock_embedding"
    table = QUANT_KINDS.get(result.kind).build(emb, result.packed, None)
    assert isinstance(table, SuperBlockEmbedding) and table.scales is None
    ids = torch.tensor([[0, 299, 5], [7, 7, 123]])
    assert torch.equal(table(ids), embedding_reference(table, ids))
    assert torch.equal(table(ids), torch.nn.functional.embedding(ids, result.packed.dequantize()))


def test_tiny_lm_saves_smaller_and_reloads_byte_identical(tmp_path: Path) -> None:
    lm = write_tiny_lm(tmp_path / "lm")
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    sizes, logits = {}, {}
    for method in ("minmax", "kquant"):
        model = lowbit.load(str(lm))
        report = lowbit.quantize(model, f"language@embedding=w5g64:{method if method == 'kquant' else 'rtn'},"
                                 f"language=w4g32:{method},floats=fp16", progress=False)
        lowbit.save(model, tmp_path / method, report=report)
        sizes[method] = report.totals()["total"]["packed_bytes"]  # the tiny file is mostly safetensors header
        with torch.no_grad():
            logits[method] = model.language(ids).logits
    layer = model.language.model.layers[0].mlp.down_proj
    assert isinstance(layer, SuperBlockLinear) and layer.scales is None  # steps rebuilt, not stored
    assert sizes["kquant"] < sizes["minmax"]
    table, head = model.language.model.embed_tokens, model.language.lm_head
    assert isinstance(table, SuperBlockEmbedding) and isinstance(head, SuperBlockLinear)
    assert head.qweight is table.qweight and head.super_scales is table.super_scales  # one copy, tied
    loaded = lowbit.load(str(tmp_path / "kquant"))
    table, head = loaded.language.model.embed_tokens, loaded.language.lm_head
    assert head.qweight is table.qweight and head.sub_mins is table.sub_mins  # re-tied on load
    with torch.no_grad():
        assert torch.equal(loaded.language(ids).logits, logits["kquant"])
        layer = loaded.language.model.layers[0].mlp.down_proj
        x = torch.randn(3, layer.in_features, generator=G)
        packed = layer.packed
        reference = torch.nn.functional.linear(x.double(), packed.dequantize().double())
        bound = format_of(packed).error_bound(x, packed, default_act_block(packed))  # int8 activations' bound
        assert torch.all((layer(x).double() - reference).abs() <= bound + 1e-5)  # the offset path, rebuilt grid
        layer.backend = "reference"
        assert torch.allclose(layer(x).double(), reference, atol=1e-5)
    lowbit.save(loaded, tmp_path / "again")
    assert_same_bytes(tmp_path / "kquant", tmp_path / "again")

    manifest = json.loads((tmp_path / "again" / "manifest.json").read_text())  # a kind that cannot hold the module
    manifest["modules"]["language.model.layers.0.mlp.down_proj"]["kind"] = "superblock_embedding"
    (tmp_path / "again" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LowbitError, match="is a Linear in the rebuilt model; its manifest kind 'superblock_embedding'"):
        lowbit.load(str(tmp_path / "again"))
