"""``lowbit export``: a lowbit model written in a format another runtime runs (GGUF, ONNX, HF compressed-tensors).

One file per format (``gguf.py``, ``onnx.py``, ``hf.py``), each ending in one ``register_export(ExportFormat(...))``;
every module of this package is imported on the first export, so adding the file is the whole registration.
A format's ``write(model, tmp, options) -> report`` writes into a temporary path; ``export`` renames it onto
``out`` only when the writer succeeded, so a failed or interrupted export never leaves a partial file under the
final name and an existing output survives.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lowbit.errors import LowbitError, check_options
from lowbit.io import OutputKind, atomic_path, check_output, register_output_kind, write_marker
from lowbit.registry import Registry

__all__ = ["EXPORT_FORMATS", "ExportFormat", "export", "register_export"]


@dataclass(frozen=True)
class ExportFormat:
    """One export target.

    Attributes:
        name: the ``--format`` value.
        description: one line: what runs the result.
        write: ``(model, tmp_path, options) -> report`` (a JSON-ready dict); raises ``LowbitError`` for a model
            the format cannot take, naming the layer and what would work.
        is_dir: whether the output is a directory (else one file).
        options: the option names ``write`` accepts (validated before any work).
        suffix: the file name ending users expect (a hint in errors; not enforced).
        magic: the first bytes of a file output (recognises an earlier export ``out`` may replace; a directory
            output is recognised by lowbit's ``.lowbit-output`` marker instead).
    """

    name: str
    description: str
    write: Callable[[nn.Module, Path, Mapping[str, Any]], dict[str, Any]]
    is_dir: bool = False
    options: tuple[str, ...] = field(default_factory=tuple)
    suffix: str = ""
    magic: bytes = b""

    @property
    def output_kind(self) -> str:
        return f"export-{self.name}"


EXPORT_FORMATS: Registry[ExportFormat] = Registry("export format")
_NOT_FORMATS = frozenset({"run"})  # modules of this package that are not formats


def register_export(fmt: ExportFormat) -> ExportFormat:
    """Add a format to ``EXPORT_FORMATS`` (the one registration of a new export format)."""
    register_output_kind(OutputKind(fmt.output_kind, is_dir=fmt.is_dir, recognize=None if fmt.is_dir else
                                    lambda p: bool(fmt.magic) and _starts_with(p, fmt.magic)))
    return EXPORT_FORMATS.register(fmt.name)(fmt)


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


def check_export_output(format: str, out: str | os.PathLike[str], overwrite: bool = False,
                        sources: tuple[str, ...] = ()) -> ExportFormat:
    """The format of ``--format`` after ``out`` was judged (``lowbit.io.check_output``): before any work."""
    _load_formats()
    fmt = EXPORT_FORMATS.get(format)
    check_output(out, fmt.output_kind, overwrite=overwrite, sources=sources)
    return fmt


def _load_formats() -> None:
    """Import every format module of this package (on first use: each registers its row)."""
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _NOT_FORMATS:
            importlib.import_module(f"{__name__}.{info.name}")


def export(model: nn.Module, format: str, out: str | os.PathLike[str], overwrite: bool = False,
           **options: Any) -> dict[str, Any]:
    """Write ``model`` (a loaded lowbit model, packed or float) as ``format`` to ``out``, atomically.

    ``out`` may replace only an earlier export of the same format (or an empty directory) unless ``overwrite``,
    and is never the directory the model came from. Returns the writer's report, with ``format`` and ``out``
    and the written size (``file_bytes``) added.
    """
    from lowbit.kernels.attn_quant import AttnQuant
    from lowbit.workflows.checkpoint import model_sources

    fmt = check_export_output(format, out, overwrite, tuple(model_sources(model)))
    check_options(f"export --format {format}", options, fmt.options)
    quantized_inputs = [name for name, m in model.named_modules()
                        if getattr(m, "act_spec", None) is not None or isinstance(m, AttnQuant)]
    if quantized_inputs:  # the formats carry weights only: the activation grids would be dropped silently
        raise LowbitError(f"export --format {format}: {len(quantized_inputs)} module(s) quantize their activations "
                          f"or attention (first: {quantized_inputs[0]}), which {format} files do not carry; "
                          "export a recipe without activations (a16) or attention=")
    target = Path(out)
    with atomic_path(target, is_dir=fmt.is_dir) as tmp:
        if fmt.is_dir:
            write_marker(tmp, fmt.output_kind)
        report = dict(fmt.write(model, tmp, options))
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file()) if target.is_dir() else target.stat().st_size
    return {"format": format, "out": str(target), "file_bytes": size, **report}
