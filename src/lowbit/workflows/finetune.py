"""``lowbit finetune``: QLoRA — LoRA adapters trained on a low-bit model without un-packing it.

Loads MODEL (a packed checkpoint, or any model ``lowbit.load`` reads: its float layers then carry plain LoRA),
attaches adapters (``lowbit.quant.lora``: rank, alpha, dropout, targets in the recipes' pattern language) and
trains them on the shared loop (``lowbit.train.loop``: progress, evaluations, atomic checkpoints holding only the
adapters and their optimizer state, resume after kill -9, DDP under torchrun):

- dual encoders: the contrastive loss of ``lowbit qat`` (CLIP or SigLIP) on image-caption pairs, plus
  distillation (KL over similarity rows and embedding cosine, ``lowbit.train.qat``) from ``teacher`` (the float
  model) when one is given;
- llava: cross-entropy on the answer tokens of generated instruction conversations (``fashion-vqa`` /
  ``shapes-vqa`` train split: images disjoint from the test split), the projector training's loss
  (``lowbit.workflows.build_llava.AnswerLoss``) with the visual tokens cached; with ``teacher`` (the float
  llava) plus distillation of its answer logits: ``task_weight * CE + T² KL(teacher || student)`` over the
  answer positions (``task_loss="none"``: the KL alone).

Run directory ``OUT``: ``checkpoints/``, ``train_log.jsonl``, ``finetune_run.json`` (the arguments; a rerun with
different ones is refused), ``adapters/`` (PEFT format: ``peft.PeftModel.from_pretrained(float_model, OUT/adapters)``
loads them; ``lowbit.quant.lora.load_adapters(packed, OUT/adapters)`` too), ``summary.json`` and, with ``merge``,
``model/``: the adapters folded into the packed weights on their own grid, a new packed checkpoint, with the
merge error in the summary.

Example:
    >>> finetune("runs/w2-gptq", "runs/ft", lora=8, targets="vision@conv1x1", teacher="lit-fashion")  # doctest: +SKIP
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lowbit.errors import LowbitError, check_options
from lowbit.io import check_output, prepare_run_dir, register_output_kind, run_dir_kind, write_json
from lowbit.models.base import DualEncoder
from lowbit.quant.lora import (
    LoraConfig,
    attach_lora,
    load_lora_state,
    lora_layers,
    lora_state,
    merge_lora,
    save_adapters,
)
from lowbit.train import distributed as D
from lowbit.train.loop import TrainConfig, TrainState, train
from lowbit.train.qat import DISTILL_MODES, TASK_LOSSES, PairEncoder, QATLoss
from lowbit.workflows.run_record import check_run_record

RUN_FILE = "finetune_run.json"
ADAPTER_DIR = "adapters"
MODEL_DIR = "model"
_RUN_KEYS = ("model", "lora", "alpha", "dropout", "targets", "data", "batch_size", "seed", "train_samples", "teacher",
             "distill", "task_loss", "task_weight", "temperature")
LLAVA_DISTILL = ("kl", "both")  # llava has one distillation term, the answer-logit KL: either name selects it
register_output_kind(run_dir_kind("finetune-run", RUN_FILE))


@dataclass
class FinetuneArgs:
    """Everything ``run_finetune`` (and ``lowbit finetune``) takes. ``data`` None: fashion-mnist for dual
    encoders, fashion-vqa for llava. ``alpha`` None: 2 * rank. ``targets`` None: ``default_targets``."""

    model: str
    out: str
    lora: int = 8
    targets: str | None = None
    alpha: float | None = None
    dropout: float = 0.0
    data: str | None = None
    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    grad_clip: float = 1.0
    seed: int = 0
    train_samples: int = 2000
    eval_every: int = 0
    eval_samples: int = 500
    ckpt_every: int = 50
    log_every: int = 10
    teacher: str | None = None  # the float model to distil from
    distill: str = "both"  # with a teacher
    task_loss: str = "clip"  # llava: "none" drops the answer cross-entropy (distillation alone)
    task_weight: float = 0.5  # weight of the task loss when distilling
    temperature: float = 1.0
    turns: int = 1  # llava: conversation turns per image
    merge: bool = False
    grad_checkpoint: bool = False  # llava: recompute each decoder block in the backward (activation memory)
    progress: bool = True
    overwrite: bool = False

    def lora_config(self, model: nn.Module | None = None) -> LoraConfig:
        """The adapters' config; ``targets`` None is resolved on ``model`` (``default_targets``)."""
        alpha = 2.0 * self.lora if self.alpha is None else float(self.alpha)
        targets = self.targets if self.targets is not None else (default_targets(model) if model is not None else "*")
        return LoraConfig(r=self.lora, alpha=alpha, dropout=self.dropout, targets=targets, seed=self.seed)

    def validate(self) -> None:
        self.lora_config().validate()
        if self.distill not in DISTILL_MODES or self.task_loss not in TASK_LOSSES:
            raise LowbitError(f"finetune loss: distill {self.distill!r} (accepted: {', '.join(DISTILL_MODES)}), "
                              f"task_loss {self.task_loss!r} (accepted: {', '.join(TASK_LOSSES)})")
        if not self.temperature > 0 or not self.task_weight >= 0:
            raise LowbitError(f"finetune loss: temperature must be > 0 and task_weight >= 0; received "
                              f"{self.temperature}, {self.task_weight}")
        if self.steps < 1 or self.train_samples < 1 or self.turns < 1:
            raise LowbitError(f"finetune: steps, train_samples and turns must be >= 1; received {self.steps}, "
                              f"{self.train_samples}, {self.turns}")


