"""Any transformers ``PreTrainedModel``, quantized with ``quantize_``: saved and rebuilt without lowbit knowing it.

A packed checkpoint of such a model holds its config (``config.json``), its generation config when it
generates, and its tokenizer when one is attached (``model.lowbit_tokenizer``, as the causal-LM family does);
the skeleton is the model's own transformers class built from that config under empty weights
(``lowbit.workflows.checkpoint``), so config + packed tensors are enough. The class is recorded by name and must
be one transformers exports (``transformers.LlamaForCausalLM``, ``transformers.BertModel``, ...): a class from
elsewhere is refused when saving, in one line, rather than written into a checkpoint nothing can load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.spec import FamilySpec, register_family

PRETRAINED = "transformers.modeling_utils.PreTrainedModel"
TOKENIZER_ATTR = "lowbit_tokenizer"  # a tokenizer travelling with a bare transformers model
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")


def transformers_class(name: str) -> type:
    """transformers' exported ``PreTrainedModel`` subclass called ``name`` (LowbitError if there is none)."""
    import transformers

    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise LowbitError(f"{name!r} is not a model class transformers {transformers.__version__} exports; accepted: "
                          "a transformers PreTrainedModel class such as LlamaForCausalLM")
    return cls


def save_pretrained_architecture(model: nn.Module, out: Path, tokenizer: Any = None) -> dict[str, Any]:
    """Write ``model``'s config (+ generation config, + tokenizer) in ``out``; the record names its class."""
    name = type(model).__name__
    transformers_class(name)  # refuse a class the skeleton could not find again, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    generation = getattr(model, "generation_config", None)
    if generation is not None and model.can_generate():
        generation.save_pretrained(out)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, TOKENIZER_ATTR, None)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return {"class": name}


def pretrained_skeleton(path: Path, record: dict[str, Any], tokenizer: bool = True) -> nn.Module:
    """The recorded transformers class built from the saved config, without weights (the caller holds
    ``init_empty_weights``); its generation config and tokenizer (``lowbit_tokenizer``) read back when saved
    (``tokenizer=False``: not read, for a caller that reads it itself when needed)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    cls = transformers_class(str(record.get("class")))
    model = cls._from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    if tokenizer and any((path / f).is_file() for f in _TOKENIZER_FILES):
        setattr(model, TOKENIZER_ATTR, AutoTokenizer.from_pretrained(path))
    return model.eval()


SPEC = register_family(FamilySpec(
    name="transformers",
    description="any transformers PreTrainedModel quantized with quantize_: saved as config + packed tensors",
    checkpoint_classes=(PRETRAINED,),
    save_architecture=save_pretrained_architecture,  # type: ignore[arg-type]
    skeleton=pretrained_skeleton,  # type: ignore[arg-type]
))
