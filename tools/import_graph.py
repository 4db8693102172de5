"""lowbit's import graph: upward imports across the layers and import cycles between modules.

Reads every module under ``src/lowbit`` with ``ast`` (nothing is imported or executed) and follows every
``import`` statement, including the ones inside functions (lazy imports still tie the modules together);
imports under ``if TYPE_CHECKING:`` are left out, since they never run.

Usage:
    python tools/import_graph.py            # counts, then each upward import and each cycle
    python tools/import_graph.py --quiet    # counts only

The layers, top to bottom (a module may import its own layer and any layer below it):

    cli -> api -> workflows -> train -> eval -> quant -> models -> kernels | data -> base

and the CLI is a layer over the API only: ``lowbit.cli`` imports ``lowbit.api``, the base modules and itself.

``tests/test_layers.py`` runs the same check and fails on any upward import or cycle.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "lowbit"

# Layer rank by the first component under ``lowbit``; higher may import lower, never the reverse.
# kernels and data are siblings (neither imports the other). Training may evaluate (eval is below train).
LAYERS: dict[str, tuple[int, str]] = {
    "cli": (9, "cli"),
    "__init__": (8, "api"),
    "api": (8, "api"),
    "workflows": (7, "workflows"),
    "train": (6, "train"),
    "eval": (5, "eval"),
    "quant": (4, "quant"),
    "models": (3, "models"),
    "kernels": (2, "kernels"),
    "runtime": (2, "kernels"),  # the torch-free runtime: the kernels' core without torch (kernels may import it)
    "data": (2, "data"),
    "registry": (1, "base"),
    "errors": (1, "base"),
    "io": (1, "base"),
    "limits": (1, "base"),
    "paths": (1, "base"),
    "version": (1, "base"),
}
CLI_MAY_IMPORT = ("api", "base", "cli")


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out: dict[str, Path] = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import node, skipping ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_edges(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the lowbit modules it imports (``from a import b`` counts ``a.b`` when that is a module)."""
    files = module_files(root)
    edges: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        for node in _imports(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                target = _resolve(module, is_package, node)
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in files]
                targets = subs if len(subs) == len(node.names) else [target, *subs]
            for target in targets:
                while target and target not in files:  # ``import lowbit.x.y`` of a non-module attribute
                    target = target.rpartition(".")[0]
                if target.startswith(PACKAGE) and target != module:
                    edges[module].add(target)
    return edges


def layer_of(module: str) -> tuple[int, str]:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    if key not in LAYERS:
        raise KeyError(f"{module}: no layer for lowbit.{key}; add it to LAYERS in tools/import_graph.py")
    return LAYERS[key]


def upward_imports(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs where the imported module sits in a higher layer, in a sibling package of the
    same rank (kernels <-> data), or, from the CLI, anywhere but the API and the base modules."""
    bad = []
    for src, targets in edges.items():
        rank, name = layer_of(src)
        for dst in sorted(targets):
            dst_rank, dst_name = layer_of(dst)
            if dst_rank > rank or (dst_rank == rank and dst_name != name):
                bad.append((src, dst))
            elif name == "cli" and dst_name not in CLI_MAY_IMPORT:
                bad.append((src, dst))  # the CLI is a layer over the API only
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def main(argv: list[str]) -> int:
    edges = import_edges()
    up = upward_imports(edges)
    cyc = cycles(edges)
    n_cyc_modules = sum(len(c) for c in cyc)
    print(f"modules: {len(edges)}  imports: {sum(map(len, edges.values()))}  upward imports: {len(up)}  "
          f"cycles: {len(cyc)} (modules in them: {n_cyc_modules})")
    if "--quiet" not in argv:
        for src, dst in up:
            print(f"  upward: {src} -> {dst}  ({layer_of(src)[1]} -> {layer_of(dst)[1]})")
        for c in cyc:
            print(f"  cycle: {' <-> '.join(c)}")
    return 1 if up or cyc else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
