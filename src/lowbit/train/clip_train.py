"""``lowbit train clip``: CLIP or SigLIP pre-training of a ViT dual encoder from scratch, on one process or many.

Pipeline: resolve the data (registered dataset names, image folders, or tar-shard directories; several joined
with commas) -> build (or reuse from ``out``) a word-level tokenizer over the training captions -> build the
preset as a transformers ``CLIPModel``/``SiglipModel`` -> ``lowbit.train.loop.train`` with the contrastive loss
(``losses.clip_loss`` / ``losses.siglip_loss``) -> export a standard checkpoint directory ``out/model`` that
``AutoModel``/``AutoTokenizer`` and ``lowbit.load`` read.

Under ``torchrun --nproc_per_node N`` every process runs this same function; the loop takes care of the
process group and the batch split, the losses of the feature exchange.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lowbit.errors import LowbitError
from lowbit.io import (
    OutputKind,
    atomic_path,
    check_output,
    prepare_run_dir,
    register_output_kind,
    run_dir_kind,
    write_json,
    write_marker,
)
from lowbit.train import distributed as D
from lowbit.train.loop import TrainConfig, TrainState, train
from lowbit.train.losses import clip_loss, siglip_loss
from lowbit.train.presets import build_dual_encoder, image_processor, resolve_preset

LOSSES: tuple[str, ...] = ("clip", "siglip")
POSITIVES: tuple[str, ...] = ("diagonal", "identical")  # identical: pairs with the same caption text are positives
TOKENIZER_DIR = "tokenizer"
EXPORT_DIR = "model"

register_output_kind(run_dir_kind("clip-train-run", "train_log.jsonl", TOKENIZER_DIR))
register_output_kind(OutputKind("hf-model", is_dir=True))  # a model directory lowbit exported (its marker)

@dataclass
class ClipTrainArgs:
    """Everything ``lowbit train clip`` takes. ``data`` is a comma-separated list of dataset specs."""

    data: str
    out: str
    model: str = "tiny"
    loss: str = "clip"
    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    grad_clip: float = 1.0
    bf16: bool = False
    seed: int = 0
    log_every: int = 20
    eval_every: int = 0
    eval_task: str = "fashion-mnist"
    eval_limit: int | None = 2000
    ckpt_every: int = 200
    patch_dropout: float = 0.0
    captions: str = "auto"
    positives: str = "diagonal"
    num_workers: int = 2
    limit: int | None = None
    progress: bool = True
    export_fp16: str | None = None  # also write the final model here with float16 weights (for packaging)
    overwrite: bool = False  # write into / replace existing directories that are not lowbit's
    preset_overrides: dict[str, Any] = field(default_factory=dict)


class ContrastiveModel(nn.Module):
    """A CLIPModel/SiglipModel whose forward returns what the contrastive losses need (so DDP sees one forward).

    Returns ``{"image": [B, D], "text": [B, D]}`` (L2-normalised), ``"logit_scale"`` and, for SigLIP,
    ``"logit_bias"``.
    """

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        img = self.hf.get_image_features(pixel_values=pixel_values)
        txt = self.hf.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        img = img if isinstance(img, torch.Tensor) else img.pooler_output
        txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
        out = {"image": F.normalize(img.float(), dim=-1), "text": F.normalize(txt.float(), dim=-1),
               "logit_scale": self.hf.logit_scale}
        bias = getattr(self.hf, "logit_bias", None)
        if bias is not None:
            out["logit_bias"] = bias
        return out


def contrastive_loss_fn(loss: str, positives: str = "diagonal"):
    """``loss_fn(model, batch)`` for the loop: the CLIP or SigLIP loss of a ``ContrastiveModel`` batch.

    ``positives="identical"`` passes the batch's ``caption_ids`` so equal captions count as positives.
    """
    if loss not in LOSSES:
        raise LowbitError(f"unknown loss {loss!r}; choose one of: {', '.join(LOSSES)}")
    if positives not in POSITIVES:
        raise LowbitError(f"unknown positives {positives!r}; choose one of: {', '.join(POSITIVES)}")

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = model(**{k: v for k, v in batch.items() if k in ("pixel_values", "input_ids", "attention_mask")})
        scale = out["logit_scale"].reshape(())
        ids = batch["caption_ids"] if positives == "identical" else None
        if loss == "clip":
            value = clip_loss(out["image"], out["text"], scale, text_ids=ids)
        else:
            value = siglip_loss(out["image"], out["text"], scale, out["logit_bias"].reshape(()), text_ids=ids)
        return {"loss": value, "temperature": scale.detach().exp()}

    return loss_fn


def wrap_dual_encoder(hf: nn.Module, tokenizer: Any, processor: Any) -> Any:
    """A lowbit ``HFDualEncoder`` over a (training) HF model, sharing its parameters, for evaluation."""
    from lowbit.models.clip import HFDualEncoder

    return HFDualEncoder(hf, tokenizer, processor, hf.config.text_config.max_position_embeddings)


def eval_fn_for(task: str, limit: int | None, tokenizer: Any, processor: Any):
    """``eval_fn(model, step)``: lowbit's ``evaluate`` on ``task`` -> its numeric metrics."""
    from lowbit.eval import evaluate

    def eval_fn(model: nn.Module, step: int) -> dict[str, Any]:
        hf = model.hf if isinstance(model, ContrastiveModel) else model
        result = evaluate(wrap_dual_encoder(hf, tokenizer, processor), task, limit=limit, footprint=False,
                          progress=False)
        return {k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))}

    return eval_fn


