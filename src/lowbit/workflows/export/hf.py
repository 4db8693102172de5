"""Export to a Hugging Face ``save_pretrained`` directory with a compressed-tensors ``quantization_config``.

``transformers`` loads the result (with the ``compressed-tensors`` package installed) and vLLM serves it. lowbit's
packed rows are compressed-tensors' ``pack-quantized`` bytes already: both lay integer codes LSB-first in a
dense bitstream per row, so a row's bytes, padded to whole int32 words, are ``weight_packed``; symmetric codes
are stored offset by 2^(b-1) in both; lowbit's fp16 steps are ``weight_scale``.

Exact: symmetric grids of 2..8 bits in plain code layout, per group or per output row, in ``nn.Linear``
layers. Everything else (zero points, which transformers' compressed-tensors loader fails to read back even when
compressed-tensors wrote them itself, though lowbit's import reads them: ``models.hf_quantized``, packed
embedding tables, ``minmax`` minima, binary, base-3 ternary, PB-LLM, packed convs) has no compressed-tensors
form that transformers reads: it is refused in one line naming the layer, unless ``dequantize=True``, which
writes it as float in the model's float dtype and lists it in the report with the relative error of that cast.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels.formats import PackedWeight
from lowbit.kernels.quant_linear import QuantLinear, is_quantized
from lowbit.kernels.storage import format_of
from lowbit.workflows.export import ExportFormat, register_export

PLAIN_LAYOUT = "codes"  # the storage table's layout compressed-tensors shares


def hf_model(model: nn.Module) -> tuple[nn.Module, list[Any], str]:
    """(transformers model, tokenizer/processor objects to save beside it, what was exported) inside ``model``."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model, [], type(model).__name__
    language = getattr(model, "language", None)
    if isinstance(language, PreTrainedModel):  # a llava: its language model (the vision side is lowbit's own)
        return language, [getattr(model, "tokenizer", None)], f"the language model ({type(language).__name__})"
    inner = getattr(model, "model", None)
    if isinstance(inner, PreTrainedModel):  # lowbit's wrapper of HF CLIP / SigLIP
        saved = [getattr(model, "tokenizer", None), getattr(model, "image_processor", None)]
        return inner, saved, type(inner).__name__
    raise LowbitError(f"HF export takes a transformers model (CLIP, SigLIP, a causal LM, a llava's language model); "
                      f"{type(model).__name__} is lowbit's own architecture: export it as onnx instead")


def packed_int32(packed: PackedWeight) -> torch.Tensor:
    """lowbit's code rows as compressed-tensors' ``weight_packed`` int32 [N, ceil(K * bits / 32)]."""
    rows = packed.qweight
    words = math.ceil(packed.in_features * packed.bits / 32)
    pad = words * 4 - rows.shape[1]
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    return rows.contiguous().view(torch.int32)  # little-endian bytes: LSB-first in both


def _scheme(packed: PackedWeight) -> dict[str, Any]:
    per_row = packed.scales.shape[1] == 1
    return {"num_bits": packed.bits, "type": "int", "symmetric": packed.symmetric,
            "strategy": "channel" if per_row else "group", "group_size": None if per_row else packed.group_size,
            "dynamic": False, "actorder": None, "observer": "minmax"}


def _exact(module: nn.Module) -> tuple[PackedWeight | None, str]:
    if type(module) is not QuantLinear:
        return None, f"{type(module).__name__} has no compressed-tensors form transformers reads"
    packed = module.packed
    row = format_of(packed)
    if row.layout != PLAIN_LAYOUT or packed.bits == 1:  # binary is (q - 1/2) * 2s: no integer zero point
        return None, f"{row.name} storage has no compressed-tensors form"
    if not packed.symmetric:
        # compressed-tensors writes zero points packed along the rows, but the model transformers builds to load
        # them expects them unpacked: they fail to load (size mismatch; compressed-tensors 0.20, transformers 5),
        # compressed-tensors' own asymmetric output included (tests/workflows/test_hf_import.py reads it instead)
        return None, (f"{row.name} zero points do not load in transformers' compressed-tensors path (its loader "
                      "expects them unpacked: a size mismatch, compressed-tensors' own asymmetric files included)")
    return packed, ""


