"""End-to-end latency of a model and, for a packed checkpoint, of its float source in the same run."""

from __future__ import annotations

from typing import Any

from lowbit.data import resolve_dataset
from lowbit.eval.footprint import measure_footprint
from lowbit.workflows.load import load


def bench_model(name_or_path: str, batch_sizes: tuple[int, ...] = (1, 32), optimize: bool = False,
                act_block: int | str | None = None) -> dict[str, Any]:
    """Footprint and latency of ``name_or_path``; for a packed checkpoint also its float source's, and the ratio.

    ``optimize`` loads both with ``optimize=True`` so the ratio compares like with like.
    """
    data = resolve_dataset("fashion-mnist", split="test", limit=32)
    texts = [t.format(c) for c in (data.classnames or []) for t in data.templates][:32]
    model = load(name_or_path, optimize=optimize, act_block=act_block)
    packed_dir = model.source.get("checkpoint")
    result: dict[str, Any] = {
        "model": name_or_path, "task": "bench", "optimized": optimize, "act_block": act_block,
        "footprint": measure_footprint(model, data.images, texts, checkpoint=packed_dir, batch_sizes=batch_sizes),
    }
    float_source = model.source.get("float_source")
    if float_source:
        reference = load(float_source["name"], **{**float_source.get("options", {}), "optimize": optimize})
        ref = measure_footprint(reference, data.images, texts, batch_sizes=batch_sizes)
        result["float_footprint"] = ref
        result["speedup"] = {k: ref[k] / result["footprint"][k] for k in ref
                             if k.endswith(tuple(f"_b{b}" for b in batch_sizes)) and result["footprint"].get(k)}
    return result
