"""Named evaluation tasks and ``evaluate``: one call from a model to a JSON-ready result.

A task pairs a dataset with what is measured on it. Built in:

- ``fashion-mnist``: zero-shot classification on the Fashion-MNIST test set (all 10k unless ``limit``).
- ``fashion-mnist-retrieval``: image<->caption retrieval on the same images.
- ``shapes``: retrieval on the generated shapes test set, plus zero-shot on shape labels when present.
- ``zeroshot`` / ``retrieval``: the same measurements on any dataset given with ``data=`` (a dataset
  name or an image folder).
- ``fashion-vqa`` / ``shapes-vqa``: generative (llava) models answer generated questions about the test images;
  exact-match accuracy, time to first token / decode speed, next-token agreement and KL (``lowbit.eval.vqa``).
- ``text``: a language model on a text file (``data=``): perplexity; against a reference, llama.cpp's KL
  statistics (mean, 99th percentile, same top token) (``lowbit.eval.text``).

New tasks register with ``TASKS.register(name)(Task(...))``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from lowbit.data.base import ImageTextSet
from lowbit.errors import LowbitError
from lowbit.eval.env import environment
from lowbit.eval.fidelity import accuracy_kept, fidelity
from lowbit.eval.footprint import measure_footprint
from lowbit.eval.results import Result
from lowbit.eval.retrieval import retrieve
from lowbit.eval.text import text_tasks
from lowbit.eval.vqa import vqa_tasks
from lowbit.eval.zeroshot import zeroshot_classify
from lowbit.models.base import DualEncoder
from lowbit.registry import Registry

FOOTPRINT_SAMPLES = 32  # images/texts handed to the latency measurement (one batch of 32)

Runner = Callable[[DualEncoder, ImageTextSet, int, bool], Result]


@dataclass(frozen=True)
class Task:
    """A measurement (``run(model, data, batch_size, progress) -> Result``) on a dataset.

    ``dataset`` is the spec handed to ``lowbit.data.resolve_dataset``; None means the caller must pass
    ``data=`` to ``evaluate``.
    """

    name: str
    run: Runner
    dataset: str | None = None
    split: str = "test"
    description: str = ""
    # Generative tasks measure differently: footprint(model, data, checkpoint) and compare(ref, cand) replace
    # measure_footprint / fidelity; fidelity keys named in fidelity_metrics are also reported under metrics.
    footprint: Callable[..., dict[str, Any]] | None = None
    compare: Callable[[Result, Result], dict[str, Any]] | None = None
    fidelity_metrics: tuple[str, ...] = ()
    # (data spec, limit) -> the set, for tasks whose data is not an image dataset (the text task: a text file)
    loader: Callable[[Any, int | None], ImageTextSet] | None = None


def _zeroshot(model: DualEncoder, data: ImageTextSet, batch_size: int, progress: bool) -> Result:
    return zeroshot_classify(model, data, batch_size=batch_size, progress=progress)


def _retrieval(model: DualEncoder, data: ImageTextSet, batch_size: int, progress: bool) -> Result:
    return retrieve(model, data, batch_size=batch_size, progress=progress)


def _retrieval_and_zeroshot(
    model: DualEncoder, data: ImageTextSet, batch_size: int, progress: bool
) -> Result:
    """Retrieval always; zero-shot too when the set is labelled. Fidelity then uses the class predictions."""
    ret = _retrieval(model, data, batch_size, progress)
    if data.labels is None or not data.classnames:
        return ret
    zs = _zeroshot(model, data, batch_size, progress)
    # Both report "n"; the image count is the same, so one value suffices.
    return Result({**ret, **zs}, zs.outputs)


TASKS: Registry[Task] = Registry("task")
for _task in (
    Task("fashion-mnist", _zeroshot, "fashion-mnist", description="zero-shot top-1/top-5, Fashion-MNIST"),
    Task("fashion-mnist-retrieval", _retrieval, "fashion-mnist", description="retrieval R@1/5/10"),
    Task("shapes", _retrieval_and_zeroshot, "shapes", description="retrieval (+ zero-shot if labelled)"),
    Task("zeroshot", _zeroshot, None, description="zero-shot classification on data=<name or folder>"),
    Task("retrieval", _retrieval, None, description="image<->text retrieval on data=<name or folder>"),
    *vqa_tasks(Task),
    *text_tasks(Task),
):
    TASKS.register(_task.name)(_task)


DataSpec = str | os.PathLike[str] | ImageTextSet


def _load_data(task: Task, data: DataSpec | None, limit: int | None) -> ImageTextSet:
    if task.dataset is not None and data is not None:
        raise LowbitError(
            f"task {task.name!r} always uses the {task.dataset!r} dataset; received data={str(data)!r}; "
            "accepted: no data=, or task 'zeroshot'/'retrieval' with data="
        )
    spec = task.dataset if task.dataset is not None else data
    if spec is not None and task.loader is not None:
        return task.loader(spec, limit)
    if spec is None:
        raise LowbitError(
            f"task {task.name!r} needs data=; received none; accepted: a dataset name (e.g. 'fashion-mnist', "
            "'shapes') or an image folder path"
        )
    if isinstance(spec, ImageTextSet):
        return spec.subset(limit)
    from lowbit.data import resolve_dataset  # imported late: loading datasets pulls in their dependencies

    # subset() again in case a loader treats limit as a hint; it is a no-op when already short enough.
    return resolve_dataset(os.fspath(spec), split=task.split, limit=limit).subset(limit)


@contextlib.contextmanager
def _eval_mode(model: DualEncoder) -> Iterator[None]:
    """Dropout off while measuring; the caller's train/eval state is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _sample_texts(data: ImageTextSet) -> list[str]:
    if data.captions:
        return data.captions[:FOOTPRINT_SAMPLES]
    template = data.templates[0] if data.templates else "{}"
    return [template.replace("{}", c, 1) for c in (data.classnames or [])][:FOOTPRINT_SAMPLES]


