"""The layering holds: no module imports a layer above its own, and no two modules import each other through
any chain (``tools/import_graph.py``, which also prints the offenders)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "import_graph.py"


def _tool():
    spec = importlib.util.spec_from_file_location("import_graph", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["import_graph"] = module
    spec.loader.exec_module(module)
    return module


def test_no_upward_import_and_no_cycle():
    graph = _tool()
    edges = graph.import_edges()
    assert len(edges) > 100  # the whole package was read
    assert graph.upward_imports(edges) == []
    assert graph.cycles(edges) == []


def test_the_check_catches_an_upward_import_and_a_cycle(tmp_path):
    graph = _tool()
    pkg = tmp_path / "lowbit"
    for rel, text in {
        "__init__.py": "", "api.py": "", "errors.py": "",
        "models/__init__.py": "", "models/a.py": "def f():\n    from lowbit.models import b\n",
        "models/b.py": "from lowbit.models.a import f\nfrom lowbit import api\n",
        "kernels/__init__.py": "", "kernels/k.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                                   "    from lowbit.models import a\n",
        "cli/__init__.py": "from lowbit.models import a\nfrom lowbit import api\n",
    }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    edges = graph.import_edges(tmp_path)
    assert graph.upward_imports(edges) == [("lowbit.cli", "lowbit.models.a"), ("lowbit.models.b", "lowbit.api")]
    assert graph.cycles(edges) == [["lowbit.models.a", "lowbit.models.b"]]
    assert edges["lowbit.kernels.k"] == set()  # type-checking imports never run


def test_importing_lowbit_stays_light():
    import subprocess

    code = ("import sys, lowbit; heavy = [m for m in ('torch', 'transformers', 'matplotlib', 'onnxruntime') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == ""