def default_targets(model: nn.Module) -> str:
    """Every adaptable layer of a dual encoder (``*``); for llava, the linears of the language model's decoder
    blocks: not its output head (tied to the input embeddings in SmolLM2: a [vocab, D] adapter there buys little
    for its cost) and not the vision tower (training reads cached vision tokens, so adapters there never train)."""
    if not _is_llava(model):
        return "*"
    decoder = model.language.get_decoder()
    prefix = next((name for name, m in model.language.named_modules() if m is decoder), "")
    return f"language/{prefix}.*" if prefix else "language"


class AdapterState:
    """Mixin for the module the loop trains: its state dict is the adapters alone, so checkpoints hold a few
    MB (adapters + their AdamW moments), not the frozen packed model."""

    adapter_root: nn.Module

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {k: v.detach() for k, v in lora_state(self.adapter_root).items()}

    def load_state_dict(self, state: Any, strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        load_lora_state(self.adapter_root, dict(state))
        return nn.modules.module._IncompatibleKeys([], [])


class AdapterPair(AdapterState, PairEncoder):
    """``PairEncoder`` (frozen batch-norm statistics) whose adapters' dropout follows train/eval."""

    def __init__(self, model: DualEncoder) -> None:
        super().__init__(model)
        self.adapter_root = model

    def train(self, mode: bool = True) -> AdapterPair:
        super().train(mode)
        for m in lora_layers(self.model).values():
            m.lora_dropout.train(mode)
        return self


class AdapterAnswerLoss(AdapterState, nn.Module):
    """llava's answer loss with the whole model registered (DDP must see the adapters); eval mode inside.

    With ``teacher`` (a frozen llava with the same tokenizer; not registered, so neither DDP nor checkpoints
    see it): ``ce_weight * CE + T² KL(teacher || student)`` over the answer positions. The teacher reads the
    batch's cached visual tokens (the student's tower's) through its own projector."""

    def __init__(self, model: nn.Module, teacher: nn.Module | None = None, ce_weight: float = 1.0,
                 temperature: float = 1.0) -> None:
        super().__init__()
        self.model, self.adapter_root = model, model
        self.ce_weight, self.temperature = ce_weight, temperature
        object.__setattr__(self, "teacher", teacher)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        from lowbit.train.losses import token_kl_loss
        from lowbit.workflows.build_llava import answer_logits

        logits, targets = answer_logits(self.model, batch)
        ce = F.cross_entropy(logits.float(), targets)
        out = {"token_acc": (logits.argmax(-1) == targets).float().mean().detach()}
        if self.teacher is None:
            return {"loss": ce, **out}
        with torch.no_grad():
            reference, same = answer_logits(self.teacher, batch)
        if reference.shape != logits.shape or not torch.equal(same, targets):
            raise LowbitError(f"answer distillation: the teacher predicts {tuple(reference.shape)} answer logits, "
                              f"the student {tuple(logits.shape)}; accepted: a teacher with the same tokenizer, "
                              "vocabulary and visual-token count")
        kl = token_kl_loss(logits, reference, self.temperature)
        return {"loss": self.ce_weight * ce + kl, "ce": ce.detach(), "kl": kl.detach(), **out}

    def train(self, mode: bool = True) -> AdapterAnswerLoss:
        super().train(mode)
        self.model.eval()
        for m in lora_layers(self.model).values():
            m.lora_dropout.train(mode)
        return self


def _check_run_dir(args: FinetuneArgs) -> None:
    check_run_record(args.out, RUN_FILE, "finetune", {k: asdict(args)[k] for k in _RUN_KEYS}, asdict(args))


def _is_llava(model: nn.Module) -> bool:
    from lowbit.models.llava_model import LlavaModel

    return isinstance(model, LlavaModel)


def _dual_run(args: FinetuneArgs, model: DualEncoder, config: TrainConfig) -> tuple[TrainState, Any]:
    from lowbit.data import resolve_dataset
    from lowbit.eval import evaluate
    from lowbit.train.qat import TeacherCache, qat_batches, qat_loss_fn
    from lowbit.workflows.load import load

    data = args.data or "fashion-mnist"
    train_set = resolve_dataset(data, split="train", limit=args.train_samples)
    eval_set = resolve_dataset(data, split="test", limit=args.eval_samples) if args.eval_samples else None
    task = "zeroshot" if eval_set is not None and eval_set.labels is not None and eval_set.classnames else "retrieval"
    teacher = None
    if args.teacher:
        t = load(args.teacher)
        t.requires_grad_(False)
        teacher = TeacherCache(t, train_set)
    loss = QATLoss(distill=args.distill if teacher is not None else "none", task_loss=args.task_loss,
                   task_weight=args.task_weight if teacher is not None else 1.0, temperature=args.temperature)

    def eval_fn(pair: nn.Module, step: int) -> dict[str, Any]:
        result = evaluate(pair.model, task, data=eval_set, footprint=False, progress=False)
        return {k: v for k, v in result["metrics"].items() if isinstance(v, float)}

    state = train(AdapterPair(model), qat_loss_fn(loss), qat_batches(model, teacher, train_set, config.batch_size,
                  args.seed), config, eval_fn=eval_fn if eval_set is not None else None)
    return state, {"data": data, "task": task, "loss": asdict(loss)}


def llava_batches(model: nn.Module, data: str, train_samples: int, batch_size: int, turns: int = 1, seed: int = 0,
                  progress: bool = False) -> tuple[Any, int, float]:
    """The llava training batches (``train``'s ``BatchFactory``) of ``data``'s train split: cached vision tokens
    (images disjoint from the test split) and encoded conversations. Returns (factory, conversations, seconds
    spent on the vision tokens: the tower runs once per image, before training, and its tokens are cached)."""
    from lowbit.data.vqa import load_vqa
    from lowbit.train.sampling import index_batches
    from lowbit.workflows.build_llava import conversations, visual_features

    t = time.perf_counter()
    vqa = load_vqa(data, "train", limit=train_samples, turns_per_image=turns, seed=seed)
    feats, scores = visual_features(model, vqa, progress=progress)
    convs = conversations(model, vqa)
    seconds = time.perf_counter() - t

    def collate(idx: np.ndarray, step: int) -> dict[str, Any]:
        i = torch.as_tensor(idx)
        return {"tokens": feats[i], "scores": scores[i], "pre": [convs[j].pre for j in idx],
                "post": [convs[j].post for j in idx], "labels": [convs[j].labels for j in idx]}

    return index_batches(len(convs), batch_size, seed, collate), len(convs), seconds


class _Recomputed:
    """A module's ``forward`` while gradient checkpointing: under autograd its activations are not kept but
    recomputed in the backward (``torch.utils.checkpoint``, non-reentrant); the gradients are the same."""

    def __init__(self, forward: Callable[..., Any]) -> None:
        self.forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)


