"""Load any model lowbit supports, packed checkpoints included, and list what can be loaded."""

from __future__ import annotations

import time
from typing import Any

from lowbit.eval.footprint import current_rss_mib, peak_rss_mib
from lowbit.models import FAMILIES, DualEncoder, builtin_models, load_model
from lowbit.paths import lowbit_home
from lowbit.workflows import packed  # noqa: F401  (registers the packed-checkpoint family)


def load(name_or_path: str, **options: Any) -> DualEncoder:
    """A built-in name, a family's directory, ``family:name`` or a packed lowbit directory, in eval mode.

    Options are the family loader's (e.g. ``heads`` for lit, ``prune_ratio`` for llava, ``backend`` for a
    packed directory) plus ``optimize`` and ``act_block``; anything else is refused with one line.
    """
    rss_before, start = current_rss_mib(), time.perf_counter()
    model = load_model(name_or_path, **options)
    peak = peak_rss_mib()
    # The peak is the process's high-water mark: the increase is the load's own only in a fresh process (as
    # benchmarks/bench_load.py runs it); later loads in a long process can only under-report.
    model.lowbit_load = {"seconds": round(time.perf_counter() - start, 3), "rss_before_mib": round(rss_before, 1),
                         "peak_rss_mib": round(peak, 1), "peak_increase_mib": round(max(peak - rss_before, 0.0), 1)}
    return model


def list_models() -> list[dict[str, str]]:
    """Built-in models, quantized checkpoints cached under ``$LOWBIT_HOME/models``, and families."""
    rows = [{"name": n, "kind": "built-in", "description": FAMILIES.get(f).description}
            for n, f in sorted(builtin_models().items())]
    for manifest in sorted((lowbit_home() / "models").glob("*/manifest.json")):
        rows.append({"name": str(manifest.parent), "kind": "cached", "description": "lowbit packed checkpoint"})
    rows += [{"name": f"{f}:<name or dir>", "kind": "family", "description": FAMILIES.get(f).description}
             for f in FAMILIES]
    return rows
