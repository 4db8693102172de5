"""The verbs users call, each a one-liner over ``lowbit.workflows`` (or a package, where one call does it).

``import lowbit`` stays light: every verb imports what it needs when called. The CLI (``lowbit.cli``) imports
this module only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowbit.errors import check_options, keyword_parameters
from lowbit.quant.defaults import DEFAULT_CALIB_SAMPLES

if TYPE_CHECKING:
    from PIL import Image
    from torch import nn

    from lowbit.models.base import DualEncoder
    from lowbit.quant.recipe import Recipe
    from lowbit.quant.report import QuantReport
    from lowbit.runtime.lite import LiteLM

__all__ = [
    "DEFAULT_CALIB_SAMPLES", "bench_kernels", "bench_model", "build", "chat", "check_checkpoint_output",
    "check_task_and_data", "demo",
    "evaluate", "export", "finetune", "format_table", "list_models", "load", "load_lite", "markdown_table",
    "open_image", "qat",
    "quantize", "quantize_", "save", "search", "serve", "shard_dataset", "sweep", "sweep_table", "train_clip",
]


def load(name_or_path: str, **options: Any) -> DualEncoder:
    """Load a model: built-in name (``lit-fashion``), CLIP/SigLIP or Llava directory, or lowbit packed directory.

    Unknown options are refused with one line naming the accepted ones.

    Example:
        >>> import lowbit
        >>> model = lowbit.load("lit-fashion")  # doctest: +SKIP
    """
    from lowbit.workflows.load import load as run

    return run(name_or_path, **options)


def evaluate(model: DualEncoder, task: str, **options: Any) -> dict[str, Any]:
    """Evaluate ``model`` on a registered task; returns the JSON-ready result (see ``lowbit.eval.evaluate``).

    Example:
        >>> result = lowbit.evaluate(model, "fashion-mnist", limit=1000)  # doctest: +SKIP
        >>> result["metrics"]["top1"]  # doctest: +SKIP
    """
    from lowbit.eval.tasks import evaluate as run

    check_options("evaluate", options, keyword_parameters(run, skip=("model", "task")))
    return run(model, task, **options)


def check_task_and_data(task: str, data: str | None = None) -> None:
    """Raise ``LowbitError`` at once for an unknown task or a data spec that names nothing."""
    from lowbit.eval.tasks import check_task_and_data as run

    run(task, data)


def quantize(model: DualEncoder, recipe: str | Recipe, calib_data: Any = None,
             calib_samples: int = DEFAULT_CALIB_SAMPLES, strict: bool = False, progress: bool = True) -> QuantReport:
    """Quantize ``model`` in place with a recipe (preset, YAML path or short string); returns the report.

    Calibration data is drawn from ``calib_data`` (a dataset name, an image folder, captions CSV/JSONL, shards,
    a text or chat-JSONL file) only when a rule's method needs it (GPTQ, AWQ); None: the family's own set, or
    the domain-general default (see ``lowbit.workflows.quantize``). The report records which.

    Example:
        >>> report = lowbit.quantize(model, "vision=w4g64:gptq,text=w4g64:gptq,projector=w8")  # doctest: +SKIP
    """
    from lowbit.workflows.quantize import quantize as run

    return run(model, recipe, calib_data, calib_samples=calib_samples, strict=strict, progress=progress)


def quantize_(module: nn.Module, recipe: str | Recipe, calibration: Any = None, strict: bool = False,
              progress: bool = True) -> QuantReport:
    """Quantize any ``nn.Module`` in place (torchao style); returns the report listing every layer.

    A module without ``towers()`` is one tower, ``model``: rules match the dotted module path by glob and the
    layer kind (``*/features.*@conv=w8``, ``*=w4g32``); a recipe matching no layer is an error naming a few real
    paths. ``calibration`` (for GPTQ/AWQ): example inputs (a tensor, or a list of tensors / argument tuples /
    keyword dicts), a ``CalibrationProvider``, or for a lowbit model a dataset. A transformers model saved with
    ``lowbit.save`` loads back by path (``lowbit.load(dir)``) from its config and packed tensors.

    Example:
        >>> report = lowbit.quantize_(cnn, "*=w4g32:gptq", calibration=torch.randn(16, 3, 32, 32))  # doctest: +SKIP
    """
    from lowbit.workflows.quantize import quantize as run

    return run(module, recipe, calibration, strict=strict, progress=progress)


def save(model: DualEncoder, out_dir: str | os.PathLike[str], report: QuantReport | None = None,
         overwrite: bool = False) -> Path:
    """Write a packed checkpoint (safetensors + architecture files + manifest.json) atomically; returns its
    directory. ``report`` is not needed for a model loaded from a packed directory (re-saved byte for byte).

    ``out_dir`` may replace only a packed checkpoint (or an empty directory) unless ``overwrite``, and never the
    model's source directory."""
    from lowbit.workflows.quantize import save as run

    return run(model, out_dir, report=report, overwrite=overwrite)


