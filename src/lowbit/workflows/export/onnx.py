"""``lowbit export --format onnx``: a dual encoder as two ONNX graphs (``image.onnx``, ``text.onnx``) that ONNX
Runtime runs, with its packed layers kept packed.

How: each tower is traced by torch's TorchScript exporter (``torch.onnx.export(dynamo=False)``; the default
dynamo exporter needs ``onnxscript``, which lowbit does not install) with every packed module temporarily
swapped for a stand-in whose packed part is a marker op (``lowbit_export::PackedLinear`` for ``x @ W^T``,
``lowbit_export::PackedWeight`` for a weight a conv / embedding / other linear reads). The graph is then
rewritten: each marker becomes

- ``com.microsoft::MatMulNBits`` (4 or 8 bits, ``block_size`` = lowbit's group size, which must be a power of
  two >= 16, or any size when the layer is per output channel: one block then spans the row), the codes
  repacked into its ``[N, n_blocks, blob]`` layout, zero points only where lowbit stores them (its default,
  2^(bits-1), is lowbit's implied symmetric zero); the weight is bit-exact. ``accuracy_level`` 0 (the
  default): float activations, so ONNX Runtime computes lowbit's quantized model exactly (its ``reference``
  backend, to float rounding). ``accuracy_level`` 4: int8 activations as lowbit's own CPU kernels round them:
  level 4 with ``block_size`` set to lowbit's activation block (one int8 scale per row and block; a per-channel
  or coarser weight scale is repeated over the blocks, exactly) where lowbit's kernel rounds the layer's
  activations, level 0 where lowbit runs it on float activations (its reference path). Each node then equals
  lowbit's layer to float rounding. Why float is the default: int8 activation rounding is not stable through a
  deep CNN. On lit-fashion, lowbit's own int8 output moves by as much (min cosine 0.996 over 64 images) when
  its input is perturbed by 1e-7 as it is from the float model, so no other int8 implementation (ORT's
  included, whose convs and activations differ from torch's in the last bit) can land within 0.999 of it; the
  exact quantized model is the common ground both runtimes reproduce;
- or ``DequantizeLinear`` (opset 21, blocked along the input axis; 4-bit codes as UINT4, 8-bit as UINT8,
  2/3-bit codes widened to UINT8, binary as INT8 {-1, 1}) feeding the float op (Conv, Gather, MatMul), plus
  an ``Add`` of the group minima for the offset (minmax) layout: the weight is bit-exact, stored packed;
- or, where no ONNX op holds the format (PB-LLM's sparse side), a float initializer of the exactly
  dequantized weight, which the report says (``op: "float"``, ``packed: false``).

Every layer is listed in the report (name, op, bits, group, exact, why). A packed module traced by
``torch.onnx.export`` directly refuses (``kernels.quant_linear``): it used to export as a constant.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels import fast
from lowbit.kernels.fold_bn import is_folded
from lowbit.kernels.formats import PackedWeight, num_groups, symmetric_zero
from lowbit.kernels.quant_embedding import QuantEmbedding
from lowbit.kernels.quant_linear import QuantConv2d1x1, QuantLinear, QuantWeightParam, clamp_output, is_quantized
from lowbit.models.base import DualEncoder
from lowbit.workflows.export import ExportFormat, register_export

MARKER_DOMAIN = "lowbit_export"  # the marker ops' domain: never left in a written graph
OPSET = 21  # blocked DequantizeLinear and UINT4 need opset 21
INT8_LEVEL = 4  # MatMulNBits accuracy_level: int8 activations per row and block (as lowbit's CPU kernels)
FLOAT_LEVEL = 0  # MatMulNBits accuracy_level: float32 compute (lowbit's quantized model exactly; the default)
ACCURACY_LEVELS = (0, 1, 4)  # 0/1: float32 compute everywhere; 4: int8 where and as lowbit's kernels round
METADATA_FILE = "lowbit_onnx.json"
TOKENIZER_DIR = "tokenizer"
SUPPORTED_FAMILIES = ("lit", "clip")  # DualEncoder.family of the models with an image and a text tower
IMAGE_INPUT, IMAGE_OUTPUT, TEXT_OUTPUT = "pixel_values", "image_embeds", "text_embeds"
_PROBE_TEXTS = ("a photo of a shirt.", "a sandal")  # trace and check inputs (two lengths: padding is traced)
MIN_CHECK_COSINE = 0.99  # ORT vs lowbit on the probe inputs, below which the written graph is refused as broken


# --- the plan of one packed layer ------------------------------------------------------------------------------
@dataclass
class LayerPlan:
    """How one packed module is written: ``op`` MatMulNBits, DequantizeLinear or float."""

    name: str
    key: int
    module: nn.Module
    packed: PackedWeight
    op: str
    block_size: int | None = None
    why: str = ""
    accuracy_level: int | None = None  # MatMulNBits only
    activation_block: int | None = None  # inputs per int8 activation block of lowbit's kernel (None: float)
    weight: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # the effective float weight (tracing)

    def __post_init__(self) -> None:
        # Taken before the module is swapped: the float weight the layer computes with (input_scale folded).
        self.weight = self.module.effective_weight().detach().float()

    def record(self) -> dict[str, Any]:
        """The report's row: what this layer became and whether the weight is exact."""
        p = self.packed
        return {"layer": self.name, "module": type(self.module).__name__, "op": self.op, "bits": p.bits,
                "group_size": p.group_size, "symmetric": p.symmetric, "format": type(p).__name__,
                "block_size": self.block_size, "exact_weight": True, "packed": self.op != "float",
                **({"accuracy_level": self.accuracy_level, "lowbit_activation_block": self.activation_block}
                   if self.op == "MatMulNBits" else {}),
                **({"note": self.why} if self.why else {})}


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _is_pow2(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0  # MatMulNBits' block_size: a power of two >= 16


def lowbit_activation_block(module: nn.Module) -> int | None:
    """Inputs per int8 activation block lowbit's kernel uses for this packed linear as it is set up now (its
    backend and ``act_block``), or None when lowbit computes it on float activations."""
    if getattr(module, "backend", None) != "cpu":
        return None
    return fast.activation_block(module.packed, getattr(module, "act_block", None))


def matmul_nbits_block(packed: PackedWeight, act_inputs: int | None = None,
                       accuracy_level: int = FLOAT_LEVEL) -> tuple[int | None, int, str]:
    """(``block_size``, ``accuracy_level``, note) of the MatMulNBits node holding ``packed`` exactly, or
    (None, 0, why not).

    ``act_inputs`` is lowbit's int8 activation block for the layer (``lowbit_activation_block``; None: lowbit
    computes it on float activations). ORT's level 4 rounds activations per row and per weight block, so the
    block is lowbit's activation block wherever it can hold the weight (a per-channel scale, or a group's,
    repeated over several blocks: exact). A level-4 request keeps level 4 where lowbit rounds activations
    (the note says where the blocks cannot match) and takes 0 where lowbit computes in float: both runtimes
    then compute the same numbers up to float rounding. Levels 0 and 1 are float compute everywhere."""
    if type(packed) is not PackedWeight:
        return None, FLOAT_LEVEL, f"{type(packed).__name__} has no MatMulNBits form"
    if packed.bits not in (4, 8):
        return (None, FLOAT_LEVEL,
                f"MatMulNBits is used for 4 and 8 bits here; {packed.bits}-bit codes go to DequantizeLinear")
    k, gs = packed.in_features, packed.group_size
    per_channel = gs >= k
    if per_channel:  # one block spans the row, padded to a power of two (the pad is never read)
        block = max(16, _next_pow2(k))
    elif _is_pow2(gs):
        block = gs
    else:
        return None, FLOAT_LEVEL, f"group size {gs} is not a power of two >= 16 (MatMulNBits' block_size)"
    if act_inputs is not None and act_inputs < k and _is_pow2(act_inputs) and (per_channel or gs % act_inputs == 0):
        block = act_inputs  # lowbit's int8 blocks (one block per row on both sides when it spans the row)
    matched = act_inputs is not None and (block == act_inputs or (act_inputs >= k and per_channel))
    if accuracy_level != INT8_LEVEL:
        return block, accuracy_level, ""
    if act_inputs is None:
        return block, FLOAT_LEVEL, "lowbit computes this layer on float activations: float compute here too"
    return block, INT8_LEVEL, "" if matched else (f"int8 activation blocks differ: ORT {block} inputs, lowbit "
                                                  f"{act_inputs}")


def plan_layer(name: str, key: int, module: nn.Module, linear: bool,
               accuracy_level: int = FLOAT_LEVEL) -> LayerPlan:
    """The op a packed module becomes: MatMulNBits for linears where it holds the grid (its block and level:
    ``matmul_nbits_block``), else DequantizeLinear (every plain and offset grid), else a float initializer
    (said in the report)."""
    packed = module.packed
    if linear:
        act = lowbit_activation_block(module)
        block, level, why = matmul_nbits_block(packed, act, accuracy_level)
        if block is not None:
            return LayerPlan(name, key, module, packed, "MatMulNBits", block, why, level, act)
    else:
        why = "a conv / embedding weight: DequantizeLinear feeding the float op"
    if _dq_spec(packed) is not None:
        return LayerPlan(name, key, module, packed, "DequantizeLinear", min(packed.group_size, packed.in_features),
                         why)
    return LayerPlan(name, key, module, packed, "float", None,
                     f"{type(packed).__name__}: no ONNX op holds this format; written as the exactly dequantized "
                     "float weight (not packed)")


# --- initializers: lowbit's codes in the ONNX layouts -------------------------------------------------------
def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 codes (< 16), flattened, two per byte, element 2i in the low nibble (ONNX UINT4 and MatMulNBits)."""
    flat = codes.reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def matmul_nbits_tensors(packed: PackedWeight, block: int) -> dict[str, np.ndarray]:
    """``B`` uint8 [N, n_blocks, block*bits/8], ``scales`` float32 [N * n_blocks] and, when lowbit stores zero
    points, ``zero_points`` uint8 (4-bit: two per byte along each row's blocks, padded per row). ``block``
    divides lowbit's group (or the group spans the row): each block takes its group's scale and zero."""
    n, k, bits = packed.out_features, packed.in_features, packed.bits
    n_blocks = num_groups(k, block)
    codes = np.zeros((n, n_blocks * block), np.uint8)
    codes[:, :k] = packed.codes().numpy()
    blob = codes if bits == 8 else _pack_nibbles(codes)  # rows of whole blocks: the flat nibble order is per row
    group_of = np.minimum(np.arange(n_blocks) * block // packed.group_size, packed.scales.shape[1] - 1)
    out = {"B": blob.reshape(n, n_blocks, block * bits // 8),
           "scales": np.ascontiguousarray(packed.scales.float().numpy()[:, group_of]).reshape(-1)}
    if packed.zeros is not None:
        z = np.ascontiguousarray(packed.zeros.numpy()[:, group_of])
        if bits == 4:
            padded = np.zeros((n, 2 * num_groups(n_blocks, 2)), np.uint8)
            padded[:, :n_blocks] = z
            z = _pack_nibbles(padded)
        out["zero_points"] = z.reshape(-1)
    return out


def _dq_spec(packed: PackedWeight) -> tuple[int, np.ndarray, np.ndarray, np.ndarray | None] | None:
    """(ONNX element type, codes [N, K], zero points [N, G], offsets [N, G] or None) for DequantizeLinear, or
    None where it cannot hold the format. ``(q - z) * s`` per block is lowbit's formula exactly."""
    from onnx import TensorProto

    from lowbit.kernels.offsets import OffsetPacked

    if type(packed) not in (PackedWeight, OffsetPacked) and not _is_base3(packed):
        return None
    codes = packed.codes().numpy().astype(np.uint8)
    shape = tuple(packed.scales.shape)
    if isinstance(packed, OffsetPacked):  # q * s + m: zero point 0, the minima added after
        g, k = shape[1], packed.in_features
        if g > 1 and k % packed.group_size:
            return None  # a short last group: the minima cannot be broadcast over whole groups
        elem = TensorProto.UINT4 if packed.bits == 4 else TensorProto.UINT8
        return elem, codes, np.zeros(shape, np.uint8), packed.offsets.float().numpy()
    if packed.bits == 1:  # binary: (q - 1/2) * 2s = (2q - 1) * s
        return TensorProto.INT8, (2 * codes.astype(np.int8) - 1), np.zeros(shape, np.int8), None
    zeros = np.full(shape, int(symmetric_zero(packed.bits)), np.uint8) if packed.zeros is None else packed.zeros.numpy()
    return (TensorProto.UINT4 if packed.bits == 4 else TensorProto.UINT8), codes, zeros, None


def _is_base3(packed: PackedWeight) -> bool:
    from lowbit.kernels.base3 import Base3Packed

    return isinstance(packed, Base3Packed)


def _tensor(name: str, array: np.ndarray, elem: int | None = None) -> Any:
    from onnx import TensorProto, helper, numpy_helper

    if elem in (TensorProto.UINT4, TensorProto.INT4):
        return helper.make_tensor(name, elem, list(array.shape), _pack_nibbles(array.astype(np.uint8)).tobytes(),
                                  raw=True)
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


# --- marker ops: what the tracer records in place of a packed computation ------------------------------------
_ACTIVE: dict[int, LayerPlan] = {}  # key -> plan, only while an export traces


class _PackedLinearOp(torch.autograd.Function):
    """``x @ W_q^T`` of the planned layer ``key`` (no bias, no input scale), recorded as one marker node."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, key: int) -> torch.Tensor:
        return F.linear(x, _ACTIVE[key].packed.dequantize().to(x.dtype))  # W_q, without input_scale

    @staticmethod
    def symbolic(g: Any, x: Any, key: int) -> Any:
        out = g.op(f"{MARKER_DOMAIN}::PackedLinear", x, key_i=key)
        sizes = x.type().varyingSizes()
        out.setType(x.type().with_sizes([*sizes[:-1], _ACTIVE[key].packed.out_features]))
        return out


class _PackedWeightOp(torch.autograd.Function):
    """The effective float weight (``input_scale`` folded, original shape) of layer ``key``, as a marker node.
    ``anchor`` (the layer's input) is there only so that the tracer records the call in the layer's scope."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, key: int) -> torch.Tensor:
        return _ACTIVE[key].weight.clone()

    @staticmethod
    def symbolic(g: Any, anchor: Any, key: int) -> Any:
        out = g.op(f"{MARKER_DOMAIN}::PackedWeight", anchor, key_i=key)
        out.setType(torch._C.TensorType.create_from_tensor(_ACTIVE[key].weight))
        return out


class _LinearStandIn(nn.Module):
    """A ``QuantLinear`` / ``QuantConv2d1x1`` (or a variant) during export: its own math around the marker."""

    def __init__(self, plan: LayerPlan) -> None:
        super().__init__()
        self.key = plan.key
        layer = plan.module
        self.conv1x1 = isinstance(layer, QuantConv2d1x1)
        self.nbits = plan.op == "MatMulNBits"
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float().clone())
        scale = layer._buffers.get("input_scale")
        self.register_buffer("input_scale", None if scale is None else scale.detach().float().clone())
        self.output_clamp = layer.output_clamp

    @property
    def weight(self) -> torch.Tensor:  # for code that reads .weight's dtype or shape; the forward never uses it
        return _ACTIVE[self.key].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv1x1:
            x = x.permute(0, 2, 3, 1)  # [B, C, H, W] -> [B, H, W, C], as QuantConv2d1x1
        if self.nbits:
            if self.input_scale is not None:
                x = x / self.input_scale  # as QuantLinear.forward: (x / s) @ W_q^T
            y = _PackedLinearOp.apply(x, self.key)
            y = y if self.bias is None else y + self.bias
        else:
            y = F.linear(x, _PackedWeightOp.apply(x, self.key), self.bias)  # input_scale folded into the weight
        y = clamp_output(self, y)
        return y.permute(0, 3, 1, 2) if self.conv1x1 else y


EMBEDDING_BUFFER = "lowbit_packed_weight_"  # + key: the stand-in table's initializer, rewritten after the trace


class _EmbeddingStandIn(nn.Module):
    """A ``QuantEmbedding`` during export: a gather from a float table buffer with a marker name, whose
    initializer the rewrite replaces by DequantizeLinear nodes (a marker op fails to trace when the ids are a
    module buffer, as CLIP's position ids are; constant folding is off, so the table is never folded away)."""

    def __init__(self, plan: LayerPlan) -> None:
        super().__init__()
        self.key = plan.key
        self.padding_idx = plan.module.padding_idx
        self.register_buffer(f"{EMBEDDING_BUFFER}{plan.key}", plan.weight)

    @property
    def weight(self) -> torch.Tensor:
        return self._buffers[f"{EMBEDDING_BUFFER}{self.key}"]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class _ExportWeight:
    """Mixed into a ``QuantWeightParam`` module's own class during export: its forward first records the weight
    marker (anchored on the input, in the module's scope), then runs the module's own forward, whose reads of
    ``weight`` return that marker."""

    _lowbit_export_key: int

    @property
    def weight(self) -> torch.Tensor:
        marked = self.__dict__.get("_lowbit_export_weight")
        return _ACTIVE[self._lowbit_export_key].weight if marked is None else marked

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.__dict__["_lowbit_export_weight"] = _PackedWeightOp.apply(x, self._lowbit_export_key)
        try:
            return super().forward(x, *args, **kwargs)  # type: ignore[misc]
        finally:
            self.__dict__.pop("_lowbit_export_weight", None)


def _original_class(module: nn.Module) -> type:
    """The float class a ``QuantWeightParam`` (or variant) module was re-classed from."""
    return next(c for c in type(module).__mro__[1:]
                if issubclass(c, nn.Module) and not issubclass(c, QuantWeightParam))


_EXPORT_CLASSES: dict[type, type] = {}


def _export_class(base: type) -> type:
    if base not in _EXPORT_CLASSES:
        _EXPORT_CLASSES[base] = type(f"Export{base.__name__}", (_ExportWeight, base), {"__module__": __name__})
    return _EXPORT_CLASSES[base]


@contextlib.contextmanager
def stand_ins(model: nn.Module, accuracy_level: int = FLOAT_LEVEL) -> Iterator[list[LayerPlan]]:
    """Swap every packed module of ``model`` for its export stand-in; yields the plans; restores on exit.
    ``accuracy_level``: MatMulNBits' (4: per layer as lowbit's kernels, ``matmul_nbits_block``)."""
    plans: list[LayerPlan] = []
    undo: list[Any] = []
    try:
        for name, module in list(model.named_modules()):
            if not is_quantized(module):
                continue
            key = len(plans)
            if isinstance(module, QuantLinear):
                plan = plan_layer(name, key, module, linear=True, accuracy_level=accuracy_level)
                stand_in: nn.Module = _LinearStandIn(plan)
            elif isinstance(module, QuantEmbedding):
                plan = plan_layer(name, key, module, linear=False)
                stand_in = _EmbeddingStandIn(plan)
            elif isinstance(module, QuantWeightParam):
                plan = plan_layer(name, key, module, linear=False)
                stand_in = module
                old_class = type(module)
                module.__class__ = _export_class(_original_class(module))
                module._lowbit_export_key = key
                undo.append(lambda m=module, c=old_class: (setattr(m, "__class__", c),
                                                           m.__dict__.pop("_lowbit_export_key", None)))
            else:
                raise LowbitError(f"onnx export: packed module {name} ({type(module).__name__}) has no export rule; "
                                  "accepted: packed linears, 1x1 convs, other convs and embedding tables")
            plans.append(plan)
            _ACTIVE[key] = plan
            if stand_in is not module:
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name)
                setattr(parent, child, stand_in)
                undo.append(lambda p=parent, c=child, m=module: setattr(p, c, m))
        yield plans
    finally:
        for step in reversed(undo):
            step()
        _ACTIVE.clear()


# --- the graph rewrite: markers -> MatMulNBits / DequantizeLinear --------------------------------------------
def _matmul_nbits_nodes(plan: LayerPlan, x: str, y: str) -> tuple[list[Any], list[Any]]:
    from onnx import helper

    p, prefix = plan.packed, f"lowbit.{plan.key}"
    assert plan.block_size is not None
    tensors = matmul_nbits_tensors(p, plan.block_size)
    inits = [_tensor(f"{prefix}.{k}", v) for k, v in tensors.items()]
    node = helper.make_node("MatMulNBits", [x, *(i.name for i in inits)], [y], name=f"{plan.name}/MatMulNBits",
                            domain="com.microsoft", K=p.in_features, N=p.out_features, bits=p.bits,
                            block_size=plan.block_size, accuracy_level=plan.accuracy_level)
    return [node], inits


def _weight_nodes(plan: LayerPlan, y: str) -> tuple[list[Any], list[Any]]:
    """Nodes computing the layer's effective float weight [original shape] into ``y``."""
    from onnx import helper

    p, prefix, name = plan.packed, f"lowbit.{plan.key}", plan.name
    n, k = p.out_features, p.in_features
    input_scale = plan.module._buffers.get("input_scale")
    nodes: list[Any] = []
    inits: list[Any] = []
    spec = _dq_spec(p) if plan.op == "DequantizeLinear" else None
    if spec is None:  # no ONNX op holds it: the exact float weight (the report says so)
        w = plan.weight.numpy()
        inits.append(_tensor(f"{prefix}.weight", w))
        return [helper.make_node("Identity", [inits[0].name], [y], name=f"{name}/Identity")], inits
    elem, codes, zeros, offsets = spec
    gs = min(p.group_size, k)
    inits += [_tensor(f"{prefix}.codes", codes, elem), _tensor(f"{prefix}.scales", p.scales.float().numpy()),
              _tensor(f"{prefix}.zero_points", zeros, elem)]
    current = f"{prefix}.dq"
    nodes.append(helper.make_node("DequantizeLinear", [i.name for i in inits], [current], name=f"{name}/DQ",
                                  axis=1, block_size=gs))
    if offsets is not None:  # w = q * s + m: add each group's minimum
        g = offsets.shape[1]
        inits += [_tensor(f"{prefix}.offsets", offsets.reshape(n, g, 1)),
                  _tensor(f"{prefix}.grouped", np.array([n, g, k // g], np.int64)),
                  _tensor(f"{prefix}.flat", np.array([n, k], np.int64))]
        nodes += [helper.make_node("Reshape", [current, f"{prefix}.grouped"], [f"{prefix}.g"], name=f"{name}/R1"),
                  helper.make_node("Add", [f"{prefix}.g", f"{prefix}.offsets"], [f"{prefix}.gm"], name=f"{name}/Add"),
                  helper.make_node("Reshape", [f"{prefix}.gm", f"{prefix}.flat"], [f"{prefix}.m"], name=f"{name}/R2")]
        current = f"{prefix}.m"
    if input_scale is not None:  # W_q / input_scale, as effective_weight
        inits.append(_tensor(f"{prefix}.input_scale", input_scale.float().numpy()))
        nodes.append(helper.make_node("Div", [current, f"{prefix}.input_scale"], [f"{prefix}.s"], name=f"{name}/Div"))
        current = f"{prefix}.s"
    inits.append(_tensor(f"{prefix}.shape", np.array(p.shape, np.int64)))
    nodes.append(helper.make_node("Reshape", [current, f"{prefix}.shape"], [y], name=f"{name}/Reshape"))
    return nodes, inits


def rewrite_markers(model: Any, plans: Sequence[LayerPlan]) -> Any:
    """Replace every marker node of the ONNX ``model`` by its plan's nodes; opsets set for ORT."""
    from onnx import helper

    by_key = {p.key: p for p in plans}
    graph = model.graph
    new_nodes: list[Any] = []
    done: dict[tuple[str, int], str] = {}  # a weight read twice (e.g. its size, then the conv) is built once
    for node in graph.node:
        if node.domain != MARKER_DOMAIN:
            new_nodes.append(node)
            continue
        key = next(a.i for a in node.attribute if a.name == "key")
        plan, out = by_key[key], node.output[0]
        if (node.op_type, key) in done:
            new_nodes.append(helper.make_node("Identity", [done[node.op_type, key]], [out]))
            continue
        if node.op_type == "PackedLinear":
            nodes, inits = _matmul_nbits_nodes(plan, node.input[0], out)
        else:
            nodes, inits = _weight_nodes(plan, out)
        done[node.op_type, key] = out
        new_nodes += nodes
        graph.initializer.extend(inits)
    for init in list(graph.initializer):  # embedding tables: the stand-in's float buffer -> DequantizeLinear
        key_text = init.name.rpartition(EMBEDDING_BUFFER)[2]
        if EMBEDDING_BUFFER in init.name and key_text.isdigit():
            nodes, inits = _weight_nodes(by_key[int(key_text)], init.name)
            graph.initializer.remove(init)
            new_nodes[:0] = nodes
            graph.initializer.extend(inits)
    del graph.node[:]
    graph.node.extend(new_nodes)
    _drop_unused(graph)
    opsets = {o.domain: o.version for o in model.opset_import if o.domain != MARKER_DOMAIN}
    opsets[""] = max(opsets.get("", OPSET), OPSET)
    opsets["com.microsoft"] = 1
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in opsets.items())
    return model


def _drop_unused(graph: Any) -> None:
    """Remove nodes and initializers nothing reads (the markers' constant anchors)."""
    needed = {o.name for o in graph.output}
    keep: list[Any] = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


# --- the towers ----------------------------------------------------------------------------------------------
class _ImageTower(nn.Module):
    def __init__(self, model: DualEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)


class _TextTower(nn.Module):
    def __init__(self, model: DualEncoder, names: Sequence[str]) -> None:
        super().__init__()
        self.model, self.names = model, tuple(names)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(dict(zip(self.names, tensors, strict=True)))


def check_exportable(model: Any) -> DualEncoder:
    """``model`` if it is a dual encoder this format takes, else one LowbitError naming what is accepted."""
    family = getattr(model, "family", None)
    if not isinstance(model, DualEncoder) or family not in SUPPORTED_FAMILIES:
        what = f"a {family!r} model ({type(model).__name__})" if family else f"a {type(model).__name__}"
        raise LowbitError(f"onnx export takes dual encoders with an image and a text tower (families "
                          f"{', '.join(SUPPORTED_FAMILIES)}: lit-fashion, clip-vit-tiny-fashion, HF CLIP/SigLIP "
                          f"dirs or their packed checkpoints); received {what}")
    if is_folded(model):
        raise LowbitError("onnx export: this model was optimized for inference (BatchNorm folded into its convs: "
                          "lowbit.load(dir, optimize=True)); accepted: the model as loaded without optimize")
    return model


def probe_inputs(model: DualEncoder) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A pixel batch and a token batch of the model's own preprocessing (trace inputs and checks)."""
    from PIL import Image

    images = [Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (64, 64), (20, 90, 220))]
    return model.preprocess(images), model.tokenize(list(_PROBE_TEXTS))


def _trace(module: nn.Module, args: tuple[torch.Tensor, ...], input_names: Sequence[str], output: str,
           dynamic: Mapping[str, Mapping[int, str]], what: str) -> Any:
    """``module`` as an ONNX ModelProto holding marker nodes (TorchScript exporter)."""
    import io

    import onnx

    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():  # the TorchScript exporter's deprecation notices and tracer warnings
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, buffer, dynamo=False, opset_version=OPSET, input_names=list(input_names),
                              output_names=[output], dynamic_axes={k: dict(v) for k, v in dynamic.items()},
                              custom_opsets={MARKER_DOMAIN: 1}, do_constant_folding=False)
    except LowbitError:
        raise
    except Exception as exc:  # torch cannot trace this module: say why in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LowbitError(f"onnx export: torch.onnx.export could not trace the {what} "
                          f"({type(exc).__name__}: {first[:200]})") from None
    return onnx.load_from_string(buffer.getvalue())


