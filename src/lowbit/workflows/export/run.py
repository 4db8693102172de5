"""Export from a name, a directory or a loaded model (quantizing first when a recipe is given)."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from lowbit.workflows.export import check_export_output, export


def export_model(model: Any, format: str, out: str | os.PathLike[str], recipe: str | None = None,
                 calib_data: str | None = None, overwrite: bool = False, **options: Any) -> dict[str, Any]:
    """``lowbit.export``: load ``model`` when it is a name or path, quantize it with ``recipe`` if given, export."""
    from lowbit.workflows.load import load

    if isinstance(model, (str, os.PathLike)):
        check_export_output(format, out, overwrite, (str(model),))  # before seconds of loading

    loaded: nn.Module = load(str(model)) if isinstance(model, (str, os.PathLike)) else model
    if recipe is not None:
        from lowbit.workflows.quantize import quantize

        kwargs = {} if calib_data is None else {"calib_data": calib_data}
        quantize(loaded, recipe, progress=False, **kwargs)
    report = export(loaded, format, out, overwrite=overwrite, **options)
    if recipe is not None:
        report["recipe"] = recipe
    return report
