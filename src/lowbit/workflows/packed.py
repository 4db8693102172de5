"""``lowbit``: a packed checkpoint directory written by ``lowbit quantize`` / ``lowbit.save``.

The directory is self-contained: its family builds the model's skeleton from the directory's own architecture
files, without weights, and the memory-mapped packed tensors are assigned in place (see
``lowbit.workflows.checkpoint``); the float source it names is provenance only.
"""

from __future__ import annotations

from pathlib import Path

from lowbit.kernels.quant_linear import set_backend
from lowbit.models.base import FAMILIES, DualEncoder, ModelFamily
from lowbit.workflows.checkpoint import load_quantized

MANIFEST_FILE = "manifest.json"


def is_packed_dir(path: str) -> bool:
    """True for a directory holding a lowbit manifest."""
    return (Path(path) / MANIFEST_FILE).is_file()


def load_packed(path: str, backend: str | None = None) -> DualEncoder:
    """Load a packed checkpoint directory as a ready-to-run model.

    ``backend`` routes every packed linear / 1x1 conv through ``LINEAR_BACKENDS[backend]``: ``"cpu"`` (the
    default, ``DEFAULT_BACKEND``) is lowbit's fast kernels (int8 activations per row, error bound in
    ``lowbit.kernels.fast``; the reference path, saying so once, where the extension cannot be built);
    ``"reference"`` dequantizes once and runs float matmuls (exact float equality with the dequantized model).
    ``lowbit.load(path, optimize=True)`` then folds BatchNorm into the packed convs (fp16 scales re-rounded:
    relative 2^-11 per scale; see ``lowbit.models.load_model``).

    Example:
        >>> model = load_packed("out/w4")  # doctest: +SKIP
        >>> exact = load_packed("out/w4", backend="reference")  # doctest: +SKIP
    """
    model = load_quantized(path)
    if backend is not None:
        set_backend(model, backend)
    model.source = {**model.source, "float_source": dict(model.source), "family": "lowbit",
                    "name": str(path), "checkpoint": str(path)}
    return model


FAMILIES.register("lowbit")(
    ModelFamily(name="lowbit", load=load_packed, claims_path=is_packed_dir,
                description="lowbit packed checkpoint directory (safetensors + manifest.json)")
)
