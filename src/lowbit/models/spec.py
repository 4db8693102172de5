"""One spec per model family: everything lowbit knows about an architecture, declared in the family's own file.

A ``FamilySpec`` names what the rest of lowbit needs to know about a family's modules: its loaders (the
``FAMILIES`` entries), its towers, the chained blocks of each tower type and the embedding tail of each tower
(Block-AP, ``lowbit.quant.block_ap``), the conv classes that pad their own input (calibration patches), the conv
classes that are plain convs at 1x1 (``quantize_`` may swap them for a channel-wise linear), the TF-"same"
padding convs (static padding, the depthwise kernel), the clamp activations (fused into the kernel write-out),
the children that read one input (q/k/v, gate/up: one kernel call) and the ``config.model_type``\\ s the lean
decode engine runs. ``register_family(spec)`` is the one registration: it fills every registry below and the
kernels' own ones (``lowbit.kernels.fusion.SHARED_INPUT_CHILDREN``, ``static_padding.SAME_PADDING_CONVS``,
``fuse_act.CLAMP_ACTIVATIONS``), which sit below models and so cannot read a spec themselves.

Module classes are named by their "module.QualName" (``lowbit.registry.qualname``), so a spec never imports
the upstream package it describes; lookups go through ``Registry.for_class`` (the nearest registered base).
Generic knowledge (``nn.Sequential`` chains, the plain ``nn.Conv2d``) is registered here once.

Example:
    >>> register_family(FamilySpec(name="my-family", families=(ModelFamily("my", load_my),),
    ...                            block_chains={"my_pkg.MyEncoder": lambda t: list(t.layers)}))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels.attn_quant import QUANTIZABLE_ATTENTION
from lowbit.kernels.fuse_act import CLAMP_ACTIVATIONS
from lowbit.kernels.fusion import SHARED_INPUT_CHILDREN
from lowbit.kernels.static_padding import SAME_PADDING_CONVS
from lowbit.models.base import FAMILIES, DualEncoder, ModelFamily
from lowbit.registry import Registry, qualname

BlockChain = Callable[[nn.Module], list[nn.Module]]  # a tower -> its chained blocks
Tail = Callable[[DualEncoder], nn.Module]  # the model -> module mapping the last block's output to the embedding
InputPadding = Callable[[nn.Conv2d, torch.Tensor], torch.Tensor]  # a conv and its input -> the input it convolves
Clamp = Callable[[nn.Module], tuple[float, float]]  # an activation -> the (lo, hi) its forward clamps to
Window = Callable[[Any], "int | None"]  # a causal LM's config -> its attention window (None: full causal)
# A packed checkpoint's architecture: the model and a directory -> a JSON record (files written in the directory;
# None: this model cannot be rebuilt from files), and (that directory, the record) -> the model built without
# weights (lowbit.workflows.checkpoint).
SaveArchitecture = Callable[[DualEncoder, Path], "dict[str, Any] | None"]
Skeleton = Callable[[Path, dict[str, Any]], DualEncoder]


@dataclass(frozen=True)
class FamilySpec:
    """What lowbit knows about one model family; class keys are "module.QualName" strings.

    - ``families``: the loaders registered in ``FAMILIES`` (several names may share one architecture).
    - ``dual_encoder`` / ``towers``: the family's ``DualEncoder`` class and the tower names its ``towers()`` gives.
    - ``block_chains``: tower class -> its chained blocks (Block-AP; a block with ``assembled = True`` is a view
      the network's forward never calls itself).
    - ``embedding_tails``: tower name -> the tail from that tower's last block output to the normalised
      embedding (needs ``dual_encoder``).
    - ``input_padding``: calibration hook, conv class whose forward pads its input itself -> that padding.
    - ``pointwise_convs``: ``nn.Conv2d`` subclasses whose forward is a plain conv for a 1x1 stride-1 kernel.
    - ``same_padding_convs``: conv classes padding TF "same" with ``F.pad`` in forward (static padding at
      stride 1, the depthwise kernel at any stride).
    - ``clamp_activations``: activation class -> its (lo, hi).
    - ``shared_input_children``: parent class -> groups of child names its forward calls on one input.
    - ``lean_decode``: causal-LM ``config.model_type`` -> its attention window (the lean decode engine runs it).
    - ``quantizable_attention``: attention classes whose forward calls transformers' attention dispatch with
      q, k, v (their QKᵀ / AV matmuls can be quantized: ``lowbit.kernels.attn_quant``).
    - ``save_architecture`` / ``skeleton``: what a self-contained packed checkpoint of a ``dual_encoder`` holds
      besides its tensors (configs, tokenizer, processor files written in a directory, plus a JSON record),
      and how to build the model from them without any weights (on the meta device; buffers real).
    - ``checkpoint_classes``: "module.QualName"s of further classes (not ``DualEncoder``\\ s, e.g. transformers'
      ``PreTrainedModel``) whose instances these hooks save, matched along the model's MRO.
    - ``calibration_data``: the family's own default calibration set for one of its models (a dataset spec for
      ``lowbit.data.resolve_dataset``), or None for lowbit's domain-general default (``lowbit.quant.defaults``).
    """

    name: str
    description: str = ""
    families: tuple[ModelFamily, ...] = ()
    dual_encoder: type[DualEncoder] | None = None
    towers: tuple[str, ...] = ()
    block_chains: Mapping[str, BlockChain] = field(default_factory=dict)
    embedding_tails: Mapping[str, Tail] = field(default_factory=dict)
    input_padding: Mapping[str, InputPadding] = field(default_factory=dict)
    pointwise_convs: Mapping[str, str] = field(default_factory=dict)
    same_padding_convs: Mapping[str, str] = field(default_factory=dict)
    clamp_activations: Mapping[str, Clamp] = field(default_factory=dict)
    shared_input_children: Mapping[str, tuple[tuple[str, ...], ...]] = field(default_factory=dict)
    lean_decode: Mapping[str, Window] = field(default_factory=dict)
    quantizable_attention: tuple[str, ...] = ()
    save_architecture: SaveArchitecture | None = None
    skeleton: Skeleton | None = None
    checkpoint_classes: tuple[str, ...] = ()
    calibration_data: Callable[[nn.Module], str | None] | None = None

    def validate(self) -> None:
        if self.embedding_tails and self.dual_encoder is None:
            raise LowbitError(f"family spec {self.name!r} declares embedding tails but no dual_encoder class")
        unknown = sorted(set(self.embedding_tails) - set(self.towers)) if self.towers else []
        if unknown:
            raise LowbitError(f"family spec {self.name!r}: embedding tails of unknown towers {unknown}; "
                              f"its towers: {list(self.towers)}")
        if (self.save_architecture is None) != (self.skeleton is None) or (
                self.skeleton is not None and self.dual_encoder is None and not self.checkpoint_classes):
            raise LowbitError(f"family spec {self.name!r}: save_architecture and skeleton come together, with a "
                              "dual_encoder class or checkpoint_classes")


FAMILY_SPECS: Registry[FamilySpec] = Registry("family spec")
BLOCK_CHAINS: Registry[BlockChain] = Registry("block chain of a tower class")
# (DualEncoder class, tower) -> tail; keyed by the class so a test may add one for its own tiny model.
EMBEDDING_TAILS: dict[tuple[type, str], Tail] = {}
INPUT_PADDING: Registry[InputPadding] = Registry("conv class padding its own input")
# nn.Conv2d subclasses whose forward, for a 1x1 stride-1 kernel, is exactly a plain conv (so a channel-wise
# linear may replace them); subclasses not listed keep their own forward (kind conv).
POINTWISE_CONV_CLASSES: Registry[str] = Registry("pointwise-compatible conv class")
# model_type -> attention window of a config (None: full causal attention). Registered types have Llama's
# module layout and forward (see lowbit.models.lean_decode).
LEAN_ARCHITECTURES: Registry[Window] = Registry("lean-decoding architecture")


def _family_of(model: nn.Module, wanted: Callable[[FamilySpec], bool]) -> FamilySpec | None:
    """The spec (with ``wanted``) whose ``dual_encoder`` or ``checkpoint_classes`` is ``model``'s nearest class."""
    for klass in type(model).__mro__:
        for name in FAMILY_SPECS:
            spec = FAMILY_SPECS.get(name)
            if (spec.dual_encoder is klass or qualname(klass) in spec.checkpoint_classes) and wanted(spec):
                return spec
    return None