def export_model(hf: nn.Module, tokenizer: Any, processor: Any, out_dir: str | os.PathLike[str],
                 half: bool = False) -> Path:
    """Write a standard transformers checkpoint directory (atomically): config, weights, tokenizer, processor.

    ``half`` stores the weights as float16 (half the bytes) while ``config.json`` keeps float32, so loaders
    using ``dtype="auto"`` upcast on load and run in float32 on CPU.
    """
    from safetensors.torch import save_file

    with atomic_path(out_dir, is_dir=True) as tmp:
        write_marker(tmp, "hf-model")
        hf.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if half:
            tensors = {k: v.detach().to(torch.float16).contiguous().clone() for k, v in hf.state_dict().items()}
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return Path(out_dir)


def _resolve_sets(specs: list[str], limit: int | None) -> tuple[list[Any], list[str]]:
    """(in-memory ImageTextSets, shard directories) of the data specs."""
    from lowbit.data import resolve_dataset
    from lowbit.data.shards import is_shard_dir

    sets, shards = [], []
    for spec in specs:
        if is_shard_dir(spec) or spec.endswith(".tar"):
            shards.append(spec)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # transformers' torchvision fallback notice
                sets.append(resolve_dataset(spec, split="train", limit=limit))
    if sets and shards:
        raise LowbitError(f"cannot mix in-memory datasets and shard directories; received {specs}; accepted: "
                          "either dataset names/folders, or shard directories (shard the others first)")
    if len(shards) > 1:
        raise LowbitError(f"one shard directory per run; received {shards}; accepted: put all shards in one directory")
    return sets, shards


def _tokenizer(args: ClipTrainArgs, texts: list[str], max_length: int) -> Any:
    """The run's tokenizer: the one saved in ``out`` (resume), else built from ``texts`` and saved (rank 0)."""
    from transformers import AutoTokenizer

    from lowbit.train.tokenizer import build_word_tokenizer

    saved = Path(args.out) / TOKENIZER_DIR
    if D.is_main() and not saved.is_dir():
        with atomic_path(saved, is_dir=True) as tmp:
            build_word_tokenizer(texts, max_length).save_pretrained(tmp)
    D.barrier()  # unconditional: a rank that already sees the directory must still meet rank 0 here
    return AutoTokenizer.from_pretrained(saved)