def checkpoint_blocks(model: nn.Module) -> int:
    """Gradient checkpointing of a llava language model's decoder blocks (in place; returns how many).

    QLoRA's memory is the frozen packed weights plus activations; without this the activations kept for the
    backward (every block's attention and MLP intermediates, ~0.4 GB per 178-token sample on SmolLM2-135M)
    dominate it. Works in eval mode (transformers' own switch only acts in training mode, and the answer loss
    keeps the model in eval mode)."""
    blocks = getattr(model.language.get_decoder(), "layers", None)
    if not isinstance(blocks, nn.ModuleList):
        raise LowbitError(f"gradient checkpointing: {type(model.language).__name__}'s decoder has no `layers` list; "
                          "accepted: a decoder-block language model (or no --grad-checkpoint)")
    for block in blocks:
        if not isinstance(block.__dict__.get("forward"), _Recomputed):
            block.forward = _Recomputed(block.forward)
    return len(blocks)


def llava_teacher(args: FinetuneArgs, model: nn.Module) -> tuple[nn.Module | None, float]:
    """The frozen float llava to distil answers from (``args.teacher``, or None) and the cross-entropy's weight;
    a teacher that is not a llava with the student's vocabulary, or a distillation mode other than the answer
    KL, is one line."""
    from lowbit.workflows.load import load

    if not args.teacher:
        if args.task_loss == "none":
            raise LowbitError("llava finetune needs a loss: task_loss 'none' without a teacher; accepted: a teacher "
                              "(answer distillation) or the answer cross-entropy")
        return None, 1.0
    if args.distill not in LLAVA_DISTILL:
        raise LowbitError(f"llava distillation is the KL of the teacher's answer logits: distill {args.distill!r}; "
                          f"accepted: {', '.join(LLAVA_DISTILL)} (or no teacher)")
    teacher = load(args.teacher)
    vocab = [getattr(m.language.config, "vocab_size", None) if _is_llava(m) else None for m in (teacher, model)]
    if vocab[0] is None or vocab[0] != vocab[1]:
        raise LowbitError(f"answer distillation needs a llava teacher with the student's vocabulary: "
                          f"{args.teacher!r} is a {type(teacher).__name__} (vocabulary {vocab[0]}, student's "
                          f"{vocab[1]}); accepted: the student's float llava, e.g. llava-fashion-hd")
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher, 0.0 if args.task_loss == "none" else args.task_weight