def check_checkpoint_output(out_dir: str | os.PathLike[str], source: str | None = None,
                            overwrite: bool = False) -> None:
    """Refuse at once an ``out_dir`` that ``save`` would refuse (before minutes of quantizing)."""
    from lowbit.io import check_output
    from lowbit.workflows.checkpoint import is_packed_checkpoint  # noqa: F401  (registers the output kind)

    check_output(out_dir, "packed-checkpoint", overwrite=overwrite, sources=[source])


def sweep(model_name: str, recipes: list[str], methods: list[str], task: str, out_dir: str | os.PathLike[str],
          **options: Any) -> list[dict[str, Any]]:
    """Quantize with every recipe x method, evaluate each against the float model, write JSON/Markdown/PNG.

    Example:
        >>> rows = lowbit.sweep("lit-fashion", ["w4"], ["rtn", "gptq"], "fashion-mnist", "out/s")  # doctest: +SKIP
    """
    from lowbit.workflows.sweep import sweep as run

    check_options("sweep", options, keyword_parameters(run)[5:])
    return run(model_name, recipes, methods, task, out_dir, **options)


def search(model: str | nn.Module, **options: Any) -> dict[str, Any]:
    """A mixed-precision recipe under one budget (``budget_bits``, ``budget_mb`` or ``budget_ms``): per-layer
    widths from measured, cached sensitivities; ``out`` writes the YAML recipe (see ``lowbit.workflows.search``).

    Example:
        >>> result = lowbit.search("lit-fashion", budget_bits=3.0, out="lit-3bit.yaml")  # doctest: +SKIP
    """
    from lowbit.workflows.search import search as run

    check_options("search", options, keyword_parameters(run, skip=("model",)))
    return run(model, **options)


def qat(model_name: str, recipe: str, out_dir: str | os.PathLike[str], **options: Any) -> dict[str, Any]:
    """Quantization-aware training with distillation from the float model; writes a packed model to OUT/model.

    ``options``: ``loss`` and ``block_ap`` (dicts or ``QATLoss`` / ``BlockAPStage``) and the other fields of
    ``lowbit.workflows.qat.QATArgs`` (data, steps, lr, batch_size, ...).

    Example:
        >>> lowbit.qat("lit-fashion", "text=w1:binary", "out/qat", steps=150)  # doctest: +SKIP
    """
    from lowbit.workflows.qat import qat as run

    return run(model_name, recipe, out_dir, **options)


def finetune(model_name: str, out_dir: str | os.PathLike[str], **options: Any) -> dict[str, Any]:
    """QLoRA: LoRA adapters trained on a (packed) model without un-packing it; adapters saved in PEFT format to
    OUT/adapters, optionally merged into a new packed checkpoint OUT/model (``merge=True``).

    ``options``: the fields of ``lowbit.workflows.finetune.FinetuneArgs`` (lora, targets, alpha, dropout, data,
    steps, lr, batch_size, teacher, distill, merge, ...).

    Example:
        >>> lowbit.finetune("runs/w2", "runs/ft", lora=8, targets="vision@conv1x1")  # doctest: +SKIP
    """
    from lowbit.workflows.finetune import finetune as run

    return run(model_name, out_dir, **options)


