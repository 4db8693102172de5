"""``QuantEmbedding``: a token / position embedding table stored packed, dequantized only where it is read.

An embedding table is a weight [V, D] whose rows are looked up, never multiplied whole: a 49152 x 576 table
(SmolLM2) is a fifth of the model, so storing it at 8/6/4 bits is where the whole-file bytes go. The lookup
gathers the packed bytes, scales and zero points of the requested rows only and dequantizes those
(``PackedWeight.dequantize`` on a [M, D] slice): the table is never expanded to float. The packed buffers
are the linear format's (docs/PACKED_FORMAT.md) with N = V rows and K = D columns, grouped along D, so a
tied LM head (``QuantLinear`` over the same [V, D] weight) can hold the very same tensors.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels.formats import PackedWeight
from lowbit.kernels.quant_linear import (
    QUANT_KINDS,
    QuantKind,
    _copy_packed,
    _packed_shapes,
    _PackedMixin,
    _register_packed,
    refuse_onnx_trace,
)

# manifest kinds whose module is a lookup table (a ``QuantEmbedding``): what a recipe's embedding rule may produce
EMBEDDING_KINDS: set[str] = {"embedding"}


class QuantEmbedding(_PackedMixin, nn.Module):
    """``nn.Embedding`` with packed rows.

    Buffers: ``qweight`` uint8 [V, ceil(D*bits/8)], ``scales`` float16 [V, G], ``zeros`` uint8 [V, G]
    (asymmetric only), G = ceil(D / group_size). ``forward(ids)`` returns float32 [*ids.shape, D]: for each
    id, ``(q - z) * s`` of its row. ``padding_idx`` is kept for code that reads it (its row is whatever was
    quantized, normally zeros, which every grid represents exactly).
    """

    HEAD_KIND = "linear"  # the manifest kind of an output head tied to this table (it holds the same buffers)

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int, symmetric: bool = True,
                 padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = int(num_embeddings), int(embedding_dim), padding_idx
        shape = (self.num_embeddings, self.embedding_dim)
        self._init_meta(shape, bits, group_size, symmetric)
        _register_packed(self, _packed_shapes(shape, bits, group_size, symmetric, has_input_scale=False))

    @classmethod
    def from_packed(cls, packed: PackedWeight, padding_idx: int | None = None) -> QuantEmbedding:
        """A table holding ``packed`` (copied); ``packed.shape`` is [V, D]."""
        table = cls(packed.out_features, packed.in_features, packed.bits, packed.group_size, packed.symmetric,
                    padding_idx)
        with torch.no_grad():
            _copy_packed(table, packed, None)
        return table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        refuse_onnx_trace(self)
        if ids.dtype not in (torch.int64, torch.int32):
            raise LowbitError(f"QuantEmbedding expects integer ids; received {ids.dtype}")
        flat = ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise LowbitError(f"embedding ids must be in [0, {self.num_embeddings}); received "
                              f"[{int(flat.min())}, {int(flat.max())}]")
        return self._rows(flat).dequantize().reshape(*ids.shape, self.embedding_dim)

    def _rows(self, flat: torch.Tensor) -> PackedWeight:
        """The packed rows ``flat`` [M] of the table (gathered, never the whole table)."""
        zeros = self.zeros
        return PackedWeight(self.qweight[flat], self.scales[flat], None if zeros is None else zeros[flat],
                            self.bits, self.group_size, (flat.numel(), self.embedding_dim))

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._drop_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self._quant_repr()}"


def _check_plain(module: nn.Module) -> None:
    """Refuse embedding options a packed lookup would silently drop (one line, what is accepted)."""
    if getattr(module, "max_norm", None) is not None or getattr(module, "sparse", False):
        raise LowbitError(f"{type(module).__name__} with max_norm or sparse gradients cannot be packed; accepted: "
                          "a plain nn.Embedding (keep this one float with a skip rule)")


def _build(module: nn.Module, packed: PackedWeight, input_scale: torch.Tensor | None) -> QuantEmbedding:
    _check_plain(module)
    if input_scale is not None:
        raise LowbitError("an embedding table has no input to scale; AWQ-style input scales do not apply to it")
    return QuantEmbedding.from_packed(packed, getattr(module, "padding_idx", None))


def _empty(module: nn.Module, bits: int, group_size: int, symmetric: bool, has_input_scale: bool) -> QuantEmbedding:
    return QuantEmbedding(module.num_embeddings, module.embedding_dim, bits, group_size, symmetric,
                          getattr(module, "padding_idx", None))


QUANT_KINDS.register("embedding")(QuantKind("embedding", build=_build, empty=_empty))


def embedding_reference(table: QuantEmbedding, ids: torch.Tensor) -> torch.Tensor:
    """The oracle: the whole table dequantized, then ``F.embedding`` (tests compare the row gather with it)."""
    return F.embedding(ids, table.packed.dequantize())
