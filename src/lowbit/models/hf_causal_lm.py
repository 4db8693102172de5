"""Hugging Face causal LMs with Llama's layout (Llama, Mistral, Qwen2, Qwen3): the language model of ``llava``.

What lowbit knows about them: q/k/v of the attention and gate/up of the MLP read one input (one kernel call
once packed, ``lowbit.kernels.fusion``), and the lean decode engine (``lowbit.models.lean_decode``) runs them,
Mistral and Qwen2 within their sliding window. They differ from Llama only by that window (Qwen2's q/k/v biases
live in the Linear modules) and Qwen3's per-head RMSNorm of q and k (the engine applies it), so one spec lists
the four.
"""

from __future__ import annotations

from typing import Any

from lowbit.models.spec import FamilySpec, register_family

# model_type -> class name prefix
_ARCHITECTURES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}


def _full_causal(config: Any) -> int | None:
    return None


def _sliding_window(config: Any) -> int | None:
    return getattr(config, "sliding_window", None)


def _qwen3_window(config: Any) -> int | None:
    # Qwen3 slides only with use_sliding_window (and then only from max_window_layers on): the window bounds all
    return config.sliding_window if getattr(config, "use_sliding_window", False) else None


# Their Attention.forward projects hidden_states by q_proj, k_proj, v_proj in turn; MLP.forward computes
# down_proj(act(gate_proj(x)) * up_proj(x)).
_SHARED = {
    f"transformers.models.{t}.modeling_{t}.{p}{part}": groups
    for t, p in _ARCHITECTURES.items()
    for part, groups in (("Attention", (("q_proj", "k_proj", "v_proj"),)), ("MLP", (("gate_proj", "up_proj"),)))
}

SPEC = register_family(FamilySpec(
    name="hf-causal-lm",
    description="transformers Llama / Mistral / Qwen2 / Qwen3 causal LMs (e.g. SmolLM2, the default VLM's LM)",
    shared_input_children=_SHARED,
    lean_decode={"llama": _full_causal, "mistral": _sliding_window, "qwen2": _sliding_window,
                 "qwen3": _qwen3_window},
))
