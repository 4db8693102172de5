"""GGUF export of Llama-family language models, for llama.cpp (``llama-cli``, ``llama-server``).

lowbit grids that exist in GGUF are written exactly: the packed codes and fp16 steps are re-laid into ggml's
blocks of 32 (256 for ternary) without touching a number. The exact pairs (the storage table's ``gguf`` column):

| lowbit storage (groups: multiples of the block) | GGUF  | values                                       |
|-------------------------------------------------|-------|----------------------------------------------|
| ``int8`` symmetric                              | Q8_0  | d * q, q = code - 128                        |
| ``int4`` symmetric                              | Q4_0  | d * (q - 8)                                  |
| ``int3`` / ``int2`` / ``binary`` (widened)      | Q4_0  | d = s/2, s/4, s; q = 2c, 4c, 2c + 7          |
| ``offset2..4`` (``minmax``)                     | Q4_1  | d * q + m                                    |
| ``ternary`` / ``ternary-base3``                 | TQ2_0 | d * (q - 1), q in 0..2 (group 256, else Q4_0) |
| float tensors                                   | F16 / F32, as stored                                 |

A group of 64 or 128 writes each of its 32-blocks with the group's step, which is the same number. A widened
grid keeps every value (the fp16 step halved or quartered is checked to stay exact) but takes GGUF's 4.5 bits
per weight. Any other layer (zero points, PB-LLM, 8-bit minmax, a group that is not a multiple of the block)
is refused with one line naming the layer and the nearest exact recipe, unless ``requantize=True``: then it is
re-quantized from lowbit's dequantized weight to Q8_0 (8-bit) or Q4_0 (narrower), and the added error is
measured and reported.

llama.cpp's ``llama`` architecture applies RoPE to interleaved pairs where transformers rotates halves, so the
rows of ``q``/``k`` are permuted as llama.cpp's own converter does (rows are independent blocks: exact).
RoPE scaling in the config (``rope_parameters`` / ``rope_scaling``) is written as llama.cpp's converter writes
it: ``linear`` as ``rope.scaling.type`` + ``rope.scaling.factor``, ``llama3`` as the ``rope_freqs`` tensor of
per-frequency divisors; transformers' parameters also go under ``lowbit.rope_parameters`` for lowbit's import
(``models.gguf_import.read_rope_scaling``). Other scalings (yarn, dynamic, longrope) are refused in one line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels.formats import PackedWeight
from lowbit.kernels.quant_linear import is_quantized
from lowbit.kernels.storage import format_of
from lowbit.models.gguf_import import (
    ARCHITECTURES,
    QK,
    QK_K,
    ROPE_FREQS,
    ROPE_KEY,
    rope_frequency_factors,
    rope_parameters,
    rope_row_order,
)
from lowbit.workflows.export import ExportFormat, register_export

# storage row name -> GGUF type holding its values exactly (narrower symmetric grids widen into Q4_0)
EXACT_TYPES: dict[str, str] = {"int8": "Q8_0", "int4": "Q4_0", "int3": "Q4_0", "int2": "Q4_0", "binary": "Q4_0",
                               "offset4": "Q4_1", "offset3": "Q4_1", "offset2": "Q4_1", "ternary": "TQ2_0",
                               "ternary-base3": "TQ2_0"}
ROPE_SCALINGS = ("linear", "llama3")  # transformers rope types written (linear: metadata; llama3: rope_freqs)
# tokenizer pre-splitting rules llama.cpp knows, by what a model's name says (llama.cpp identifies them by a
# hash of tokenized text; lowbit names the ones it can recognise and says so otherwise)
PRE_TOKENIZERS: tuple[tuple[str, str], ...] = (("smollm", "smollm"), ("qwen2", "qwen2"), ("llama-3", "llama-bpe"),
                                                ("llama3", "llama-bpe"))


@dataclass
class _Tensor:
    name: str  # GGUF name
    data: np.ndarray  # float32/float16 values, or uint8 block bytes [rows, bytes per row]
    gguf_type: str  # "F32", "F16", "Q8_0", ...
    source: str  # lowbit module path
    exact: bool = True
    added_error: float = 0.0  # relative RMS error added by re-quantization


# --- where the language model is -----------------------------------------------------------------------------
def language_model(model: nn.Module) -> tuple[nn.Module, Any]:
    """(transformers causal LM, tokenizer) inside ``model``: a llava's ``language``, or the model itself."""
    lm = getattr(model, "language", model)
    tokenizer = getattr(model, "tokenizer", None)
    config = getattr(lm, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        what = f"model_type {model_type!r}" if model_type else type(model).__name__
        raise LowbitError(f"GGUF export takes a Llama-family language model (or a llava holding one); {what} is "
                          f"not one of: {', '.join(sorted(ARCHITECTURES))}")
    if tokenizer is None:
        raise LowbitError("GGUF export needs the model's tokenizer (a llava or a causal LM loaded by lowbit has one)")
    return lm, tokenizer


# --- blocks ------------------------------------------------------------------------------------------------
def _per_block(values: torch.Tensor, group_size: int, k: int, block: int) -> np.ndarray:
    """[N, G] per-group values -> [N, K / block] per-block values (a group of several blocks repeats)."""
    starts = torch.arange(0, k, block) // group_size
    return values[:, starts].numpy()


def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values.astype(np.float16)).view(np.uint8).reshape(*values.shape, 2)


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """[N, nb, 32] 4-bit codes -> [N, nb, 16] bytes: q[j] in the low nibble, q[j + 16] in the high one."""
    return (codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8)