def architecture_spec(model: nn.Module) -> FamilySpec | None:
    """The spec of ``model``'s nearest class with checkpoint hooks, or None."""
    return _family_of(model, lambda spec: spec.skeleton is not None)


def family_calibration_data(model: nn.Module) -> str | None:
    """The calibration set ``model``'s family declares for it (``FamilySpec.calibration_data``), or None: the
    spec of the family that loaded it (``model.source["family"]``), else of its nearest class."""
    loaded_by = (getattr(model, "source", None) or {}).get("family")
    specs = [FAMILY_SPECS.get(n) for n in FAMILY_SPECS]
    spec = next((s for s in specs if any(f.name == loaded_by for f in s.families)), None)
    if spec is None or spec.calibration_data is None:
        spec = _family_of(model, lambda spec: spec.calibration_data is not None)
    return spec.calibration_data(model) if spec is not None and spec.calibration_data is not None else None


def register_tail(cls: type, tower: str) -> Callable[[Tail], Tail]:
    """Register how dual encoders of type ``cls`` turn ``tower``'s last block output into its embedding."""

    def add(fn: Tail) -> Tail:
        EMBEDDING_TAILS[(cls, tower)] = fn
        return fn

    return add


def register_family(spec: FamilySpec) -> FamilySpec:
    """Register ``spec`` and everything it declares, once (a second registration of a name is an error)."""
    spec.validate()
    FAMILY_SPECS.register(spec.name)(spec)
    for family in spec.families:
        FAMILIES.register(family.name)(family)
    if spec.dual_encoder is not None:
        for tower, tail in spec.embedding_tails.items():
            register_tail(spec.dual_encoder, tower)(tail)
    targets: list[tuple[Mapping[str, Any], Registry[Any]]] = [
        (spec.block_chains, BLOCK_CHAINS), (spec.input_padding, INPUT_PADDING),
        (spec.pointwise_convs, POINTWISE_CONV_CLASSES), (spec.same_padding_convs, SAME_PADDING_CONVS),
        (spec.clamp_activations, CLAMP_ACTIVATIONS), (spec.shared_input_children, SHARED_INPUT_CHILDREN),
        (spec.lean_decode, LEAN_ARCHITECTURES)]
    for entries, registry in targets:
        for key, value in entries.items():
            registry.register(key)(value)
    for name in spec.quantizable_attention:
        if name not in QUANTIZABLE_ATTENTION:  # two families may run the same attention class
            QUANTIZABLE_ATTENTION.register(name)(True)
    return spec


