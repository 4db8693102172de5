"""GGUF blocks packed into lowbit layers without a float round trip: a GGUF model runs on lowbit's kernels.

``pack_from_gguf(lm, path)`` takes the transformers model built from a GGUF file (its float weights, as
transformers' GGUF loader dequantizes them) and replaces every linear and the embedding table whose GGUF type
lowbit stores exactly with a packed module holding the file's own codes and fp16 steps — the inverse of
``lowbit.workflows.export.gguf``:

| GGUF  | lowbit storage                         |
|-------|----------------------------------------|
| Q8_0  | ``int8`` symmetric, group 32           |
| Q4_0  | ``int4`` symmetric, group 32           |
| Q4_1  | ``offset4`` (``minmax``), group 32     |
| TQ2_0 | ``ternary``, group 256                 |

Other types (K-quants such as Q4_K / Q6_K, F16, ...) keep transformers' float weights; the report lists them
(a K-quant's super-block scales have no lowbit layout: they are dequantized, with a warning).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels.formats import PackedWeight, pack_codes
from lowbit.kernels.fusion import fuse_shared_inputs
from lowbit.kernels.offsets import OffsetPacked
from lowbit.kernels.quant_embedding import QuantEmbedding
from lowbit.kernels.quant_linear import QUANT_KINDS
from lowbit.kernels.storage import find_format

QK = 32  # weights per block of Q8_0 / Q4_0 / Q4_1
QK_K = 256  # weights per block of TQ2_0
# transformers model_type -> (GGUF architecture, whether q/k rows are permuted to llama.cpp's RoPE pairing);
# shared with the GGUF export (lowbit.workflows.export.gguf)
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True),
    "mistral": ("llama", True),  # llama.cpp runs Mistral as its llama architecture
    "qwen2": ("qwen2", False),  # NeoX-style RoPE in llama.cpp too
}
PACKED_TYPES = ("Q8_0", "Q4_0", "Q4_1", "TQ2_0")  # the GGUF types lowbit stores exactly
ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's per-frequency divisors of RoPE's angles (llama3 scaling)
ROPE_KEY = "lowbit.rope_parameters"  # transformers' rope parameters as JSON (llama.cpp ignores the key)
LLAMA3_CONTEXT = 8192  # original_max_position_embeddings llama.cpp's converter assumes (every Llama 3.x uses it)


# --- RoPE scaling: transformers' rope_parameters <-> GGUF (shared with the export) --------------------------
def rope_parameters(config: Any) -> dict[str, Any]:
    """The config's RoPE parameters (transformers 5 ``rope_parameters``, or the older ``rope_scaling`` +
    ``rope_theta``) with ``rope_type`` and ``rope_theta`` always present."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope["rope_type"] = rope.get("rope_type", rope.pop("type", "default"))
    rope.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    return rope