def write_hf(model: nn.Module, out: Path, options: Mapping[str, Any]) -> dict[str, Any]:
    """The export format's writer: a ``save_pretrained`` directory with compressed tensors."""
    from safetensors.torch import save_file

    inner, extras, what = hf_model(model)
    dequantize = bool(options.get("dequantize", False))
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, Any]] = {}
    ignore: list[str] = []
    dequantized: list[dict[str, Any]] = []
    handled: set[str] = set()
    for path, module in inner.named_modules():
        if not is_quantized(module):
            if isinstance(module, nn.Linear):
                ignore.append(path)
            continue
        handled.add(path)
        packed, why = _exact(module)
        if packed is None:
            if not dequantize:
                raise LowbitError(f"layer {path}: {why}; quantize it with a plain grid (e.g. w4g32 or w8) or pass "
                                  "dequantize=True to write it as float (listed in the report)")
            dense = module.packed
            weight = dense.dequantize()
            stored = weight.to(inner.dtype)
            err = float((stored.float() - weight).norm() / weight.norm().clamp(min=1e-30))
            tensors[f"{path}.weight"] = stored.contiguous()
            dequantized.append({"layer": path, "reason": why, "dtype": str(inner.dtype).removeprefix("torch."),
                                "relative_error": err})
            if isinstance(module, nn.Module) and getattr(module, "bias", None) is not None:
                tensors[f"{path}.bias"] = module.bias.detach().contiguous()
            continue
        scheme = _scheme(packed)
        key = json.dumps(scheme, sort_keys=True)
        groups.setdefault(key, {"targets": [], "weights": scheme, "input_activations": None,
                                "output_activations": None, "format": "pack-quantized"})["targets"].append(path)
        tensors[f"{path}.weight_packed"] = packed_int32(packed)
        tensors[f"{path}.weight_scale"] = packed.scales.contiguous()
        tensors[f"{path}.weight_shape"] = torch.tensor([packed.out_features, packed.in_features], dtype=torch.int64)
        if module.bias is not None:
            tensors[f"{path}.bias"] = module.bias.detach().contiguous()
    if not groups:
        raise LowbitError(f"HF export: {what} holds no packed linear layer; quantize it first (e.g. --recipe w4)")
    state = inner.state_dict()
    for name, value in state.items():
        owner = name.rsplit(".", 1)[0]
        if owner not in handled and name not in tensors:
            tensors[name] = value.detach().contiguous()
    # tied tensors are written once, under the name transformers keeps (it re-ties the other on load)
    seen: dict[int, str] = {}
    for name in list(tensors):
        ptr = tensors[name].data_ptr()
        if ptr in seen and tensors[name].numel():
            del tensors[name]
        else:
            seen[ptr] = name
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = inner.config.to_dict()
    config["architectures"] = config.get("architectures") or [type(inner).__name__]  # what loaders dispatch on
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is not None and is_quantized(head):
        # the packed head is its own tensor now: transformers must not tie it back to the float input table
        for section in (config, *(v for v in config.values() if isinstance(v, dict))):
            if "tie_word_embeddings" in section:
                section["tie_word_embeddings"] = False
    from compressed_tensors import __version__ as ct_version

    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())}, "ignore": ignore,
        "kv_cache_scheme": None, "global_compression_ratio": None, "version": ct_version,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    generation = getattr(inner, "generation_config", None)
    if generation is not None and hasattr(generation, "save_pretrained"):
        generation.save_pretrained(out)
    for extra in extras:
        if extra is not None and hasattr(extra, "save_pretrained"):
            extra.save_pretrained(out)
    return {"exported": what, "architecture": type(inner).__name__, "packed_layers": len(handled) - len(dequantized),
            "config_groups": len(groups), "float_linears": len(ignore), "dequantized": dequantized,
            "exact": not dequantized}


register_export(ExportFormat(
    name="hf", description="a save_pretrained directory, compressed-tensors pack-quantized (transformers, vLLM)",
    write=write_hf, is_dir=True, options=("dequantize",),
))
