"""The ``lowbit`` command line: a thin layer over the Python API (``lowbit.api``).

Every verb maps to one API function; a user error prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lowbit import api
from lowbit.api import DEFAULT_CALIB_SAMPLES
from lowbit.cli.base import OVERWRITE_HELP, Parser, add_act_block, print_json_or_table, run
from lowbit.errors import LowbitError


def cmd_models(args: argparse.Namespace) -> None:
    """List built-in models, models cached under $LOWBIT_HOME/models, and registered families."""

    for row in api.list_models():
        print(f"{row['name']:<28} {row['kind']:<10} {row['description']}")


def cmd_eval(args: argparse.Namespace) -> None:
    """Evaluate MODEL on a task: accuracy (or recall), footprint and, with --reference, fidelity."""
    api.check_task_and_data(args.task, args.data)  # a bad task or data path fails before seconds of loading
    model = api.load(args.model, optimize=args.optimize, act_block=args.act_block)
    reference = api.load(args.reference) if args.reference else None
    result = api.evaluate(
        model, args.task, limit=args.limit, data=args.data, reference=reference,
        footprint=not args.no_footprint, checkpoint_dir=args.model if Path(args.model).is_dir() else None,
    )
    print_json_or_table(result, args.json, overwrite=args.overwrite)


def cmd_demo(args: argparse.Namespace) -> None:
    """The main job: the default model at fp32, fp16, w8 and w4 side by side: accuracy, whole-file bytes, latency."""
    rows = api.demo(limit=args.limit, out_dir=args.out, overwrite=args.overwrite)
    print(api.sweep_table(rows))
    if args.out:
        print(f"wrote {args.out}/sweep.json, sweep.md and sweep.png")


def cmd_build(args: argparse.Namespace) -> None:
    """Re-train the trained parts of a built-in model (lit-fashion heads, llava-fashion(-hd) projector)."""

    options: dict[str, Any] = {}
    for name in ("n_train", "n_test", "run_dir"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    log = api.build(args.model, out=args.out, steps=args.steps, seed=args.seed, overwrite=args.overwrite, **options)
    print(json.dumps(log, indent=2))


def cmd_quantize(args: argparse.Namespace) -> None:
    """Quantize MODEL with a recipe (preset, YAML file or short string) and save a packed checkpoint to OUT."""

    api.check_checkpoint_output(args.out, source=args.model, overwrite=args.overwrite)  # before minutes of work
    model = api.load(args.model)
    report = api.quantize(model, args.recipe, calib_data=args.calib_data, calib_samples=args.calib_samples,
                          strict=args.strict)
    api.save(model, args.out, report=report, overwrite=args.overwrite)
    print(report.markdown())
    print(f"wrote {args.out}")


def cmd_sweep(args: argparse.Namespace) -> None:
    """Evaluate every recipe x method on a task; write JSON, Markdown and an accuracy-vs-bytes PNG."""

    rows = api.sweep(args.model, recipes=args.recipes.split(","), methods=args.methods.split(","),
                     task=args.task, out_dir=args.out, limit=args.limit, calib_samples=args.calib_samples,
                     overwrite=args.overwrite)
    print(f"{len(rows)} rows; wrote {args.out}/sweep.json, sweep.md, sweep.png")


def cmd_bench(args: argparse.Namespace) -> None:
    """Benchmarks: `bench kernels` (packed matmul vs torch/ONNX Runtime) or `bench model MODEL`."""

    if args.what == "kernels":
        api.bench_kernels(json_path=args.json, quick=args.quick)
    else:
        if not args.model:
            raise LowbitError("`lowbit bench model` needs a MODEL argument (a built-in name or a directory)")
        print_json_or_table(api.bench_model(args.model, optimize=args.optimize, act_block=args.act_block), args.json,
                            overwrite=args.overwrite)


def cmd_chat(args: argparse.Namespace) -> None:
    """Ask a generative MODEL a question: a llava about an image (--image), a language model text only."""
    if args.lite:
        return chat_lite(args)
    image = api.open_image(args.image) if args.image else None  # a bad image fails before seconds of loading
    options = {k: v for k, v in (("prune_ratio", args.prune_ratio), ("prune_layer", args.prune_layer),
                                 ("kv_bits", args.kv_bits)) if v is not None}
    model = api.load(args.model, **options)

    def show(text: str) -> None:
        print(text, end="", flush=True)

    answer = api.chat(model, image, args.question, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                      temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                      stream=None if args.no_stream else show)
    print(answer if args.no_stream else "")


def chat_lite(args: argparse.Namespace) -> None:
    """`chat --lite`: a packed causal-LM checkpoint on the torch-free runtime (lowbit.api.load_lite)."""
    refused = [flag for flag, value in (("--image", args.image), ("--prune-ratio", args.prune_ratio),
                                        ("--prune-layer", args.prune_layer), ("--kv-bits", args.kv_bits)) if value]
    if refused:
        raise LowbitError(f"--lite runs text-only packed causal LMs; it does not take {', '.join(refused)}")
    lm = api.load_lite(args.model)

    def show(text: str) -> None:
        print(text, end="", flush=True)

    answer = lm.chat(args.question, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature if args.sample else 0.0, top_p=args.top_p, top_k=args.top_k,
                     seed=args.seed, stream=None if args.no_stream else show)
    print(answer if args.no_stream else "")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lowbit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    def verb(name: str, fn: Callable[[argparse.Namespace], None]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=(fn.__doc__ or "").splitlines()[0], description=fn.__doc__)
        p.set_defaults(func=fn)
        return p

    verb("models", cmd_models)

    p = verb("eval", cmd_eval)
    p.add_argument("model", help="built-in name (lit-fashion), CLIP/SigLIP dir, or lowbit quantized dir")
    p.add_argument("--task", required=True, help="fashion-mnist, shapes, zeroshot, retrieval, fashion-vqa, text "
                                                 "(language models: perplexity, KL against --reference)")
    p.add_argument("--data", help="dataset for zeroshot/retrieval: a name or a folder with captions.csv; for text: a "
                                  "text file")
    p.add_argument("--limit", type=int, help="evaluate on the first N samples only")
    p.add_argument("--reference", help="model to measure fidelity against (e.g. the float original)")
    p.add_argument("--json", help="write the result JSON here")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--no-footprint", action="store_true", help="skip latency/size measurement")
    p.add_argument("--optimize", action="store_true",
                   help="evaluate the model after optimize_for_inference_ (folded BatchNorm, depthwise kernel, fused "
                        "activations): accuracy and latency of what a deployment runs")
    add_act_block(p)

    p = verb("chat", cmd_chat)
    p.add_argument("model", help="generative model: llava-fashion(-hd), a Llava checkpoint dir, a causal-LM dir or "
                                 ".gguf file, or a quantized one")
    p.add_argument("question", help="the question (about the image, for a llava)")
    p.add_argument("--image", help="image file (PNG, JPEG, ...): needed by llava models, refused by text-only LMs")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, help="seed for sampling")
    p.add_argument("--prune-ratio", type=float, help="share of visual tokens to drop before the LM (0..1)")
    p.add_argument("--prune-layer", type=int, help="prune inside the LM after its first K layers instead (FastV)")
    p.add_argument("--kv-bits", type=int, choices=[8, 4], help="store the KV cache at 8 or 4 bits")
    p.add_argument("--no-stream", action="store_true", help="print the answer once at the end")
    p.add_argument("--lite", action="store_true", help="run a packed causal-LM checkpoint (llama/mistral/qwen2) on the "
                                                       "torch-free runtime (lowbit.runtime: a much smaller process)")

    p = verb("demo", cmd_demo)
    p.add_argument("--limit", type=int, help="evaluate on the first N test images only")
    p.add_argument("--out", help="also write sweep.json, sweep.md and the accuracy-vs-bytes plot sweep.png here")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    p = verb("build", cmd_build)
    p.add_argument("model", help="built-in model to build (lit-fashion, llava-fashion-hd, llava-fashion)")
    p.add_argument("--out", help="file to write (default: under $LOWBIT_HOME/models/MODEL)")
    p.add_argument("--steps", type=int, help="training steps (default: the shipped build's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, help="lit-fashion: training images (default 60000)")
    p.add_argument("--n-test", type=int, help="lit-fashion: test images (default 10000)")
    p.add_argument("--run-dir", help="llava-fashion(-hd): checkpoint directory (a re-run resumes)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    p = verb("quantize", cmd_quantize)
    p.add_argument("model")
    p.add_argument("--recipe", required=True, help="preset (w8,w4,w3,w2), YAML path, or 'vision=w4g64:gptq,...'")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--calib-data", default=None,
                   help="calibration data: a dataset name, an image folder, captions CSV/JSONL, webdataset shards, a "
                        ".txt file or chat JSONL (default: the model family's own set, else generated scenes for "
                        "image models and text sampled from the model itself for language models)")
    p.add_argument("--calib-samples", type=int, default=DEFAULT_CALIB_SAMPLES)
    p.add_argument("--strict", action="store_true", help="fail if any weight layer stays in float")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    p = verb("sweep", cmd_sweep)
    p.add_argument("model")
    p.add_argument("--recipes", default="w8,w4,w3,w2")
    p.add_argument("--methods", default="rtn,gptq,awq")
    p.add_argument("--task", default="fashion-mnist")
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, help="evaluate on the first N samples only")
    p.add_argument("--calib-samples", type=int, default=DEFAULT_CALIB_SAMPLES)
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    p = verb("bench", cmd_bench)
    p.add_argument("what", choices=["kernels", "model"])
    p.add_argument("model", nargs="?")
    p.add_argument("--json")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--optimize", action="store_true",
                   help="bench model: load the model and its float source with optimize_for_inference_ applied")
    add_act_block(p)

    # imported here, not at the top: `python -m lowbit.cli.qat` (torchrun) must not find its module imported by
    # the package first (runpy warns, and the module would run twice over)
    from lowbit.cli.export import register_export_cli
    from lowbit.cli.finetune import register_finetune_cli
    from lowbit.cli.qat import register_qat_cli
    from lowbit.cli.search import register_search_cli
    from lowbit.cli.serve import register_serve_cli
    from lowbit.cli.train import register_cli as register_train_and_data

    register_train_and_data(sub)  # `lowbit train clip`, `lowbit data shard`
    register_qat_cli(sub)  # `lowbit qat`
    register_finetune_cli(sub)  # `lowbit finetune`
    register_serve_cli(sub)  # `lowbit serve`
    register_export_cli(sub)  # `lowbit export`
    register_search_cli(sub)  # `lowbit search`
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


