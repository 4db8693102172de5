"""The one training loop: contrastive pre-training and quantization-aware training both call ``train``.

What it does, in order, every step: set the learning rate (linear warm-up, then cosine decay to
``min_lr_ratio * lr``; Loshchilov & Hutter, 2017, "SGDR"), run ``loss_fn`` under optional bf16 autocast,
backpropagate, clip the global gradient norm, take an AdamW step (Loshchilov & Hutter, 2019, "Decoupled Weight
Decay Regularization"; no decay on parameters with fewer than 2 dims: biases, norms, temperatures).
Periodically: log (tqdm bar with loss and samples/s; ``train_log.jsonl``), evaluate, checkpoint.

Resuming: when ``config.out_dir`` holds a checkpoint (``lowbit.train.state``), ``train`` restores model,
optimizer, RNG states and step, and asks ``batches`` for the data from that step on; running the same command
again continues the run (and returns at once if it already finished). The learning rate is a function of the
step, so the "scheduler state" is the step.

Data parallel: under ``torchrun`` the process group is initialised here (gloo on CPU, nccl on CUDA), the model
is wrapped in ``DistributedDataParallel`` and each rank draws its ``batch_size / world`` share of the global
batch from ``batches(start_step, rank, world)``. Only rank 0 writes checkpoints and logs.

The contract with ``loss_fn``: it receives the (possibly DDP-wrapped) model and must call ``model(...)``, its
forward, so that DDP synchronises gradients; ``unwrap(model)`` reaches the plain module. It returns a dict
with a scalar ``"loss"`` (the mean over this rank's samples, so the mean over ranks is the global-batch loss)
and any other scalars to log.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lowbit.errors import LowbitError
from lowbit.io import atomic_path
from lowbit.train import distributed as D
from lowbit.train.sampling import BatchFactory, local_batch_size
from lowbit.train.state import (
    capture_rng,
    latest_checkpoint,
    load_latest_checkpoint,
    restore_optimizer,
    restore_rng,
)
from lowbit.train.state import save_checkpoint as _save_checkpoint

LossFn = Callable[[nn.Module, Any], dict[str, torch.Tensor]]
EvalFn = Callable[[nn.Module, int], dict[str, Any]]
CheckpointFn = Callable[[nn.Module, int, Path], None]
LOG_NAME = "train_log.jsonl"


@dataclass
class TrainConfig:
    """Hyper-parameters and bookkeeping of one run. ``batch_size`` is global (summed over processes).

    ``eval_every`` / ``ckpt_every`` of 0 disable the periodic call; a final evaluation and checkpoint
    happen at the last step whenever ``eval_fn`` / ``out_dir`` are given.
    """

    steps: int
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 0
    batch_size: int = 64
    grad_clip: float | None = 1.0
    bf16: bool = False
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    ckpt_every: int = 0
    out_dir: str | None = None
    min_lr_ratio: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)  # beta2 < 0.999 as in CLIP: steadier with large batches
    eps: float = 1e-6
    keep_checkpoints: int = 2
    progress: bool = True
    find_unused_parameters: bool = False  # DDP option: needed when some trainable params skip the forward

    def validate(self) -> None:
        """Raise LowbitError on values the loop cannot run with."""
        checks = [
            (self.steps >= 1, "steps", self.steps, ">= 1"),
            (self.lr > 0, "lr", self.lr, "> 0"),
            (self.batch_size >= 1, "batch_size", self.batch_size, ">= 1"),
            (0 <= self.warmup_steps, "warmup_steps", self.warmup_steps, ">= 0"),
            (self.log_every >= 1, "log_every", self.log_every, ">= 1"),
            (self.eval_every >= 0 and self.ckpt_every >= 0, "eval_every/ckpt_every",
             (self.eval_every, self.ckpt_every), ">= 0"),
        ]
        for ok, name, got, accepted in checks:
            if not ok:
                raise LowbitError(f"bad training setting {name}: received {got!r}; accepted: {accepted}")


@dataclass
class TrainState:
    """What ``train`` returns: final step, logged history, last logged metrics, newest checkpoint."""

    step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    last: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None
    resumed_from: int | None = None


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of ``step`` (0-based): linear warm-up to ``lr``, cosine down to ``min_lr_ratio * lr``.

    Example:
        >>> cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10)
        >>> lr_at(0, cfg), lr_at(9, cfg), round(lr_at(55, cfg), 3)
        (0.1, 1.0, 0.5)
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay = max(config.steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / decay, 1.0)
    floor = config.min_lr_ratio * config.lr
    return floor + (config.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DistributedDataParallel wrapper (or ``model`` itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def param_groups(params: Iterable[Any], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices, none on params with < 2 dims (biases, norms, temperatures).

    Param-group dicts are passed through (given a ``weight_decay`` default when they lack one).
    """
    items = list(params)
    if items and all(isinstance(p, dict) for p in items):
        return [{"weight_decay": weight_decay, **g} for g in items]
    trainable = [p for p in items if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested dict/list/tuple) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _scalars(out: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() for k, v in out.items() if isinstance(v, torch.Tensor) and v.numel() == 1}


