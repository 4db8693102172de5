"""Model families behind one interface. ``load_model(name_or_path)`` picks the family by registry:
a built-in name (``lit-fashion``), a local directory a family claims (CLIP/SigLIP, Llava), or ``family:name`` to
force a family (``clip:openai/clip-vit-base-patch32`` when online). Packed lowbit checkpoints are a family too,
registered by the layer above (``lowbit.workflows.packed``), since loading one combines models, quant and kernels.
"""

from lowbit.models import (  # noqa: F401  (registers the family specs)
    causal_lm,
    clip,
    hf_causal_lm,
    hf_pretrained,
    lit,
    llava,
    vit_default,
)
from lowbit.models.base import FAMILIES, DualEncoder, ModelFamily
from lowbit.models.loading import builtin_models, load_model, resolve_family
from lowbit.models.spec import FAMILY_SPECS, FamilySpec, register_family

__all__ = ["DualEncoder", "FAMILIES", "FAMILY_SPECS", "FamilySpec", "ModelFamily", "builtin_models", "load_model",
           "register_family", "resolve_family"]