def train_clip(data: str, out_dir: str | os.PathLike[str], **options: Any) -> dict[str, Any]:
    """Pre-train a ViT dual encoder from scratch (``lowbit.train.clip_train.ClipTrainArgs`` fields as options).

    Example:
        >>> lowbit.train_clip("fashion-mnist,shapes", "runs/tiny", steps=2000)  # doctest: +SKIP
    """
    from lowbit.workflows.train_clip import train_clip as run

    return run(data, out_dir, **options)


def shard_dataset(src: str, out_dir: str | os.PathLike[str], **options: Any) -> dict[str, Any]:
    """Write a dataset as webdataset tar shards (options: shard_size, split, limit, image_format)."""
    from lowbit.workflows.shards import shard_dataset as run

    check_options("shard_dataset", options, keyword_parameters(run)[2:])
    return run(src, out_dir, **options)


def build(name: str = "lit-fashion", out: str | os.PathLike[str] | None = None, seed: int = 0,
          steps: int | None = None, overwrite: bool = False, **options: Any) -> dict[str, Any]:
    """Re-train the trained parts of a built-in model (``lowbit.workflows.builders``); returns the build log.

    ``lit-fashion`` options: ``n_train``, ``n_test``; ``llava-fashion(-hd)``: ``run_dir`` (checkpoints; resumes).
    """
    from lowbit.workflows.builders import build as run

    return run(name, out=out, seed=seed, steps=steps, overwrite=overwrite, **options)


def bench_kernels(json_path: str | os.PathLike[str] | None = None, quick: bool = False) -> list[dict[str, Any]]:
    """Time every packed format against torch and ONNX Runtime baselines, interleaved in one run.

    ``quick`` times two shapes at M in {1, 16} with few repeats (a smoke run); the full run takes minutes.
    """
    from lowbit.workflows.bench_kernels import bench_kernels as run

    return run(json_path=json_path, quick=quick)


def bench_model(name_or_path: str, batch_sizes: tuple[int, ...] = (1, 32), optimize: bool = False,
                act_block: int | str | None = None) -> dict[str, Any]:
    """End-to-end latency of a model; for a packed checkpoint also of its float source, with the ratio.

    ``optimize`` loads both with ``optimize=True`` (``lowbit.kernels.inference.optimize_for_inference_``: BatchNorm
    folding, the depthwise kernel, fused activations), so the ratio compares like with like. ``act_block``: the
    packed layers' activation quantization blocks (``lowbit.kernels.quant_linear.set_act_block``).

    Example:
        >>> lowbit.bench_model("out/w4")["speedup"]["image_ms_b32"]  # doctest: +SKIP
    """
    from lowbit.workflows.bench_model import bench_model as run

    return run(name_or_path, batch_sizes=batch_sizes, optimize=optimize, act_block=act_block)


def chat(model: Any, image: Any, question: str, **options: Any) -> str:
    """Answer ``question`` about ``image`` (PIL image, path or bytes) with a generative (llava) model, or
    ``question`` alone (``image=None``) with a text-only language model (a causal-LM directory or .gguf file).

    ``model`` is a loaded model or a name/directory; ``options``: ``max_new_tokens``, ``do_sample``,
    ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stream`` (a callable receiving text pieces), and for a
    llava ``use_cache``, ``kv_bits``.

    Example:
        >>> lowbit.chat("llava-fashion-hd", "shoe.png", "What is this item?")  # doctest: +SKIP
        'sneaker'
        >>> lowbit.chat("models/qwen3-0.6b", None, "Name a colour.")  # doctest: +SKIP
    """
    from lowbit.workflows.chat import chat as run

    return run(model, image, question, **options)


