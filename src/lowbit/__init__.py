"""lowbit: low-bit vision-language models on ordinary CPUs.

The public API is a handful of verbs (``load``, ``evaluate``, ``quantize``, ``save``, ``sweep``, ``build``);
each imports its room lazily, so ``import lowbit`` pulls in no training, serving or benchmark dependencies.

Example:
    >>> import lowbit
    >>> model = lowbit.load("lit-fashion")  # doctest: +SKIP
    >>> lowbit.evaluate(model, "fashion-mnist", limit=500)["metrics"]["top1"]  # doctest: +SKIP
"""

from lowbit.api import (
    bench_kernels,
    bench_model,
    build,
    chat,
    demo,
    evaluate,
    export,
    finetune,
    list_models,
    load,
    qat,
    quantize,
    quantize_,
    save,
    sweep,
)
from lowbit.errors import LowbitError
from lowbit.version import __version__

__all__ = [
    "LowbitError", "bench_kernels", "bench_model", "build", "chat", "demo", "evaluate", "export", "finetune",
    "list_models", "load", "qat", "quantize", "quantize_", "save", "sweep", "__version__",
]