def _ternary_bytes(codes: np.ndarray) -> np.ndarray:
    """[N, nb, 256] codes in 0..2 -> [N, nb, 64] bytes: byte c*32 + m holds q[c*128 + l*32 + m] at bits 2l."""
    n, nb, _ = codes.shape
    q = codes.reshape(n, nb, 2, 4, 32).astype(np.uint8) << (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 1, 4, 1)
    return np.bitwise_or.reduce(q, axis=3).reshape(n, nb, 64)


def _q4_0_codes(codes: np.ndarray, steps: torch.Tensor, bits: int) -> tuple[np.ndarray, torch.Tensor]:
    """A symmetric ``bits``-wide grid as Q4_0 codes and steps holding the same values: (c - z) * s = (q - 8) * d."""
    if bits == 4:
        return codes, steps
    if bits == 1:  # (c - 1/2) * 2s = (2c + 7 - 8) * s
        return 2 * codes + 7, steps
    factor = 1 << (4 - bits)  # (c - 2^(b-1)) * s = (factor * c - 8) * (s / factor)
    return factor * codes, steps / factor


def block_bytes(packed: PackedWeight, gguf_type: str) -> np.ndarray:
    """The GGUF blocks [N, K / block * bytes per block] holding exactly the numbers of ``packed``."""
    n, k = packed.out_features, packed.in_features
    codes = packed.codes().numpy().astype(np.int16)
    steps = packed.scales.float()  # fp16 values: exact in float32 and back
    gs = packed.group_size
    if gguf_type == "Q4_0":
        codes, steps = _q4_0_codes(codes, steps, packed.bits)
    block = QK_K if gguf_type == "TQ2_0" else QK
    nb = k // block
    step_bytes = _fp16_bytes(_per_block(steps, gs, k, block))
    blocks = codes.reshape(n, nb, block)
    if gguf_type == "Q8_0":
        parts = [step_bytes, (blocks - 128).astype(np.int8).view(np.uint8)]
    elif gguf_type == "Q4_0":
        parts = [step_bytes, _nibbles(blocks)]
    elif gguf_type == "Q4_1":
        minima = _fp16_bytes(_per_block(packed.offsets.float(), gs, k, block))  # type: ignore[attr-defined]
        parts = [step_bytes, minima, _nibbles(blocks)]
    elif gguf_type == "TQ2_0":
        parts = [_ternary_bytes(blocks - 1), step_bytes]
    else:
        raise LowbitError(f"no exact block layout for GGUF type {gguf_type}")
    return np.concatenate(parts, axis=-1).reshape(n, -1)


