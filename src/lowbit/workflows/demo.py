"""The main job: the default model quantized and measured side by side with its float self.

fp32, fp16 (the cheapest compression a user has), w8 and w4 (the presets: GPTQ for the 4-bit layers, quantized
embeddings, fp16 floats) of ``lit-fashion``, each saved, loaded back and evaluated on Fashion-MNIST zero-shot:
accuracy, whole-file bytes, image-encoding latency at batch 1 and 32 (the sweep's rows), plus the
accuracy-vs-bytes plot. Takes a few minutes on 2 cores; ``limit`` evaluates the first N test images only.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from lowbit.workflows.sweep import sweep

DEMO_MODEL = "lit-fashion"
DEMO_PAIRS = (("w8", "rtn"), ("w4", "gptq"))


def demo(limit: int | None = None, out_dir: str | None = None, progress: bool = True,
         overwrite: bool = False) -> list[dict[str, Any]]:
    """The sweep rows of ``DEMO_PAIRS`` on ``DEMO_MODEL`` (recomputed, never resumed); with ``out_dir`` also
    ``sweep.json``, ``sweep.md`` and ``sweep.png`` there."""
    with tempfile.TemporaryDirectory(prefix="lowbit-demo-") as tmp:
        out = Path(out_dir) if out_dir else Path(tmp)
        return sweep(DEMO_MODEL, [], [], "fashion-mnist", out, limit=limit, pairs=list(DEMO_PAIRS), resume=False,
                     progress=progress, overwrite=overwrite)