def load_lite(path: str | os.PathLike[str], threads: int | None = None) -> LiteLM:
    """A packed causal-LM checkpoint (``lowbit.save`` of a llama/mistral/qwen2) on the torch-free runtime: the same
    kernels from numpy + ctypes, never importing torch (``lowbit.runtime.LiteLM``: ``prefill``, ``step``,
    ``generate``, ``stream``, ``chat``). ``threads``: the native thread team (default: all cores).

    Example:
        >>> lm = lowbit.api.load_lite("out/smollm2-w4")  # doctest: +SKIP
        >>> lm.chat("Name a colour.", max_new_tokens=16)  # doctest: +SKIP
    """
    from lowbit.runtime.lite import LiteLM

    return LiteLM.load(path, threads=threads)


def export(model: Any, format: str, out: str | os.PathLike[str], recipe: str | None = None,
           **options: Any) -> dict[str, Any]:
    """Write ``model`` for another runtime: ``gguf`` (llama.cpp), ``onnx`` (ONNX Runtime) or ``hf``
    (transformers + compressed-tensors). Returns the export report (layers mapped, bytes, ...).

    ``model`` is a loaded model or a name/directory (a packed checkpoint, or a float model plus ``recipe``);
    ``options`` are the format's own (e.g. ``requantize`` for GGUF). The output is written atomically.

    Example:
        >>> lowbit.export("out/smollm-w4", "gguf", "smollm-q4_0.gguf")  # doctest: +SKIP
    """
    from lowbit.workflows.export.run import export_model as run

    return run(model, format, out, recipe=recipe, **options)


def serve(model: Any, compare: Any = None, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
    """Serve ``model`` (name, directory or loaded model) over HTTP until Ctrl-C / SIGTERM: OpenAI-style chat
    completions (generative models) or embeddings + zero-shot classify (dual encoders), metrics and a web page.

    ``compare``: a second model answering beside the first on the page (e.g. the float original);
    ``options``: ``lowbit.workflows.serve.limits.Limits`` fields (``max_tokens``, ``max_queue``, ...) and
    ``log_level``, ``graceful_timeout``. Needs ``pip install lowbit[serve]``.

    Example:
        >>> lowbit.serve("out/w4", compare="lit-fashion", port=8000)  # doctest: +SKIP
    """
    from lowbit.workflows.serve.server import serve as run

    run(model, compare=compare, host=host, port=port, **options)


def open_image(image: str | os.PathLike[str] | bytes) -> Image.Image:
    """An image file (or its bytes) as RGB; one clear error for anything unreadable."""
    from lowbit.models.preprocess import open_rgb

    return open_rgb(image)


def list_models() -> list[dict[str, str]]:
    """Built-in models, quantized checkpoints cached under ``$LOWBIT_HOME/models``, and families."""
    from lowbit.workflows.load import list_models as run

    return run()


def demo(limit: int | None = None, out_dir: str | None = None, overwrite: bool = False) -> list[dict[str, Any]]:
    """The main job: ``lit-fashion`` at fp32, fp16, w8 and w4, saved, reloaded and evaluated side by side."""
    from lowbit.workflows.demo import demo as run

    return run(limit=limit, out_dir=out_dir, overwrite=overwrite)


def format_table(result: dict[str, Any] | list[dict[str, Any]]) -> str:
    """A readable terminal table of an ``evaluate`` / ``bench_model`` result."""
    from lowbit.eval.report import format_table as run

    return run(result)


def sweep_table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of ``sweep`` / ``demo`` rows: accuracy, fidelity, whole-file bytes, latency."""
    from lowbit.workflows.sweep import sweep_markdown

    return sweep_markdown(rows)


def markdown_table(results: dict[str, Any] | list[dict[str, Any]]) -> str:
    """A Markdown table of ``evaluate`` results."""
    from lowbit.eval.report import markdown_table as run

    return run(results)