def _exact_type(packed: PackedWeight) -> tuple[str | None, str]:
    """(GGUF type, '') when ``packed`` maps exactly, else (None, why not)."""
    row = format_of(packed)
    gguf_type = EXACT_TYPES.get(row.name)
    if gguf_type is None:
        return None, f"{row.name} storage has no GGUF type"
    k, gs = packed.in_features, packed.group_size
    if gguf_type == "TQ2_0" and (k % QK_K or (gs % QK_K and gs < k)):
        gguf_type = "Q4_0"  # ternary groups smaller than 256: the widened 2-bit grid
    block = QK_K if gguf_type == "TQ2_0" else QK
    if k % block or (gs % block and gs < k):
        return None, f"{row.name} at group {gs} over {k} inputs does not fill GGUF's {block}-weight blocks"
    if gguf_type == "Q4_0" and packed.bits < 4:
        _, steps = _q4_0_codes(np.zeros(0), packed.scales.float(), packed.bits)
        if not torch.equal(steps.half().float(), steps):  # a step so small that s / 4 leaves fp16's normal range
            return None, f"{row.name} steps of {gs}-groups do not stay exact in fp16 when widened to Q4_0"
    return gguf_type, ""


def _requantized(name: str, weight: torch.Tensor, bits: int, source: str) -> _Tensor:
    from gguf import GGMLQuantizationType, quants

    gguf_type = "Q8_0" if bits >= 8 else "Q4_0"
    w = weight.float().numpy()
    if w.shape[1] % QK:
        raise LowbitError(f"layer {source}: {w.shape[1]} inputs are not a multiple of {QK}; GGUF cannot hold it "
                          "quantized")
    data = quants.quantize(w, GGMLQuantizationType[gguf_type])
    back = quants.dequantize(data, GGMLQuantizationType[gguf_type])
    err = float(np.linalg.norm(back - w) / max(np.linalg.norm(w), 1e-30))
    return _Tensor(name, data, gguf_type, source, exact=False, added_error=err)


def _weight_tensor(name: str, module: nn.Module, source: str, requantize: bool) -> _Tensor:
    if is_quantized(module):
        packed = module.packed  # type: ignore[attr-defined]
        gguf_type, why = _exact_type(packed)
        if gguf_type is not None:
            return _Tensor(name, block_bytes(packed, gguf_type), gguf_type, source)
        if not requantize:
            nearest = "w8g32 (Q8_0)" if packed.bits == 8 else "w4g32 (Q4_0) or w4g32:minmax (Q4_1)"
            raise LowbitError(f"layer {source}: {why}; the nearest exact recipe is {nearest}, or pass --requantize "
                              "to re-quantize it into GGUF with the added error reported")
        return _requantized(name, packed.dequantize(), packed.bits, source)
    weight = module.weight.detach()
    dtype = np.float16 if weight.dtype == torch.float16 else np.float32
    return _Tensor(name, weight.float().numpy().astype(dtype), "F16" if dtype == np.float16 else "F32", source)


def _permute_rows(t: _Tensor, n_head: int) -> None:
    """Rows in llama.cpp's q/k order (``rope_row_order``; whole rows move, so blocks stay exact)."""
    t.data = np.ascontiguousarray(t.data[rope_row_order(t.data.shape[0], n_head)])


# --- the model's tensors -----------------------------------------------------------------------------------
def _same_storage(a: nn.Module, b: nn.Module) -> bool:
    def ptr(m: nn.Module) -> int:
        held = m.qweight if is_quantized(m) else m.weight  # type: ignore[attr-defined]
        return held.data_ptr()

    return ptr(a) == ptr(b)