def _llava_run(args: FinetuneArgs, model: nn.Module, config: TrainConfig) -> tuple[TrainState, Any]:
    from lowbit.eval import evaluate

    teacher, ce_weight = llava_teacher(args, model)
    name = args.data or "fashion-vqa"
    batches, n_convs, feature_seconds = llava_batches(model, name, args.train_samples, args.batch_size, args.turns,
                                                      args.seed, args.progress)

    def eval_fn(wrapper: nn.Module, step: int) -> dict[str, Any]:
        result = evaluate(wrapper.model, name, limit=args.eval_samples, footprint=False, progress=False)
        return {k: v for k, v in result["metrics"].items() if isinstance(v, float)}

    random.seed(args.seed)
    if args.grad_checkpoint:
        checkpoint_blocks(model)
    state = train(AdapterAnswerLoss(model, teacher, ce_weight, args.temperature), lambda m, b: m(b), batches, config,
                  eval_fn=eval_fn if args.eval_samples else None)
    loss = "answer tokens cross-entropy" if teacher is None else (
        f"{ce_weight:g} x answer cross-entropy + T^2 KL({args.teacher} || student) of the answer logits, "
        f"T={args.temperature:g}")
    return state, {"data": name, "task": name, "loss": loss, "conversations": n_convs,
                   "vision_token_seconds": round(feature_seconds, 1)}