def _gather_rng() -> list[torch.Tensor]:
    """Every rank's torch RNG state, in rank order (all ranks must call)."""
    mine, _ = capture_rng()
    if not D.is_distributed():
        return [mine]
    parts = [torch.empty_like(mine) for _ in range(D.world_size())]
    dist.all_gather(parts, mine)
    return parts


def _write_log(out_dir: Path, history: list[dict[str, Any]]) -> None:
    with atomic_path(out_dir / LOG_NAME) as tmp:
        tmp.write_text("".join(json.dumps(h) + "\n" for h in history))


def _append_log(out_dir: Path, entry: dict[str, Any]) -> None:
    with (out_dir / LOG_NAME).open("a") as f:
        f.write(json.dumps(entry) + "\n")


def _resume(
    model: nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig, rank: int, world: int
) -> tuple[int, list[dict[str, Any]], int | None]:
    """Load the newest checkpoint of ``config.out_dir`` if there is one: (start step, history, resumed step)."""
    ckpt = load_latest_checkpoint(config.out_dir) if config.out_dir else None  # past a damaged newest one
    if ckpt is None:
        return 0, [], None
    saved = ckpt.state.get("config", {})
    if saved.get("batch_size") not in (None, config.batch_size):
        raise LowbitError(
            f"{config.out_dir} holds a run with global batch size {saved['batch_size']}; received "
            f"{config.batch_size}; accepted: the same value (or a new --out directory)"
        )
    model.load_state_dict(ckpt.model)
    restore_optimizer(optimizer, ckpt)
    rng = ckpt.state.get("rng", [])
    if ckpt.state.get("world") == world and f"torch.rank{rank}" in ckpt.rng and rank < len(rng):
        restore_rng(ckpt.rng[f"torch.rank{rank}"], rng[rank])
    else:  # a different number of processes: random streams cannot be continued, only re-seeded
        torch.manual_seed(config.seed + 1000003 * ckpt.step + rank)
    return ckpt.step, list(ckpt.state.get("history", [])), ckpt.step


def _checkpoint(
    model: nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig, step: int,
    history: list[dict[str, Any]], on_checkpoint: CheckpointFn | None,
) -> Path | None:
    """All ranks gather RNG states; rank 0 writes. Returns the path on rank 0."""
    rng_states = _gather_rng()
    _, mine = capture_rng()
    others: list[Any] = [mine]
    if D.is_distributed():
        others = [None] * D.world_size()
        dist.all_gather_object(others, mine)  # in-memory between our own processes, never from disk
    path = None
    if D.is_main():
        state = {
            "data_position": {"step": step, "samples": step * config.batch_size},
            "world": D.world_size(),
            "config": asdict(config),
            "rng": others,
            "history": history,
        }
        path = _save_checkpoint(config.out_dir, step, unwrap(model), optimizer, rng_states, state,
                                keep=config.keep_checkpoints)
        if on_checkpoint is not None:
            on_checkpoint(unwrap(model), step, path)
    D.barrier()
    return path