def export_module(module: nn.Module, args: tuple[torch.Tensor, ...], input_names: Sequence[str], output: str,
                  dynamic: Mapping[str, Mapping[int, str]] | None = None, accuracy_level: int = FLOAT_LEVEL,
                  what: str = "module", root: nn.Module | None = None) -> tuple[Any, list[LayerPlan]]:
    """Any torch module holding packed layers as an ONNX ModelProto with them packed, and the layers' plans.

    ``root`` is the module whose packed layers are swapped (``module`` itself by default; a tower wrapper passes
    the whole model). ``accuracy_level`` is MatMulNBits' (0: float compute, lowbit's quantized model exactly;
    4: int8 activations where and as lowbit's kernels round them, ``matmul_nbits_block``)."""
    target = root if root is not None else module
    with stand_ins(target, accuracy_level) as plans:
        proto = _trace(module, args, input_names, output, dynamic or {}, what)
    return rewrite_markers(proto, plans), plans


def ort_session(model: Any, threads: int = 0) -> Any:
    """An ONNX Runtime CPU session of a ModelProto, bytes or path (``threads`` 0: ORT's default)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.add_session_config_entry("session.force_spinning_stop", "1")  # see workflows/bench_kernels._ort_session
    if not isinstance(model, (bytes, str, Path)):
        model = model.SerializeToString()
    return ort.InferenceSession(str(model) if isinstance(model, Path) else model, so,
                                providers=["CPUExecutionProvider"])


def _check_graph(proto: Any, inputs: Mapping[str, torch.Tensor], expected: torch.Tensor, what: str) -> float:
    """Refuse a graph that is empty, lost its inputs, or disagrees with lowbit on the probe batch; the cosine."""
    graph = proto.graph
    names = [i.name for i in graph.input]
    if len(graph.node) < 2 or not graph.output or sorted(names) != sorted(inputs):
        raise LowbitError(f"onnx export: the {what} graph came out empty or without its inputs "
                          f"({len(graph.node)} nodes, inputs {names}); nothing was written")
    got = ort_session(proto).run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    cos = F.cosine_similarity(torch.from_numpy(got).double(), expected.double(), dim=-1).min().item()
    if not cos >= MIN_CHECK_COSINE:
        raise LowbitError(f"onnx export: ONNX Runtime's {what} embeddings disagree with lowbit's on the probe "
                          f"inputs (cosine {cos:.4f} < {MIN_CHECK_COSINE}); nothing was written")
    return cos


def _image_preprocessing(model: DualEncoder, pixels: torch.Tensor) -> dict[str, Any]:
    processor = getattr(model, "image_processor", None)
    if processor is not None:  # transformers' image processor: its own config, also saved beside the tokenizer
        d = processor.to_dict()
        keys = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
                "do_normalize", "image_mean", "image_std", "do_convert_rgb")
        return {"source": f"{TOKENIZER_DIR}/preprocessor_config.json (transformers {type(processor).__name__})",
                **{k: d[k] for k in keys if k in d}, "channel_order": "RGB", "layout": "NCHW",
                "input_size": list(pixels.shape[1:])}
    from lowbit.models.towers import IMAGENET_MEAN, IMAGENET_STD

    size = int(pixels.shape[-1])
    return {"source": "lowbit.models.preprocess.images_to_tensor", "resize": [size, size],
            "resample": "bicubic (PIL), squashed to a square, no crop", "rescale_factor": 1 / 255,
            "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD), "channel_order": "RGB",
            "layout": "NCHW", "input_size": list(pixels.shape[1:])}


def _text_info(model: DualEncoder, names: Sequence[str]) -> dict[str, Any]:
    max_len = getattr(model, "max_text_tokens", None) or getattr(getattr(model, "config", None), "max_text_tokens",
                                                                 None)
    siglip = getattr(model, "model_type", None) == "siglip"
    return {"tokenizer_dir": TOKENIZER_DIR, "inputs": list(names), "dtype": "int64",
            "max_length": max_len, "padding": "max_length" if siglip else "longest",
            "truncation": True}


def write_onnx(model: nn.Module, out: Path, options: Mapping[str, Any]) -> dict[str, Any]:
    """The ONNX format's writer: ``image.onnx``, ``text.onnx``, the tokenizer files and ``lowbit_onnx.json``."""
    import onnx

    encoder = check_exportable(model)
    accuracy_level = options.get("accuracy_level", FLOAT_LEVEL)
    if isinstance(accuracy_level, bool) or accuracy_level not in ACCURACY_LEVELS:
        raise LowbitError(f"onnx export: accuracy_level {accuracy_level!r} is not accepted; accepted: 0 (float32 "
                          "compute: lowbit's quantized model exactly, the default), 1 (the same), 4 (int8 "
                          "activations where and as lowbit's CPU kernels round them)")
    was_training = {m: m.training for m in encoder.modules()}
    encoder.eval()
    try:
        with torch.no_grad():
            pixels, tokens = probe_inputs(encoder)
            expected_image = encoder.encode_image(pixels)
            expected_text = encoder.encode_text(tokens)
        names = list(tokens)
        image, plans = export_module(_ImageTower(encoder).eval(), (pixels,), [IMAGE_INPUT], IMAGE_OUTPUT,
                                     {IMAGE_INPUT: {0: "batch"}}, accuracy_level, "image tower", encoder)
        text, _ = export_module(_TextTower(encoder, names).eval(), tuple(tokens[n] for n in names), names,
                                TEXT_OUTPUT, {n: {0: "batch", 1: "sequence"} for n in names}, accuracy_level,
                                "text tower", encoder)
    finally:
        for m, flag in was_training.items():
            m.training = flag
    checks = {"image": _check_graph(image, {IMAGE_INPUT: pixels}, expected_image, "image"),
              "text": _check_graph(text, tokens, expected_text, "text")}
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(image, str(out / "image.onnx"))
    onnx.save(text, str(out / "text.onnx"))
    _save_tokenizer(encoder, out / TOKENIZER_DIR)
    in_graph = {"image": _graph_initializers(image), "text": _graph_initializers(text)}
    layers = [{**p.record(), "graph": [g for g, names_ in in_graph.items() if f"lowbit.{p.key}." in names_]}
              for p in plans]
    bias = encoder.logit_bias
    meta = {
        "format": "lowbit-onnx/1",
        "source": encoder.source,
        "image": {"file": "image.onnx", "input": IMAGE_INPUT, "output": IMAGE_OUTPUT,
                  "preprocess": _image_preprocessing(encoder, pixels)},
        "text": {"file": "text.onnx", "output": TEXT_OUTPUT, **_text_info(encoder, names)},
        "embedding": {"dim": int(expected_image.shape[-1]), "normalized": True,
                      "note": "both graphs output L2-normalised embeddings"},
        "logit_scale": float(encoder.logit_scale.detach().exp()),
        "logit_bias": None if bias is None else float(bias.detach()),
        "similarity": "logit_scale * image_embeds @ text_embeds.T (+ logit_bias)",
        "opset": {"": OPSET, "com.microsoft": 1},
        "matmul_nbits_accuracy_level": _level_summary(accuracy_level, plans),
        "layers": layers,
    }
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    ops: dict[str, int] = {}
    for layer in layers:
        ops[layer["op"]] = ops.get(layer["op"], 0) + 1
    return {"files": ["image.onnx", "text.onnx", METADATA_FILE, f"{TOKENIZER_DIR}/"], "ops": ops,
            "probe_cosine": checks, "exporter": "torch.onnx.export(dynamo=False) + marker rewrite",
            "accuracy_level": _level_summary(accuracy_level, plans), "layers": layers}