def run_finetune(args: FinetuneArgs) -> dict[str, Any]:
    """Load, attach adapters, train (resuming from ``args.out``), save the adapters (PEFT format), optionally
    merge into a new packed checkpoint. Returns (and writes to ``OUT/summary.json``) the summary."""
    from lowbit.workflows.load import load
    from lowbit.workflows.quantize import save

    args.validate()
    t0 = time.perf_counter()
    D.init_distributed()
    check_output(args.out, "finetune-run", overwrite=args.overwrite, sources=[args.model, args.data, args.teacher])
    D.barrier()
    if D.is_main():
        prepare_run_dir(args.out, "finetune-run", overwrite=args.overwrite,
                        sources=[args.model, args.data, args.teacher])
    D.barrier()
    _check_run_dir(args)
    D.barrier()
    model = load(args.model)
    if args.merge and getattr(model, "lowbit_manifest", None) is None:
        raise LowbitError(f"merge writes a new packed checkpoint: {args.model!r} is not one; accepted: a packed "
                          "directory (lowbit quantize ... --out DIR), or no merge (the adapters are saved either way)")
    if args.grad_checkpoint and not _is_llava(model):
        raise LowbitError("grad_checkpoint recomputes a llava language model's decoder blocks; accepted: a llava "
                          f"model, received a {type(model).__name__}")
    lora_config = args.lora_config(model)
    report = attach_lora(model, lora_config)
    vision = [path for path, row in report.layers.items() if row["tower"] == "vision"]
    if _is_llava(model) and vision:
        raise LowbitError(f"llava finetune trains on cached vision-tower tokens: adapters on the vision tower "
                          f"({vision[0]}, ...) would never train; accepted: language and projector targets")
    config = TrainConfig(steps=args.steps, lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                         batch_size=args.batch_size, grad_clip=args.grad_clip, seed=args.seed, log_every=args.log_every,
                         eval_every=args.eval_every, ckpt_every=args.ckpt_every, out_dir=args.out,
                         progress=args.progress)
    t_train = time.perf_counter()
    state, what = (_llava_run if _is_llava(model) else _dual_run)(args, model, config)
    train_seconds = time.perf_counter() - t_train
    out = Path(args.out)
    summary: dict[str, Any] = {
        "model": args.model, "adapters": str(out / ADAPTER_DIR), "lora": report.to_dict(), **what,
        "steps": state.step, "resumed_from": state.resumed_from, "world_size": D.world_size(), "last": state.last,
        "evals": [h for h in state.history if "eval" in h], "train_seconds": round(train_seconds, 1),
        "threads": torch.get_num_threads(),
    }
    if D.is_main():
        save_adapters(model, out / ADAPTER_DIR, lora_config, base_model=args.model)
        if args.merge:
            summary["merge"] = {k: v for k, v in merge_lora(model).items() if k != "layers"}
            save(model, out / MODEL_DIR, overwrite=True)
            summary["merged_model"] = str(out / MODEL_DIR)
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        write_json(out / "summary.json", summary)
    D.barrier()
    return summary


def finetune(model: str, out_dir: str | Path, **options: Any) -> dict[str, Any]:
    """``run_finetune`` from plain options (the ``FinetuneArgs`` fields); unknown names are refused."""
    check_options("finetune", options, [f.name for f in fields(FinetuneArgs) if f.name not in ("model", "out")])
    try:
        return run_finetune(FinetuneArgs(model=model, out=str(out_dir), **options))
    finally:
        D.cleanup_distributed()
