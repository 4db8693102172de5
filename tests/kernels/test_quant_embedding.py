"""``QuantEmbedding``: the row gather equals the dequantized table, reads only the rows asked for, and
round-trips through the state dict."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels.quant_embedding import QuantEmbedding, embedding_reference
from lowbit.kernels.quant_linear import QUANT_KINDS
from lowbit.quant.primitives import QuantSpec, to_packed


def _table(bits: int, group_size: int, symmetric: bool, v: int = 300, d: int = 96) -> tuple[nn.Embedding,
                                                                                          QuantEmbedding]:
    torch.manual_seed(bits * 10 + group_size)
    emb = nn.Embedding(v, d, padding_idx=0)
    packed = to_packed(emb.weight.detach(), QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric))
    return emb, QUANT_KINDS.get("embedding").build(emb, packed, None)


@pytest.mark.parametrize("bits, group_size, symmetric", [(8, 32, True), (6, 32, True), (6, 64, False),
                                                         (5, 64, True), (5, 32, False),
                                                         (4, 32, True), (4, 64, False),
                                                         (3, 96, True), (2, 32, False)])
def test_gather_equals_dequantized_reference(bits, group_size, symmetric):
    emb, table = _table(bits, group_size, symmetric)
    ids = torch.randint(0, 300, (3, 7))
    out = table(ids)
    assert out.shape == (3, 7, 96) and out.dtype == torch.float32
    assert torch.equal(out, embedding_reference(table, ids))  # bit-identical: same dequantization per row
    err = (out - emb(ids)).abs().max().item()
    step = table.scales.float().abs().max().item()
    assert err <= step + 1e-6  # within one grid step (symmetric grids clip the top by up to one step)


def test_only_requested_rows_are_dequantized(monkeypatch):
    _, table = _table(4, 32, True)
    seen = []
    original = QuantEmbedding.forward.__globals__["PackedWeight"].dequantize

    def spy(self):
        seen.append(self.shape)
        return original(self)

    monkeypatch.setattr(QuantEmbedding.forward.__globals__["PackedWeight"], "dequantize", spy)
    table(torch.tensor([[5, 6, 7]]))
    assert seen == [(3, 96)]  # three rows, never the 300-row table


def test_state_dict_round_trip_and_bad_ids():
    _, table = _table(4, 32, False)
    empty = QUANT_KINDS.get("embedding").empty(nn.Embedding(300, 96), 4, 32, False, False)
    empty.load_state_dict(table.state_dict(), strict=True)
    ids = torch.arange(300)
    assert torch.equal(empty(ids), table(ids))
    assert sum(t.nbytes for t in table.state_dict().values()) < 300 * 96 * 4 / 6  # packed, not float
    with pytest.raises(LowbitError, match=r"ids must be in \[0, 300\)"):
        table(torch.tensor([300]))
    with pytest.raises(LowbitError, match="integer ids"):
        table(torch.zeros(2))


def test_embedding_options_a_lookup_would_drop_are_refused():
    emb = nn.Embedding(10, 32, max_norm=1.0)
    packed = to_packed(emb.weight.detach(), QuantSpec(bits=8, group_size=32, symmetric=True))
    with pytest.raises(LowbitError, match="max_norm"):
        QUANT_KINDS.get("embedding").build(emb, packed, None)