def collect_tensors(lm: nn.Module, requantize: bool = False) -> list[_Tensor]:
    """Every tensor of the GGUF file in llama.cpp's names and types (q/k rows permuted where the arch needs it)."""
    import gguf

    config = lm.config
    arch, permute = ARCHITECTURES[config.model_type]
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    embed, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    tied = head is not None and _same_storage(embed, head)
    out: list[_Tensor] = []
    for path, module in lm.named_modules():
        own = dict(module.named_parameters(recurse=False))
        quantized = is_quantized(module)
        if not own and not quantized:
            continue
        if module is head and tied:
            continue
        gguf_base = name_map.get_name(path)
        if gguf_base is None:
            raise LowbitError(f"GGUF export: no llama.cpp tensor name for {path!r} ({type(module).__name__})")
        if quantized or isinstance(module, (nn.Linear, nn.Embedding)):
            t = _weight_tensor(f"{gguf_base}.weight", module, path, requantize)
        else:  # norms: llama.cpp reads them as F32
            t = _Tensor(f"{gguf_base}.weight", module.weight.detach().float().numpy(), "F32", path)
        leaf = path.rsplit(".", 1)[-1]
        if permute and leaf in ("q_proj", "k_proj"):
            heads = config.num_attention_heads if leaf == "q_proj" else config.num_key_value_heads
            _permute_rows(t, heads)
        out.append(t)
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            b = _Tensor(f"{gguf_base}.bias", bias.detach().float().numpy(), "F32", path)
            if permute and leaf in ("q_proj", "k_proj"):
                raise LowbitError(f"GGUF export: {path} has a bias, which llama.cpp's llama architecture lacks")
            out.append(b)
    return out


# --- metadata ----------------------------------------------------------------------------------------------
def _pre_tokenizer(lm: nn.Module, tokenizer: Any) -> str:
    names = " ".join(str(x).lower() for x in (getattr(tokenizer, "name_or_path", ""),
                                              getattr(lm.config, "_name_or_path", ""),
                                              getattr(lm.config, "model_type", "")))
    for needle, pre in PRE_TOKENIZERS:
        if needle in names:
            return pre
    return "default"