def _default_inv_freq(config: Any, theta: float) -> torch.Tensor:
    """RoPE's unscaled inverse frequencies, computed as transformers computes them (float32)."""
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def rope_frequency_factors(config: Any) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` (float32 [head_dim / 2]) for the config's llama3 scaling: each frequency's
    divisor, the unscaled inverse frequency over transformers' own scaled one (so both runtimes rotate by the
    same angles; its converter computes the same numbers from the same formula)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = rope_parameters(config)
    scaled, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config)
    return (_default_inv_freq(config, float(rope["rope_theta"])) / scaled.float()).numpy().astype(np.float32)


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _llama3_from_factors(config: Any, factors: np.ndarray) -> dict[str, Any]:
    """llama3 parameters reproducing a ``rope_freqs`` tensor written by llama.cpp's converter (which keeps only
    the factors): ``factor`` is the largest; the smoothed band is linear in 1 / wavelength, which with
    ``low_freq_factor`` 1 gives ``high_freq_factor`` and the original context. Checked by recomputing them."""
    factor = float(factors.max())
    inv = _default_inv_freq(config, float(rope_parameters(config)["rope_theta"])).double().numpy()
    band = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    params: dict[str, Any] = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": LLAMA3_CONTEXT}
    if band.sum() >= 2:  # smooth = (L / wavelen - lf) / (hf - lf) = a / wavelen + b
        smooth = (1 / factors[band].astype(np.float64) - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(inv[band] / (2 * np.pi), smooth, 1)
        params["high_freq_factor"] = round(1 - 1 / b, 4)
        params["original_max_position_embeddings"] = int(round(-a / b))
    return params


def read_rope_scaling(lm: nn.Module, path: str | Path) -> dict[str, Any] | None:
    """Put a GGUF file's RoPE scaling, which transformers' GGUF loader does not read for these architectures,
    into ``lm``'s config and rotary embeddings: lowbit's own key (the exact transformers parameters), else
    llama.cpp's ``rope.scaling.type`` linear + factor, else a ``rope_freqs`` tensor (llama3, its parameters
    recovered and checked against the tensor). Returns the parameters applied (None: plain RoPE)."""
    import json

    import gguf

    config = lm.config
    arch = ARCHITECTURES.get(config.model_type, (config.model_type, False))[0]
    reader = gguf.GGUFReader(str(path))
    theta = float(rope_parameters(config)["rope_theta"])
    raw = _field(reader, ROPE_KEY)
    scaling_type = _field(reader, f"{arch}.rope.scaling.type")
    freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if raw is not None:
        params = dict(json.loads(raw))
    elif scaling_type == "linear":
        params = {"rope_type": "linear", "factor": float(_field(reader, f"{arch}.rope.scaling.factor"))}
    elif scaling_type not in (None, "none"):
        raise LowbitError(f"{str(path)!r}: RoPE scaling {scaling_type!r} is not read; accepted: linear, and "
                          "llama3 (a rope_freqs tensor)")
    elif freqs is not None:
        factors = np.asarray(freqs.data, dtype=np.float32).reshape(-1)
        if np.allclose(factors, 1.0):
            return None
        params = _llama3_from_factors(config, factors)
    else:
        return None
    params["rope_theta"] = theta
    config.rope_parameters = params
    if freqs is not None and not np.allclose(rope_frequency_factors(config), np.asarray(freqs.data).reshape(-1),
                                             rtol=1e-5, atol=0):
        raise LowbitError(f"{str(path)!r}: its {ROPE_FREQS} tensor is not a llama3 RoPE scaling lowbit can "
                          "reproduce; accepted: the factors of llama.cpp's converter or of lowbit's export")
    for name, module in list(lm.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):  # recomputes inv_freq from the new parameters
            parent, _, child = name.rpartition(".")
            setattr(lm.get_submodule(parent) if parent else lm, child, type(module)(config=config))
    return params


def rope_row_order(rows: int, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order: within each head, rows (0, d/2, 1, d/2 + 1, ...) become pairs side by side
    (its converter's permutation for the llama architecture); ``w[order]`` is the GGUF tensor."""
    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


def _fp16(raw: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16).reshape(raw.shape[:-1]).copy())


def _low_high(qs: np.ndarray) -> np.ndarray:
    """[N, nb, 16] bytes -> [N, nb, 32] 4-bit codes: low nibbles are weights 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def packed_from_blocks(blocks: np.ndarray, gguf_type: str, k: int) -> PackedWeight:
    """GGUF block bytes [N, K / block * bytes] -> the lowbit ``PackedWeight`` holding the same numbers."""
    import gguf

    n = blocks.shape[0]
    block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[gguf_type]]
    b = blocks.reshape(n, k // block, block_bytes)
    if gguf_type == "Q8_0":
        codes, steps, bits = (b[..., 2:].view(np.int8).astype(np.int16) + 128), _fp16(b[..., :2]), 8
    elif gguf_type == "Q4_0":
        codes, steps, bits = _low_high(b[..., 2:]), _fp16(b[..., :2]), 4
    elif gguf_type == "Q4_1":
        codes = _low_high(b[..., 4:])
        flat = torch.from_numpy(codes.reshape(n, k).astype(np.uint8))
        return OffsetPacked(pack_codes(flat, 4), _fp16(b[..., :2]), None, 4, QK, (n, k), _fp16(b[..., 2:4]))
    elif gguf_type == "TQ2_0":
        q = b[..., :64].reshape(n, -1, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 1, 4, 1)
        codes, steps, bits = (q & 0x03).reshape(n, -1, 256) + 1, _fp16(b[..., 64:66]), 2  # q in 0..2 -> 1..3
    else:
        raise LowbitError(f"GGUF type {gguf_type} has no lowbit layout")
    flat = torch.from_numpy(codes.reshape(n, k).astype(np.uint8))
    return PackedWeight(pack_codes(flat, bits), steps, None, bits, block, (n, k))


def _unpermute(packed: PackedWeight, n_head: int) -> PackedWeight:
    """Undo llama.cpp's q/k row order (rows are whole blocks: every tensor is permuted alike)."""
    rows = packed.out_features
    order = torch.from_numpy(rope_row_order(rows, n_head))
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(rows)
    fields = {name: getattr(packed, name) for name in ("qweight", "scales", "zeros", "offsets")
              if getattr(packed, name, None) is not None}
    moved = {name: t[inverse].contiguous() for name, t in fields.items()}
    if isinstance(packed, OffsetPacked):
        return OffsetPacked(moved["qweight"], moved["scales"], None, packed.bits, packed.group_size, packed.shape,
                            moved["offsets"])
    return PackedWeight(moved["qweight"], moved["scales"], None, packed.bits, packed.group_size, packed.shape)


def _module_for(packed: PackedWeight, float_module: nn.Module) -> nn.Module:
    if isinstance(float_module, nn.Embedding):
        if isinstance(packed, OffsetPacked):
            raise LowbitError("offset tables are not stored packed")
        return QuantEmbedding.from_packed(packed, float_module.padding_idx)
    layout = "offset" if isinstance(packed, OffsetPacked) else "codes"
    row = find_format(layout, packed.bits, True)
    bias = getattr(float_module, "bias", None)
    return row.module.from_packed(packed, bias=bias)


def pack_from_gguf(lm: nn.Module, path: str | Path) -> dict[str, Any]:
    """Replace ``lm``'s float layers by packed ones holding the GGUF file's codes; returns what was packed."""
    import gguf

    config = lm.config
    if config.model_type not in ARCHITECTURES:
        raise LowbitError(f"GGUF import packs Llama-family models ({', '.join(sorted(ARCHITECTURES))}); "
                          f"received model_type {config.model_type!r}")
    arch, permuted = ARCHITECTURES[config.model_type]
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    packed_layers: dict[str, str] = {}
    kept: dict[str, str] = {}
    for module_path, module in list(lm.named_modules()):
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        base = name_map.get_name(module_path)
        t = tensors.get(f"{base}.weight") if base else None
        if t is None:  # a tied head: no tensor of its own in the file
            continue
        gguf_type = t.tensor_type.name
        if gguf_type not in PACKED_TYPES:
            kept[module_path] = gguf_type
            continue
        k = int(module.weight.shape[1])
        packed = packed_from_blocks(np.asarray(t.data).reshape(int(module.weight.shape[0]), -1), gguf_type, k)
        leaf = module_path.rsplit(".", 1)[-1]
        if permuted and leaf in ("q_proj", "k_proj"):
            packed = _unpermute(packed, config.num_attention_heads if leaf == "q_proj"
                                else config.num_key_value_heads)
        try:
            new = _module_for(packed, module)
        except LowbitError:
            kept[module_path] = gguf_type
            continue
        parent, _, child = module_path.rpartition(".")
        setattr(lm.get_submodule(parent) if parent else lm, child, new)
        packed_layers[module_path] = gguf_type
    head, table = lm.get_output_embeddings(), lm.get_input_embeddings()
    if isinstance(head, nn.Linear) and isinstance(table, QuantEmbedding) and "output.weight" not in tensors:
        lm.set_output_embeddings(_tied_head(head, table))
        packed_layers["lm_head (tied)"] = packed_layers.get("model.embed_tokens", "")
    fuse_shared_inputs(lm)  # q/k/v and gate/up share one kernel call, as after quantize_
    k_quants = sorted({v for v in kept.values() if v not in ("F32", "F16", "BF16")})
    if k_quants:
        warnings.warn(f"GGUF types {', '.join(k_quants)} have no lowbit layout: those layers run on float weights "
                      "dequantized by transformers", UserWarning, stacklevel=2)
    return {"packed": packed_layers, "float": kept}


def _tied_head(float_head: nn.Module, table: QuantEmbedding) -> nn.Module:
    """The output head of a tied model as a packed linear holding the table's own tensors (stored once)."""
    head = QUANT_KINDS.get("linear").empty(float_head, table.bits, table.group_size, table.symmetric, False)
    for name in ("qweight", "scales", "zeros"):
        setattr(head, name, getattr(table, name))
    return head
