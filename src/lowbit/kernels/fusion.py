"""Packed projections that read the same input, run as one kernel call (q/k/v of attention, gate/up of an MLP).

A decoder token calls ~7 packed linears per layer on a single row; at M = 1 each call's fixed cost (Python
dispatch, activation quantization, the thread team) is a large share of its few microseconds of matmul, and
q/k/v (and gate/up) quantize the very same activations. ``fuse_shared_inputs(model)`` links such siblings into
a ``SharedInputGroup``: their packed rows are concatenated once into one prepared weight, the first sibling
called computes every sibling's output in one call, and the others receive their slice (a view) when they are
called with the same input tensor. Results equal the unfused layers' (the kernels compute each output from
the same int8 activations; tested in tests/kernels/test_fusion.py).

Which children share an input is knowledge of the parent's ``forward``, so it lives in a registry keyed by the
parent class (``SHARED_INPUT_CHILDREN``), never guessed from names, filled by the family specs'
``shared_input_children`` (``lowbit.models.spec``; e.g. Llama, Mistral, Qwen2 in ``lowbit.models.hf_causal_lm``).
A parent class registered there promises that, in its forward, the listed children are called on one input
tensor without modifying it in between.
The runtime check is still strict: a sibling served from the group must be called with the identical tensor
object (and, outside inference mode, version) that produced it, else it computes on its own.

Only layers on the default ``cpu`` backend use the group (the reference backend keeps exact float semantics),
and only when the kernels can run (no autograd, CPU tensors); everything else takes the layer's own path.

Example:
    >>> SHARED_INPUT_CHILDREN.get("transformers.models.llama.modeling_llama.LlamaMLP")  # doctest: +SKIP
    (('gate_proj', 'up_proj'),)
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import torch
from torch import nn

from lowbit.kernels.formats import PackedWeight
from lowbit.kernels.lowering import invalidate_plans
from lowbit.kernels.offsets import OffsetPacked
from lowbit.kernels.quant_linear import GROUP_ATTR, QuantLinear
from lowbit.registry import Registry, qualname

# "module.QualName" of a parent class -> groups of child attribute names that its forward calls on one input.
SHARED_INPUT_CHILDREN: Registry[tuple[tuple[str, ...], ...]] = Registry("shared-input projection parent")


def _is_offset(m: QuantLinear) -> bool:
    """An offset-storage layer (``kernels.offsets``: w = q * s + m, the ``minmax`` grid)."""
    return isinstance(m.packed, OffsetPacked)


def _fusable(members: list[Any]) -> bool:
    """Siblings that one prepared weight can serve: plain packed linears of one input width and format (offset
    storage included: the kernels add its group minima's term themselves)."""
    if len(members) < 2 or not all(isinstance(m, QuantLinear) for m in members):
        return False
    first = members[0]
    if type(first)._matmul is not QuantLinear._matmul:
        return False
    return all(
        type(m)._matmul is QuantLinear._matmul  # other variants with their own matmul (e.g. PB-LLM's side) stay apart
        and _is_offset(m) == _is_offset(first)  # one call has minima for all its rows or for none
        and not m.weight_shape[2:]  # linears, not 1x1 convs
        and m.input_scale is None  # each sibling would divide x itself: no shared input tensor left
        and m.act_spec is None  # each sibling rounds x to its own activation grid
        and m.output_clamp is None  # an activation fused into the layer (lowbit.kernels.fuse_act)
        and m.act_block == first.act_block  # one activation quantization for the shared call
        and (m.in_features, m.bits, m.group_size, m.zeros is None) ==
            (first.in_features, first.bits, first.group_size, first.zeros is None)
        for m in members
    )


def fuse_shared_inputs(model: nn.Module) -> int:
    """Link the packed siblings of every registered parent in ``model``; returns the number of groups.

    Idempotent; run by ``quantize_`` and ``load_quantized``, so models from ``lowbit.quantize`` and
    ``lowbit.load`` get it. ``unfuse_shared_inputs`` undoes it.
    """
    groups = 0
    for parent in model.modules():
        name = qualname(type(parent))
        if name not in SHARED_INPUT_CHILDREN:
            continue
        for names in SHARED_INPUT_CHILDREN.get(name):
            members = [getattr(parent, n, None) for n in names]
            if not _fusable(members):
                continue
            group = SharedInputGroup(members)
            for i, m in enumerate(members):
                m.__dict__[GROUP_ATTR] = (group, i)
            invalidate_plans()  # a planned forward may have lowered a member on its own
            groups += 1
    return groups


def unfuse_shared_inputs(model: nn.Module) -> None:
    """Every packed linear of ``model`` computes on its own again."""
    for m in model.modules():
        m.__dict__.pop(GROUP_ATTR, None)
    invalidate_plans()


def _concat(members: list[QuantLinear]) -> tuple[PackedWeight, torch.Tensor | None]:
    """The siblings' packed rows stacked along N (same K and format: the stored rows, and offset storage's
    minima, simply concatenate)."""
    ps = [m.packed for m in members]
    zeros = None if ps[0].zeros is None else torch.cat([p.zeros for p in ps])  # type: ignore[misc]
    n = sum(p.out_features for p in ps)
    parts = (torch.cat([p.qweight for p in ps]), torch.cat([p.scales for p in ps]), zeros, ps[0].bits,
             ps[0].group_size, (n, ps[0].in_features))
    packed = OffsetPacked(*parts, torch.cat([p.offsets for p in ps])) if isinstance(ps[0], OffsetPacked) \
        else PackedWeight(*parts)  # type: ignore[attr-defined]
    biases = [m.bias for m in members]  # missing biases are zeros of the layer's width
    bias = None if all(b is None for b in biases) else torch.cat([
        torch.zeros(m.out_features) if m.bias is None else m.bias.detach().to(torch.float32) for m in members])
    return packed, bias


class SharedInputGroup:
    """Siblings computed by one kernel call; the first one called on an input serves the others."""

    def __init__(self, members: list[QuantLinear]) -> None:
        self.members = members
        self._prepared: tuple[tuple[Any, ...], Any, list[Any]] | None = None
        self._local = threading.local()  # pending outputs are per thread (concurrent forwards stay separate)

    def __getstate__(self) -> dict[str, Any]:
        # deepcopy / pickle: the members only (the prepared weight and pending outputs are rebuilt on use).
        return {"members": self.members}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["members"])  # type: ignore[misc]

    def _handle(self) -> Any:
        """The fused prepared weight (``fast.FastWeight``), rebuilt when any sibling's buffers change; None while
        the siblings' ``act_block`` differ (set after fusing: each then quantizes its input its own way)."""
        from lowbit.kernels import fast

        act_block = self.members[0].act_block
        if any(m.act_block != act_block for m in self.members):
            return None
        state = (tuple(fast.buffer_state(m) for m in self.members), act_block)
        hit = self._prepared
        if hit is not None and hit[0] == state:
            return hit[1]
        with torch.inference_mode(False), torch.no_grad():
            packed, bias = _concat(self.members)
            handle = fast.prepare(packed, bias, splits=[m.out_features for m in self.members], act_block=act_block)
        if handle.call is not None:
            # The group is only ever computed by its call: the stacked copy of the rows is not kept (its
            # description stays, on the meta device), and the siblings' memory-mapped rows, now in the
            # kernels' tiles, leave the resident set.
            extra = {"offsets": packed.offsets.to("meta")} if isinstance(packed, OffsetPacked) else {}
            handle = dataclasses.replace(handle, packed=dataclasses.replace(
                packed, qweight=packed.qweight.to("meta"), scales=packed.scales.to("meta"),
                zeros=None if packed.zeros is None else packed.zeros.to("meta"), **extra))
            for m in self.members:
                fast.release_packed(m.packed)
        # The buffers are kept alive with the state: their ids cannot be reused while it is compared.
        self._prepared = (state, handle, [list(m._buffers.values()) for m in self.members])
        return handle

    def _compute(self, handle: Any, x: torch.Tensor) -> list[torch.Tensor]:
        """Every sibling's output for ``x`` from the prepared call (views of one output)."""
        return handle.call.split(x)

    def outputs(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Every sibling's output for ``x`` [..., K] in one kernel call (a caller holding the whole group, e.g.
        ``lowbit.models.lean_decode``), or None if the kernels cannot serve them."""
        handle = self._handle()
        return None if handle is None or handle.call is None else self._compute(handle, x)

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """Sibling ``index``'s output for ``x`` [..., K], or None if the kernels cannot serve it (caller falls back)."""
        local = self._local
        pending = getattr(local, "pending", None)
        version = -1 if x.is_inference() else x._version
        if pending is not None and pending[0] is x and pending[1] == version:
            out = pending[2][index]
            if out is not None:
                pending[2][index] = None
                pending[3] -= 1
                if pending[3] == 0:
                    local.pending = None
                return out
        handle = self._handle()
        if handle is None or handle.call is None:
            return None
        outs = self._compute(handle, x)
        out = outs[index]
        outs[index] = None
        local.pending = [x, version, outs, len(outs) - 1] if len(outs) > 1 else None
        return out
