"""Which family loads a name or a directory, and loading through it with validated options.

Kept out of ``lowbit.models``' ``__init__`` so a family that loads another model by name (a VLM's vision tower)
imports this module, not the package that imports every family.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError, check_options, keyword_parameters
from lowbit.kernels.quant_linear import check_act_block, set_act_block
from lowbit.models.base import FAMILIES, DualEncoder, ModelFamily


def builtin_models() -> dict[str, str]:
    """Built-in model name -> family name."""
    return {n: FAMILIES.get(f).name for f in FAMILIES for n in FAMILIES.get(f).builtin_names}


def resolve_family(name_or_path: str) -> tuple[ModelFamily, str]:
    """Which family loads ``name_or_path``, and the name to hand it."""
    family_name, sep, rest = name_or_path.partition(":")
    if sep and family_name in FAMILIES and not Path(name_or_path).exists():
        return FAMILIES.get(family_name), rest
    builtins = builtin_models()
    if name_or_path in builtins:
        return FAMILIES.get(builtins[name_or_path]), name_or_path
    for fam in FAMILIES:
        if FAMILIES.get(fam).claims_path(name_or_path):
            return FAMILIES.get(fam), name_or_path
    accepted = sorted(builtins) + ["a CLIP/SigLIP checkpoint directory", "a Llava checkpoint directory",
                                   "a causal-LM directory (*ForCausalLM config) or .gguf file",
                                   "a lowbit quantized directory",
                                   "family:name (e.g. clip:openai/clip-vit-base-patch32)"]
    what = "directory" if Path(name_or_path).is_dir() else "model"
    raise LowbitError(f"unknown {what} {name_or_path!r}; choose one of: {', '.join(accepted)}")


def _is_input_error(exc: BaseException) -> bool:
    """Errors a damaged or foreign model file raises while loading (safetensors' header errors, torch's
    weights-only unpickler, truncated zip archives, JSON configs, missing files): the input's fault, not lowbit's."""
    import pickle

    if isinstance(exc, (OSError, ValueError, EOFError, RecursionError, pickle.UnpicklingError)):
        return True
    kind = type(exc).__name__
    return kind == "SafetensorError" or (isinstance(exc, RuntimeError) and any(
        s in str(exc) for s in ("PytorchStreamReader", "Weights only load failed", "invalid load key")))


def load_model(name_or_path: str, **options: Any) -> DualEncoder:
    """Load any supported model in eval mode; ``optimize=True`` (any family, float or packed) then applies
    ``lowbit.kernels.inference.optimize_for_inference_`` (BatchNorm folded into the conv before it, static
    same-padding, in-place activations). Off by default: the model is then exactly the saved one, and a packed
    one can be saved again (a folded model cannot). ``act_block`` (``"row"`` or a multiple of 32) sets how the
    packed layers' kernels quantize activations (``lowbit.kernels.quant_linear.set_act_block``).

    Example:
        >>> model = load_model("lit-fashion")  # doctest: +SKIP
        >>> fast = load_model("out/w4", optimize=True)  # doctest: +SKIP
    """
    optimize = options.pop("optimize", False)
    act_block = options.pop("act_block", None)
    check_act_block(act_block)  # before the seconds of loading
    family: ModelFamily | None = None
    try:
        family, name = resolve_family(name_or_path)  # reads configs: they may be damaged too
        accepted = keyword_parameters(family.load)[1:]  # the first parameter is the name
        check_options(f"loading {name_or_path!r} ({family.name} family)", options,
                      [*accepted, "optimize", "act_block"])
        model = family.load(name, **options)
    except LowbitError:
        raise
    except Exception as exc:
        if not _is_input_error(exc):
            raise
        first = " ".join(str(exc).split())[:240]
        kind = f"a {family.name} model" if family is not None else "a model"
        raise LowbitError(f"cannot load {name_or_path!r} as {kind} ({type(exc).__name__}: {first}); "
                          "accepted: a complete model directory (config + safetensors / weights-only torch "
                          "files) or a built-in name") from None
    if act_block is not None:
        set_act_block(model, act_block)
    if optimize:
        from lowbit.kernels.inference import optimize_for_inference_

        optimize_for_inference_(model)
    return model