def check_task_and_data(task: str, data: str | None = None) -> None:
    """Fail fast (before seconds of model loading) on an unknown task or a data spec that is neither a registered
    dataset nor an existing path."""
    from pathlib import Path

    from lowbit.data import DATASETS

    TASKS.get(task)
    if data and data not in DATASETS and not Path(data).exists():
        raise LowbitError(f"data {data!r} is neither a dataset ({', '.join(DATASETS.names())}) nor an "
                          "existing folder/index file (a folder with captions.csv, labels.csv or .jsonl)")


def evaluate(
    model: DualEncoder,
    task: str,
    *,
    limit: int | None = None,
    data: DataSpec | None = None,
    reference: DualEncoder | Result | None = None,
    footprint: bool = True,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Evaluate ``model`` on a named task; returns a JSON-ready dict.

    Keys: ``model``, ``task``, ``metrics`` (``top1``... for classification, ``i2t_r1``/``t2i_r1``... for
    retrieval), ``footprint`` (if ``footprint``; ``disk_bytes`` from ``checkpoint_dir``), ``fidelity`` (if
    ``reference`` — a model, or what evaluate() returned for it on the same task — is given), ``data`` (``name``,
    ``n``, ``skipped``, ``split``), ``env`` and ``seconds``. ``limit`` keeps the first ``limit`` samples.

    Example:
        >>> r = evaluate(int4_model, "fashion-mnist", limit=1000, reference=fp32_model)  # doctest: +SKIP
        >>> ref = evaluate(fp32_model, "fashion-mnist")  # doctest: +SKIP
        >>> r["metrics"]["top1"], r["fidelity"]["agreement"], r["footprint"]["weight_bytes"]  # doctest: +SKIP
        (0.69, 0.95, 75563008)
    """
    spec = TASKS.get(task)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise LowbitError(f"limit must be a positive integer; received {limit!r}; accepted: >= 1 or None")
    if batch_size < 1:
        raise LowbitError(f"batch_size must be positive; received {batch_size!r}; accepted: >= 1")
    start = time.perf_counter()
    dataset = _load_data(spec, data, limit)
    if len(dataset) == 0 and not dataset.captions:
        raise LowbitError(f"dataset {dataset.name!r} has no usable images; received 0; accepted: >= 1 image")

    with _eval_mode(model):
        result = spec.run(model, dataset, batch_size, progress)
    out: dict[str, Any] = {
        "model": getattr(model, "source", {}).get("name"),
        "task": task,
        "metrics": dict(result),
    }
    if footprint and spec.footprint is not None:
        out["footprint"] = spec.footprint(model, dataset, checkpoint=checkpoint_dir, progress=progress)
    elif footprint:
        out["footprint"] = measure_footprint(
            model,
            dataset.images[:FOOTPRINT_SAMPLES],
            _sample_texts(dataset),
            checkpoint=checkpoint_dir,
            progress=progress,
        )
    if reference is not None:
        if isinstance(reference, Result):  # what an earlier evaluate() of the reference returned, same task/data
            ref_name, ref = reference.get("model"), Result(reference["metrics"], reference.outputs)
        else:
            with _eval_mode(reference):
                ref = spec.run(reference, dataset, batch_size, progress)
            ref_name = getattr(reference, "source", {}).get("name")
        compared = (spec.compare or fidelity)(ref, result)
        out["fidelity"] = {"reference_model": ref_name, **accuracy_kept(ref, result), **compared}
        out["metrics"].update({k: compared[k] for k in spec.fidelity_metrics if k in compared})
    out["data"] = {"name": dataset.name, "n": len(dataset), "skipped": dataset.skipped, "split": spec.split}
    out["env"] = environment()
    out["seconds"] = round(time.perf_counter() - start, 3)
    return Result(out, result.outputs)  # outputs ride along (not in JSON): reusable as a later ``reference``