def train_clip(args: ClipTrainArgs) -> dict[str, Any]:
    """Train a dual encoder as ``args`` says; returns a summary (also written to ``out/summary.json``).

    Example:
        >>> train_clip(ClipTrainArgs(data="fashion-mnist,shapes", out="runs/tiny", steps=2000))  # doctest: +SKIP
    """
    from lowbit.train.clip_data import caption_table, memory_batches, shard_batches, shard_captions

    if args.loss not in LOSSES:
        raise LowbitError(f"unknown loss {args.loss!r}; choose one of: {', '.join(LOSSES)}")
    if args.positives not in POSITIVES:
        raise LowbitError(f"unknown positives {args.positives!r}; choose one of: {', '.join(POSITIVES)}")
    preset = resolve_preset(args.model, **args.preset_overrides)
    D.init_distributed()
    t0 = time.perf_counter()
    specs = [s.strip() for s in args.data.split(",") if s.strip()]
    if not specs:
        raise LowbitError("no training data; received an empty --data; accepted: e.g. fashion-mnist,shapes")
    sets, shards = _resolve_sets(specs, args.limit)
    texts = caption_table(sets, args.captions).texts if sets else shard_captions(shards[0])
    check_output(args.out, "clip-train-run", overwrite=args.overwrite, sources=specs)
    if args.export_fp16:
        check_output(args.export_fp16, "hf-model", overwrite=args.overwrite, sources=[*specs, args.out],
                     flag="--export-fp16")
    D.barrier()  # every rank has judged the directories before any writes into them
    if D.is_main():
        prepare_run_dir(args.out, "clip-train-run", overwrite=args.overwrite, sources=specs)
    D.barrier()
    tokenizer = _tokenizer(args, texts, preset.max_text_tokens)
    processor = image_processor(preset)
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    hf = build_dual_encoder(preset, len(tokenizer), args.loss, pad_id=tokenizer.pad_token_id,
                            bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id)
    model = ContrastiveModel(hf)
    if args.patch_dropout > 0:
        from lowbit.train.patch_dropout import enable_patch_dropout

        enable_patch_dropout(hf.vision_model, args.patch_dropout)
    pad_to_max = args.loss == "siglip"  # SigLIP pools the last position of max-length padded text
    data_stats: dict[str, int] = {}
    if sets:
        batches, n = memory_batches(sets, processor, tokenizer, args.batch_size, args.seed, preset.max_text_tokens,
                                    pad_to_max, args.captions, same_template=args.positives == "identical",
                                    progress=args.progress and D.is_main())
    else:
        batches, n = shard_batches(shards[0], processor, tokenizer, args.batch_size, args.seed,
                                   preset.max_text_tokens, pad_to_max, num_workers=args.num_workers,
                                   on_stats=data_stats.update), None
    config = TrainConfig(steps=args.steps, lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                         batch_size=args.batch_size, grad_clip=args.grad_clip, bf16=args.bf16, seed=args.seed,
                         log_every=args.log_every, eval_every=args.eval_every, ckpt_every=args.ckpt_every,
                         out_dir=args.out, progress=args.progress)
    eval_fn = eval_fn_for(args.eval_task, args.eval_limit, tokenizer, processor) if args.eval_task else None

    def on_checkpoint(m: nn.Module, step: int, path: Path) -> None:
        export_model(m.hf, tokenizer, processor, Path(args.out) / EXPORT_DIR)

    state: TrainState = train(model, contrastive_loss_fn(args.loss, args.positives), batches, config, eval_fn=eval_fn,
                              on_checkpoint=on_checkpoint)
    evals = [h for h in state.history if "eval" in h]
    summary = {
        "model": str(Path(args.out) / EXPORT_DIR), "preset": asdict(preset), "loss": args.loss,
        "data": specs, "samples": n, "steps": state.step, "resumed_from": state.resumed_from,
        "world_size": D.world_size(), "parameters": sum(p.numel() for p in hf.parameters()),
        "last": state.last, "final_eval": evals[-1]["eval"] if evals else None, "data_stats": data_stats,
        "seconds": round(time.perf_counter() - t0, 1), "args": asdict(args),
    }
    if D.is_main():
        write_json(Path(args.out) / "summary.json", summary)
        if args.export_fp16:
            export_model(hf, tokenizer, processor, args.export_fp16, half=True)
    D.barrier()
    return summary


def summary_line(summary: dict[str, Any]) -> str:
    """One line for the terminal."""
    ev = summary.get("final_eval") or {}
    metric = json.dumps({k: round(v, 4) for k, v in ev.items() if isinstance(v, float)})
    return (f"trained {summary['steps']} steps on {summary['world_size']} process(es) in {summary['seconds']} s; "
            f"eval {metric}; model: {summary['model']}")