def _vocabulary(tokenizer: Any, work: Path) -> tuple[list[str], list[int], list[str], dict[str, int]]:
    """(tokens by id, token types, merges, special ids) of a byte-level BPE tokenizer."""
    import gguf

    tokenizer.save_pretrained(work)
    spec = json.loads((work / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise LowbitError(f"GGUF export writes byte-level BPE tokenizers (llama.cpp 'gpt2'); this one is "
                          f"{model.get('type')!r}")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for content, t in added.items():
        vocab.setdefault(content, t["id"])
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [int(gguf.TokenType.UNUSED)] * size
    for text, i in vocab.items():
        tokens[i] = text
        special = added.get(text, {}).get("special")
        types[i] = int(gguf.TokenType.CONTROL if special else
                       gguf.TokenType.USER_DEFINED if text in added else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special_ids: dict[str, int] = {}
    for role in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{role}_token_id", None)
        if tid is not None:
            special_ids[role] = int(tid)
    return tokens, types, merges, special_ids


def _write_gguf(lm: nn.Module, tokenizer: Any, tensors: list[_Tensor], path: Path) -> dict[str, Any]:
    import gguf

    config = lm.config
    arch, _ = ARCHITECTURES[config.model_type]
    rope = rope_parameters(config)
    theta = rope["rope_theta"]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(str(getattr(config, "_name_or_path", "") or config.model_type))
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    _add_rope_scaling(writer, config, rope)
    writer.add_vocab_size(config.vocab_size)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    counts: dict[str, int] = {}
    for t in tensors:
        counts[t.gguf_type] = counts.get(t.gguf_type, 0) + t.data.size
    main_type = max((k for k in counts if k not in ("F32",)), key=lambda k: counts[k], default="F32")
    f = gguf.LlamaFileType
    file_types = {"F32": f.ALL_F32, "F16": f.MOSTLY_F16, "Q8_0": f.MOSTLY_Q8_0, "Q4_0": f.MOSTLY_Q4_0,
                  "Q4_1": f.MOSTLY_Q4_1, "TQ2_0": f.MOSTLY_TQ2_0}
    writer.add_file_type(int(file_types[main_type]))
    tokens, types, merges, special = _vocabulary(tokenizer, path.with_suffix(".tokenizer.tmp"))
    if len(tokens) > config.vocab_size:
        raise LowbitError(f"tokenizer has {len(tokens)} tokens, the model's vocabulary {config.vocab_size}")
    tokens += [f"[PAD{i}]" for i in range(len(tokens), config.vocab_size)]
    types += [int(gguf.TokenType.UNUSED)] * (config.vocab_size - len(types))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(lm, tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for role, tid in special.items():
        getattr(writer, f"add_{role}_token_id")(tid)
    writer.add_add_bos_token(False)
    template = getattr(tokenizer, "chat_template", None)
    if template:
        writer.add_chat_template(template)
    for t in tensors:
        qtype = gguf.GGMLQuantizationType[t.gguf_type]
        writer.add_tensor(t.name, t.data, raw_dtype=qtype if t.data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"pre_tokenizer": _pre_tokenizer(lm, tokenizer), "vocab": len(tokens), "chat_template": bool(template)}


def rope_scaling_tensors(lm: nn.Module) -> list[_Tensor]:
    """llama3 RoPE scaling as llama.cpp reads it: the ``rope_freqs`` tensor of per-frequency divisors (its
    converter's layout); any other scaling than linear (metadata) and llama3 is refused in one line."""
    config = lm.config
    rope = rope_parameters(config)
    kind = rope["rope_type"]
    if kind not in ("default", *ROPE_SCALINGS):
        raise LowbitError(f"GGUF export: RoPE scaling {kind!r} is not written; accepted: plain RoPE, "
                          f"{', '.join(ROPE_SCALINGS)}")
    if kind == "llama3" and not ARCHITECTURES[config.model_type][1]:  # llama.cpp reads rope_freqs for llama only
        raise LowbitError(f"GGUF export: llama3 RoPE scaling is written for the llama architecture; this is "
                          f"{config.model_type!r}")
    if kind != "llama3":
        return []
    return [_Tensor(ROPE_FREQS, rope_frequency_factors(config), "F32", "rotary_emb")]


def _add_rope_scaling(writer: Any, config: Any, rope: dict[str, Any]) -> None:
    """Linear scaling as llama.cpp's metadata (``rope.scaling.type``/``factor``); with any scaling, transformers'
    own parameters under ``lowbit.rope_parameters`` too, so lowbit's import restores the config exactly."""
    import gguf

    if rope["rope_type"] == "default":
        return
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_string(ROPE_KEY, json.dumps({k: v for k, v in rope.items() if k != "rope_theta"}, sort_keys=True))


def write_gguf(model: nn.Module, out: Path, options: Mapping[str, Any]) -> dict[str, Any]:
    """The export format's writer: ``model``'s language model as one GGUF file at ``out``."""
    import shutil

    lm, tokenizer = language_model(model)
    tensors = rope_scaling_tensors(lm) + collect_tensors(lm, requantize=bool(options.get("requantize", False)))
    try:
        meta = _write_gguf(lm, tokenizer, tensors, out)
    finally:
        shutil.rmtree(out.with_suffix(".tokenizer.tmp"), ignore_errors=True)
    types: dict[str, int] = {}
    for t in tensors:
        types[t.gguf_type] = types.get(t.gguf_type, 0) + 1
    requantized = [{"layer": t.source, "type": t.gguf_type, "relative_rms_error": t.added_error}
                   for t in tensors if not t.exact]
    return {"architecture": ARCHITECTURES[lm.config.model_type][0], "tensors": len(tensors),
            "tensor_types": types, "exact": not requantized, "requantized": requantized, **meta}


register_export(ExportFormat(
    name="gguf", description="one GGUF file for llama.cpp (llama-cli, llama-server): the language model",
    write=write_gguf, options=("requantize",), suffix=".gguf", magic=b"GGUF",
))