# --- lookups (what quant/ and the decode engine read) ----------------------------------------------------------
def tower_blocks(tower: nn.Module) -> list[nn.Module]:
    """The chained blocks of ``tower`` (``BLOCK_CHAINS``, most specific registered class first)."""
    chain = BLOCK_CHAINS.for_class(type(tower))
    if chain is None:
        raise LowbitError(f"block reconstruction does not know the blocks of a {type(tower).__name__} tower; "
                          f"accepted tower types: {', '.join(BLOCK_CHAINS.names())}")
    return chain(tower)


def embedding_tail(model: DualEncoder, tower: str) -> nn.Module | None:
    """The registered tail of ``model``'s ``tower`` (most specific model class first), or None."""
    for klass in type(model).__mro__:
        if (klass, tower) in EMBEDDING_TAILS:
            return EMBEDDING_TAILS[(klass, tower)](model)
    return None


def input_padding(conv: nn.Conv2d) -> InputPadding | None:
    """How ``conv``'s class pads its input inside its forward (``INPUT_PADDING``), or None if unknown."""
    return INPUT_PADDING.for_class(type(conv))


def pointwise_conv_class(cls: type) -> bool:
    """True if ``cls``'s forward is a plain conv at 1x1 stride 1 (exactly ``nn.Conv2d.forward`` or registered)."""
    return cls.forward is nn.Conv2d.forward or qualname(cls) in POINTWISE_CONV_CLASSES


# --- generic parts, shared by every family ----------------------------------------------------------------------
class SpatialMean(nn.Module):
    """[B, C, H, W] -> [B, C]: global average pooling."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class L2Normalize(nn.Module):
    """[B, D] -> unit rows (what the similarity sees)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, dim=-1)


BLOCK_CHAINS.register(qualname(nn.Sequential))(lambda tower: list(tower.children()))
POINTWISE_CONV_CLASSES.register(qualname(nn.Conv2d))("plain conv")
