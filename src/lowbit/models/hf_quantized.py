"""Others' quantized Hugging Face checkpoints on lowbit's kernels: GPTQ, AWQ and compressed-tensors.

``load_quantized_hf(directory)`` reads a ``save_pretrained`` directory whose ``config.json`` carries a
``quantization_config`` of ``quant_method`` ``gptq``, ``awq`` or ``compressed-tensors`` (``pack-quantized``),
builds the transformers model without weights, and puts each quantized linear in a lowbit packed layer holding
the producer's integers and fp16 scales (never a float round trip):

| producer           | tensors                                     | lowbit storage                                 |
|--------------------|---------------------------------------------|------------------------------------------------|
| GPTQ (v1 "gptq")   | qweight int32 [K*b/32, N] (packed along K), | int<b> if every zero is 2^(b-1) (sym=True),     |
|                    | qzeros int32 [G, N*b/32] (stored zero - 1), | else uint<b> with zeros; ``desc_act``: groups  |
|                    | scales fp16 [G, N], g_idx int32 [K]         | made contiguous by an input permutation        |
| AWQ (GEMM)         | qweight int32 [K, N/8] (order 0,2,4,6,1,3,5,7) | uint4 with zeros                            |
|                    | qzeros int32 [G, N/8], scales fp16 [G, N]   |                                                |
| compressed-tensors | weight_packed int32 [N, K*b/32], weight_scale | int<b> (the same bitstream as lowbit's rows) |
|                    | weight_zero_point int32 [N*b/32, G] (asym.) | uint<b> with zeros (packed along N in CT)       |

The published layouts are the contract (GPTQ: AutoGPTQ/GPTQModel's ``QuantLinear`` v1 format; AWQ: AutoAWQ's
``WQLinear_GEMM``); ``tests/workflows/test_hf_import.py`` checks each against a pinned fixture computed by the
layouts' plain formulas.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels.formats import PackedWeight, check_bits, pack_codes, unpack_codes
from lowbit.kernels.quant_linear import QUANT_KINDS, QuantKind, QuantLinear

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's nibble order inside each int32


def unpack_int32(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words holding 32/bits codes each, LSB-first, along ``dim`` -> int16 codes (``dim`` grows)."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    w = words.to(torch.int64) & 0xFFFFFFFF
    codes = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., per] along a new last axis
    codes = codes.movedim(-1, dim + 1) if dim == 0 else codes
    shape = list(words.shape)
    shape[dim] *= per
    return codes.reshape(shape).to(torch.int16)


class PermutedQuantLinear(QuantLinear):
    """A packed linear reading its inputs in a stored order (GPTQ ``desc_act``: groups contiguous after it).
    Saved by ``lowbit.save`` as manifest kind ``permuted_linear`` (its ``input_order`` buffer beside the codes)."""

    manifest_kind = "permuted_linear"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("input_order", torch.zeros(self.in_features, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.index_select(-1, self.input_order))


def _permuted_empty(m: nn.Module, bits: int, group_size: int, symmetric: bool, has_input_scale: bool) -> QuantLinear:
    return PermutedQuantLinear(m.in_features, m.out_features, bits, group_size, symmetric,
                               getattr(m, "bias", None) is not None, has_input_scale)


QUANT_KINDS.register(PermutedQuantLinear.manifest_kind)(QuantKind(
    PermutedQuantLinear.manifest_kind,
    build=lambda m, p, s: PermutedQuantLinear.from_packed(p, getattr(m, "bias", None), s),
    empty=_permuted_empty,
))


def gptq_layer(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
               bits: int, bias: torch.Tensor | None = None, zero_offset: int = 1) -> QuantLinear:
    """A GPTQ layer's tensors as a lowbit packed linear (``zero_offset=1``: the v1 format stores zero - 1)."""
    check_bits(bits)
    if 32 % bits:
        raise LowbitError(f"GPTQ import reads 2/4/8-bit checkpoints; received bits={bits}")
    q = unpack_int32(qweight, bits, 0)  # [K, N]
    k, n = q.shape
    groups = scales.shape[0]
    mask = (1 << bits) - 1
    zeros = (unpack_int32(qzeros, bits, 1)[:, :n] + zero_offset) & mask  # [G, N]
    g_idx = torch.arange(k) // (k // groups) if g_idx is None else g_idx.to(torch.long)
    if g_idx.shape != (k,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
        raise LowbitError(f"GPTQ g_idx must hold {k} group indices in 0..{groups - 1}")
    order = torch.argsort(g_idx, stable=True)
    sizes = torch.bincount(g_idx, minlength=groups)
    if int(sizes.min()) != int(sizes.max()) or groups * int(sizes[0]) != k:
        raise LowbitError(f"GPTQ groups of unequal size ({int(sizes.min())}..{int(sizes.max())} inputs)")
    group_size = int(sizes[0])
    codes = q[order].t().contiguous().to(torch.uint8)  # [N, K] in group order
    symmetric = bool((zeros == 1 << (bits - 1)).all())
    packed = PackedWeight(pack_codes(codes, bits), scales.t().contiguous().to(torch.float16),
                          None if symmetric else zeros.t().contiguous().to(torch.uint8), bits, group_size, (n, k))
    in_order = not bool((order != torch.arange(k)).any())
    cls = QuantLinear if in_order else PermutedQuantLinear
    layer = cls.from_packed(packed, bias=bias)
    if not in_order:
        layer.input_order.copy_(order)
    return layer


def awq_layer(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
              bias: torch.Tensor | None = None) -> QuantLinear:
    """An AutoAWQ GEMM layer's tensors (4-bit) as a lowbit packed linear with zero points."""
    def columns(words: torch.Tensor) -> torch.Tensor:
        raw = unpack_int32(words, 4, 1)  # [., N] in AWQ's interleaved order within each word
        inverse = torch.tensor(AWQ_ORDER).argsort()
        return raw.view(raw.shape[0], -1, 8)[..., inverse].reshape(raw.shape)

    q, zeros = columns(qweight), columns(qzeros)  # [K, N], [G, N]
    k, n = q.shape
    packed = PackedWeight(pack_codes(q.t().contiguous().to(torch.uint8), 4), scales.t().contiguous().half(),
                          zeros.t().contiguous().to(torch.uint8), 4, group_size, (n, k))
    return QuantLinear.from_packed(packed, bias=bias)


def _bitstream(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """int32 words [R, W], each row a dense LSB-first bitstream of ``count`` codes -> uint8 codes [R, count]."""
    raw = words.contiguous().view(torch.uint8)[:, :(count * bits + 7) // 8].contiguous()
    return unpack_codes(raw, bits, count)


def compressed_tensors_layer(weight_packed: torch.Tensor, weight_scale: torch.Tensor, shape: torch.Tensor,
                             bits: int, group_size: int | None, bias: torch.Tensor | None = None,
                             weight_zero_point: torch.Tensor | None = None) -> QuantLinear:
    """A compressed-tensors pack-quantized layer as a lowbit packed linear: the same bitstream. Zero points
    (asymmetric schemes) are packed the same way but along the output rows (``packed_dim=0``): per group, a
    bitstream of N codes offset by 2^(b-1), which is lowbit's unsigned zero point as it stands.

    Scales become fp16, lowbit's stored type: exact for fp16 and for bf16 scales in fp16's range; float32 scales
    are rounded (each weight then within 2^-11 relative of compressed-tensors' own dequantization)."""
    n, k = (int(d) for d in shape.tolist())
    row_bytes = (k * bits + 7) // 8
    qweight = weight_packed.contiguous().view(torch.uint8)[:, :row_bytes].contiguous()
    scales = weight_scale.reshape(n, -1).to(torch.float16)
    zeros = None
    if weight_zero_point is not None:
        zeros = _bitstream(weight_zero_point.t(), bits, n).t().contiguous()  # [G, N] -> [N, G]
        if zeros.shape != scales.shape:
            raise ValueError(f"weight_zero_point holds {tuple(zeros.shape)} zero points for "
                             f"{tuple(scales.shape)} scales")
    packed = PackedWeight(qweight, scales, zeros, bits, group_size or k, (n, k))
    return QuantLinear.from_packed(packed, bias=bias)


def _replace(model: nn.Module, path: str, layer: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)


def load_quantized_hf(directory: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """(transformers model with lowbit packed layers, report) from a GPTQ / AWQ / compressed-tensors directory."""
    import accelerate
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    raw = json.loads((directory / "config.json").read_text())
    qc = raw.pop("quantization_config", None)
    method = (qc or {}).get("quant_method")
    if method not in ("gptq", "awq", "compressed-tensors"):
        raise LowbitError(f"{directory}: quantization_config quant_method {method!r}; lowbit imports gptq, awq and "
                          "compressed-tensors (pack-quantized)")
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise LowbitError(f"{directory}: no *.safetensors weights (pickled .bin files are not read)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    config = AutoConfig.for_model(**raw)
    with accelerate.init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    packed: list[str] = []
    for path, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        bias = state.pop(f"{path}.bias", None)
        try:
            if method == "gptq" and f"{path}.qweight" in state:
                layer = gptq_layer(state.pop(f"{path}.qweight"), state.pop(f"{path}.qzeros"),
                                   state.pop(f"{path}.scales"), state.pop(f"{path}.g_idx", None), int(qc["bits"]),
                                   bias, zero_offset=0 if qc.get("checkpoint_format") == "gptq_v2" else 1)
            elif method == "awq" and f"{path}.qweight" in state:
                layer = awq_layer(state.pop(f"{path}.qweight"), state.pop(f"{path}.qzeros"),
                                  state.pop(f"{path}.scales"), int(qc["group_size"]), bias)
            elif method == "compressed-tensors" and f"{path}.weight_packed" in state:
                scheme = next(g["weights"] for g in qc["config_groups"].values()
                              if path in g["targets"] or "Linear" in g["targets"])
                zero_point = None if scheme.get("symmetric", True) else state.pop(f"{path}.weight_zero_point")
                layer = compressed_tensors_layer(state.pop(f"{path}.weight_packed"), state.pop(f"{path}.weight_scale"),
                                                 state.pop(f"{path}.weight_shape"), int(scheme["num_bits"]),
                                                 scheme.get("group_size"), bias, zero_point)
            else:
                if bias is not None:
                    state[f"{path}.bias"] = bias
                continue
        except KeyError as missing:
            raise LowbitError(f"{directory}: layer {path} lacks tensor {missing}") from None
        except (RuntimeError, ValueError) as exc:
            raise LowbitError(f"{directory}: layer {path} has inconsistent tensors ({exc})") from None
        _replace(model, path, layer)
        packed.append(path)
    missing = model.load_state_dict(state, strict=False, assign=True)
    left = [k for k in missing.missing_keys if not k.endswith(("qweight", "scales", "zeros", "input_order", "bias"))]
    if config.tie_word_embeddings and "lm_head.weight" in left:
        model.tie_weights()
        left.remove("lm_head.weight")
    if left or missing.unexpected_keys:
        raise LowbitError(f"{directory}: tensors missing {left[:3]} or unexpected {missing.unexpected_keys[:3]}")
    return model.eval(), {"method": method, "packed_layers": len(packed)}
