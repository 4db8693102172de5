"""``vit``: the built-in ``clip-vit-tiny-fashion``, a ViT dual encoder lowbit trained from scratch.

A CLIP model (Radford et al., 2021) with a ViT image tower (Dosovitskiy et al., 2021) of the ``tiny`` preset,
pre-trained by ``lowbit train clip`` on Fashion-MNIST (captions from the prompt templates) plus the generated
shapes captions. The package ships it as a standard transformers directory (fp16 weights, config, word-level
tokenizer, image processor) in ``assets/clip-vit-tiny-fashion/``; its ``BUILD.md`` holds the exact command,
seed and training log. Loading goes through the ``clip`` family, so it behaves like any CLIP checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from lowbit.errors import LowbitError, unknown_choice
from lowbit.models.base import DualEncoder, ModelFamily
from lowbit.models.spec import FamilySpec, register_family

NAME = "clip-vit-tiny-fashion"
ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / NAME
BUILD_COMMAND = (
    "lowbit train clip --model tiny --data fashion-mnist,shapes --steps 3000 --batch-size 64 --lr 2e-3 "
    "--warmup-steps 100 --seed 0 --out runs/clip-vit-tiny-fashion --export-fp16 <this asset dir> "
    "(exact command and log: assets/clip-vit-tiny-fashion/BUILD.md)"
)


def load_vit_default(name: str = NAME, max_text_tokens: int | None = None) -> DualEncoder:
    """Load the packaged ``clip-vit-tiny-fashion`` in eval mode (float32 on CPU).

    Example:
        >>> model = load_vit_default()  # doctest: +SKIP
        >>> model.embed_texts(["a photo of a sneaker."]).shape  # doctest: +SKIP
        torch.Size([1, 128])
    """
    from lowbit.models.clip import load_clip

    if name != NAME:
        raise unknown_choice("vit model", name, [NAME])
    if not (ASSET_DIR / "config.json").is_file():
        raise LowbitError(f"{NAME} is not packaged in this install ({ASSET_DIR} has no config.json); "
                          f"build it with: {BUILD_COMMAND}")
    options = {} if max_text_tokens is None else {"max_text_tokens": max_text_tokens}
    model = load_clip(str(ASSET_DIR), **options)
    model.float().eval()  # the weights ship as fp16; CPU inference and quantization want float32
    model.source = {"family": "vit", "name": NAME, "options": dict(options)}
    return model


# A CLIPModel loaded through the clip family: its architecture knowledge is the clip spec's; this spec adds the name.
SPEC = register_family(FamilySpec(
    name="vit",
    description="the built-in clip-vit-tiny-fashion (a transformers CLIPModel)",
    families=(ModelFamily(
        name="vit",
        load=load_vit_default,
        builtin_names=(NAME,),
        description="ViT-tiny CLIP trained from scratch by lowbit on Fashion-MNIST + shapes (packaged)",
    ),),
    calibration_data=lambda model: "fashion-mnist",  # trained on Fashion-MNIST (+ shapes): its own domain
))
