"""Module graphs for the inference transforms: which module feeds which, read with ``torch.fx``, never from names.

``module_graphs(model, wanted)`` symbolically traces the largest subtrees of ``model`` that hold a module
``wanted`` accepts: the model itself if its forward traces, else each child holding one, recursively (a
forward with data-dependent control flow does not trace; its own direct children are then out of reach and
the subtree is listed as untraced). Convs, packed layers and BatchNorms are leaves (their forwards hold
shape-dependent branches), as are torch's own modules and the ``wanted`` ones. The graphs only locate modules
and their data flow: the model keeps running its own forward, and a graph records the path the current
configuration takes (branches on Python attributes are taken as they are now).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

from lowbit.kernels.quant_linear import QuantLinear


class _LeafTracer(fx.Tracer):
    def __init__(self, wanted: Callable[[nn.Module], bool]) -> None:
        super().__init__()
        self.wanted = wanted

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # wanted modules are leaves too: a registered class outside torch.nn (e.g. a family's clamp activation)
        # must appear as one call, not as the ops of its forward
        return isinstance(m, (nn.Conv2d, QuantLinear, nn.modules.batchnorm._BatchNorm)) or self.wanted(m) \
            or super().is_leaf_module(m, qualname)


@dataclass
class ModuleGraph:
    """The fx graph of the subtree ``root`` at full path ``prefix``; ``calls`` counts call sites per module target."""

    prefix: str
    root: nn.Module
    graph: fx.Graph
    calls: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.calls = Counter(str(n.target) for n in self.graph.nodes if n.op == "call_module")

    def module(self, node: object) -> nn.Module | None:
        """The module a ``call_module`` node calls, else None."""
        if not isinstance(node, fx.Node) or node.op != "call_module":
            return None
        return self.root.get_submodule(str(node.target))

    def path(self, node: fx.Node) -> str:
        """Full path (in the whole model) of a ``call_module`` node's module."""
        return join(self.prefix, str(node.target))


def trace_module(root: nn.Module, wanted: Callable[[nn.Module], bool]) -> fx.Graph:
    """The fx graph of ``root``'s forward with the ``wanted`` modules as leaves (raises where it does not trace)."""
    return _LeafTracer(wanted).trace(root)


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def fresh_source(g: ModuleGraph, node: object, fresh: tuple[type[nn.Module], ...]) -> fx.Node | None:
    """The ``call_module`` node of a ``fresh`` module (one that returns a new tensor per call) whose output
    reaches ``node`` along a chain of identities (``FoldedBatchNorm``), every step read by its single user; None
    if there is no such chain (another node also reads a value on the way, or something else produced it)."""
    while isinstance(node, fx.Node) and len(node.users) == 1:
        m = g.module(node)
        if isinstance(m, nn.Identity) and len(node.args) == 1:
            node = node.args[0]  # an identity returns its input object: follow it back
        else:
            return node if isinstance(m, fresh) else None
    return None


def called_outside(model: nn.Module, graphs: list[ModuleGraph]) -> set[int]:
    """ids of the modules of ``model`` that also live outside every traced subtree (their call sites there are
    unseen by the graphs)."""
    traced = [g.prefix for g in graphs]
    return {id(m) for path, m in model.named_modules(remove_duplicate=False)
            if not any(path == p or path.startswith(f"{p}.") or not p for p in traced)}


def module_graphs(model: nn.Module, wanted: Callable[[nn.Module], bool],
                  prefix: str = "") -> tuple[list[ModuleGraph], list[str]]:
    """(graphs of the traceable subtrees holding a ``wanted`` module, paths of untraced subtrees directly holding
    one)."""
    if not any(wanted(m) for m in model.modules()):
        return [], []
    try:
        return [ModuleGraph(prefix, model, trace_module(model, wanted))], []
    except Exception:  # noqa: BLE001 - any forward fx cannot trace (data-dependent control flow, ...): go down
        graphs: list[ModuleGraph] = []
        untraced: list[str] = []
        for name, child in model.named_children():
            if wanted(child):
                if prefix not in untraced:
                    untraced.append(prefix)  # who feeds this child is unknown
                continue
            g, u = module_graphs(child, wanted, join(prefix, name))
            graphs += g
            untraced += u
        return graphs, untraced