def _level_summary(accuracy_level: int, plans: Sequence[LayerPlan]) -> dict[str, Any]:
    """The option and how many MatMulNBits layers run at each level."""
    counts: dict[str, int] = {}
    for p in plans:
        if p.op == "MatMulNBits":
            counts[str(p.accuracy_level)] = counts.get(str(p.accuracy_level), 0) + 1
    return {"requested": accuracy_level, "per_layer": counts}


def _graph_initializers(model: Any) -> set[str]:
    return {i.name.rsplit(".", 1)[0] + "." for i in model.graph.initializer if i.name.startswith("lowbit.")}


def _save_tokenizer(model: DualEncoder, out: Path) -> None:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise LowbitError("onnx export: the model has no tokenizer to ship beside text.onnx")
    tokenizer.save_pretrained(str(out))
    processor = getattr(model, "image_processor", None)
    if processor is not None:
        processor.save_pretrained(str(out))


# --- running the export: ONNX Runtime beside lowbit -----------------------------------------------------------
class OrtDualEncoder:
    """The two graphs of an export in ONNX Runtime sessions, fed by ``model``'s own preprocessing and tokenizer
    (so a comparison isolates the graphs): ``encode_image``, ``encode_text``, ``embed_images``, ``embed_texts``
    (the calls ``lowbit.eval.zeroshot.class_embeddings`` makes)."""

    def __init__(self, path: str | Path, model: DualEncoder, threads: int = 0) -> None:
        path = Path(path)
        self.meta = json.loads((path / METADATA_FILE).read_text())
        self.model = model
        self.image = ort_session(path / self.meta["image"]["file"], threads)
        self.text = ort_session(path / self.meta["text"]["file"], threads)
        self.text_inputs = list(self.meta["text"]["inputs"])

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.image.run(None, {IMAGE_INPUT: pixels.numpy()})[0])

    def encode_text(self, tokens: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.from_numpy(self.text.run(None, {n: tokens[n].numpy() for n in self.text_inputs})[0])

    def embed_images(self, images: Sequence[Any], batch_size: int = 64, progress: bool | str = False) -> torch.Tensor:
        return torch.cat([self.encode_image(self.model.preprocess(images[i:i + batch_size]))
                          for i in range(0, len(images), batch_size)])

    def embed_texts(self, texts: Sequence[str], batch_size: int = 256, progress: bool | str = False) -> torch.Tensor:
        return torch.cat([self.encode_text(self.model.tokenize(texts[i:i + batch_size]))
                          for i in range(0, len(texts), batch_size)])


def compare_with_lowbit(model: DualEncoder, path: str | Path, data: Any, threads: int = 0) -> dict[str, Any]:
    """ORT (the export at ``path``) against ``model`` on lowbit's kernels, on a labelled ``data`` set: image
    embedding cosine over its images, text cosine over every prompt (class names x templates), zero-shot top-1."""
    from lowbit.eval.zeroshot import class_embeddings, classify_embeddings

    ort_model = OrtDualEncoder(path, model, threads)
    labels = torch.as_tensor(data.labels, dtype=torch.long)
    prompts = [t.replace("{}", c, 1) for c in data.classnames for t in data.templates]
    with torch.inference_mode():
        img_lb, img_ort = model.embed_images(data.images), ort_model.embed_images(data.images)
        txt_lb, txt_ort = model.embed_texts(prompts), ort_model.embed_texts(prompts)
        cls_lb = class_embeddings(model, data.classnames, data.templates)
        cls_ort = class_embeddings(ort_model, data.classnames, data.templates)  # type: ignore[arg-type]
    top1_lb = classify_embeddings(img_lb, cls_lb, labels, data.classnames)["top1"]
    top1_ort = classify_embeddings(img_ort, cls_ort, labels, data.classnames)["top1"]
    img_cos = F.cosine_similarity(img_lb.double(), img_ort.double(), dim=-1)
    txt_cos = F.cosine_similarity(txt_lb.double(), txt_ort.double(), dim=-1)
    return {"n_images": len(data), "n_prompts": len(prompts),
            "image_cosine_min": img_cos.min().item(), "image_cosine_mean": img_cos.mean().item(),
            "text_cosine_min": txt_cos.min().item(), "text_cosine_mean": txt_cos.mean().item(),
            "top1_lowbit": top1_lb, "top1_ort": top1_ort,
            "top1_delta_pt": round(100 * (top1_ort - top1_lb), 9)}  # one image of 500: 0.2, not 0.2000...2


register_export(ExportFormat(
    name="onnx",
    description="ONNX Runtime: image.onnx + text.onnx, packed linears as com.microsoft MatMulNBits",
    write=write_onnx,
    is_dir=True,
    options=("accuracy_level",),
    suffix="",
))

__all__ = ["LayerPlan", "OrtDualEncoder", "check_exportable", "compare_with_lowbit", "export_module",
           "matmul_nbits_block", "matmul_nbits_tensors", "ort_session", "plan_layer", "rewrite_markers", "stand_ins",
           "write_onnx"]