def train(
    model: nn.Module,
    loss_fn: LossFn,
    batches: BatchFactory,
    config: TrainConfig,
    params: Iterable[Any] | None = None,
    eval_fn: EvalFn | None = None,
    on_checkpoint: CheckpointFn | None = None,
) -> TrainState:
    """Train ``model`` for ``config.steps`` steps (resuming from ``config.out_dir`` if it has a checkpoint).

    - ``loss_fn(model, batch) -> {"loss": scalar, ...}``: must call ``model(...)`` (see module docstring).
    - ``batches(start_step, rank, world)``: iterator of this rank's batches from ``start_step`` on;
      deterministic in its arguments so a resumed run sees the same data (``sampling.index_batches``).
    - ``params``: parameters or param-group dicts to optimise (default: ``model``'s trainable ones).
    - ``eval_fn(model, step) -> dict``: run on rank 0 in eval mode under ``torch.no_grad``.
    - ``on_checkpoint(model, step, path)``: called on rank 0 after each checkpoint is written.

    Example:
        >>> cfg = TrainConfig(steps=100, lr=1e-3, batch_size=32, out_dir="runs/a")  # doctest: +SKIP
        >>> state = train(model, loss_fn, index_batches(len(ds), 32, 0, collate), cfg)  # doctest: +SKIP
    """
    config.validate()
    rank, world = D.init_distributed()
    local_batch_size(config.batch_size, world)  # fail early if the global batch does not split
    device = torch.device(f"cuda:{D.local_rank()}") if torch.cuda.is_available() and world > 1 else None
    if device is not None:
        model.to(device)
    torch.manual_seed(config.seed + rank)
    trainable = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise LowbitError("nothing to train: received a model with no trainable parameters; accepted: >= 1")
    optimizer = torch.optim.AdamW(param_groups(trainable, config.weight_decay), lr=config.lr,
                                  betas=config.betas, eps=config.eps)
    opt_params = [p for g in optimizer.param_groups for p in g["params"]]
    start, history, resumed = _resume(model, optimizer, config, rank, world)
    out_dir = Path(config.out_dir) if config.out_dir else None
    if out_dir is not None and D.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_log(out_dir, history)  # drop log lines written after the checkpoint we resume from
    state = TrainState(step=start, history=history, resumed_from=resumed,
                       last=next((h for h in reversed(history) if "loss" in h), {}))
    if start >= config.steps:
        state.checkpoint = latest_checkpoint(out_dir) if out_dir else None
        return state

    wrapped: nn.Module = model
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(model, find_unused_parameters=config.find_unused_parameters)
    wrapped.train()
    data: Iterator[Any] = iter(batches(start, rank, world))
    autocast = (torch.autocast(device_type=(device or torch.device("cpu")).type, dtype=torch.bfloat16)
                if config.bf16 else contextlib.nullcontext())
    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=start, desc="train", unit="step", disable=not (config.progress
               and D.is_main()), dynamic_ncols=True)
    sums: dict[str, torch.Tensor] = {}
    count, tick = 0, time.perf_counter()
    try:
        for step in range(start, config.steps):
            lr = lr_at(step, config)
            for g in optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            batch = next(data)
            if device is not None:
                batch = to_device(batch, device)
            with autocast:
                out = loss_fn(wrapped, batch)
            if "loss" not in out:
                raise LowbitError(f"loss_fn returned keys {sorted(out)}; accepted: a dict with a 'loss' tensor")
            out["loss"].float().backward()
            if config.grad_clip:
                out["grad_norm"] = torch.nn.utils.clip_grad_norm_(opt_params, config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for k, v in _scalars(out).items():
                sums[k] = sums.get(k, torch.zeros(())) + v.cpu()
            count += 1
            done = step + 1
            bar.update(1)
            if done % config.log_every == 0 or done == config.steps:
                keys = sorted(sums)
                means = D.all_reduce_mean(torch.stack([sums[k] / count for k in keys]))
                elapsed = time.perf_counter() - tick
                entry = {"step": done, "lr": lr, **{k: float(v) for k, v in zip(keys, means, strict=True)},
                         "samples_per_s": count * config.batch_size / max(elapsed, 1e-9)}
                state.last, sums, count, tick = entry, {}, 0, time.perf_counter()
                history.append(entry)
                bar.set_postfix(loss=f"{entry['loss']:.4f}", sps=f"{entry['samples_per_s']:.0f}")
                if out_dir is not None and D.is_main():
                    _append_log(out_dir, entry)
            if eval_fn is not None and ((config.eval_every and done % config.eval_every == 0)
                                        or done == config.steps):
                metrics: dict[str, Any] = {}
                if D.is_main():
                    plain = unwrap(wrapped)
                    plain.eval()
                    with torch.no_grad():
                        metrics = dict(eval_fn(plain, done))
                    plain.train()
                    entry = {"step": done, "eval": metrics}
                    history.append(entry)
                    bar.write(f"step {done}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                            for k, v in metrics.items()))
                    if out_dir is not None:
                        _append_log(out_dir, entry)
                D.barrier()
                tick = time.perf_counter()  # evaluation time is not training throughput
            if out_dir is not None and ((config.ckpt_every and done % config.ckpt_every == 0)
                                        or done == config.steps):
                state.checkpoint = _checkpoint(wrapped, optimizer, config, done, history, on_checkpoint)
                tick = time.perf_counter()
            state.step = done
    finally:
        bar.close()
    return state
