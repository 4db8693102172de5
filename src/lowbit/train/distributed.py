"""Process-group helpers for data-parallel training under ``torchrun`` (one process per CPU/GPU).

``torchrun --nproc_per_node N`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and the rendezvous address);
``init_distributed()`` turns those into a process group: gloo on CPU, nccl on CUDA. Without them everything
here degrades to the single-process case, so the same training code runs on one machine or many.

``all_gather_with_grad`` is the feature exchange of distributed contrastive losses (open_clip's
``gather_with_grad=True``; Radford et al., 2021 train CLIP with an all-gathered similarity matrix): the
forward concatenates every rank's features, the backward all-reduces (sums) the incoming gradient and returns
this rank's slice, so a feature gets the gradient of every rank's loss term that used it.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

__all__ = [
    "all_gather",
    "all_gather_with_grad",
    "all_reduce_mean",
    "barrier",
    "cleanup_distributed",
    "init_distributed",
    "is_distributed",
    "is_main",
    "local_rank",
    "rank",
    "world_size",
]


def is_distributed() -> bool:
    """True when a process group with more than one process is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    """Rank on this machine (``LOCAL_RANK`` from torchrun), 0 otherwise."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on the process that writes checkpoints and logs (rank 0)."""
    return rank() == 0


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> tuple[int, int]:
    """Join the process group torchrun describes in the environment; return ``(rank, world_size)``.

    A no-op returning ``(0, 1)`` when ``WORLD_SIZE`` is unset or 1, or when a group is already up
    (then its rank/size are returned). Backend: nccl when CUDA is available, else gloo.

    Example:
        >>> init_distributed()  # plain python, not torchrun
        (0, 1)
    """
    if dist.is_available() and dist.is_initialized():
        return rank(), world_size()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or not dist.is_available():
        return 0, 1
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return rank(), world_size()


def cleanup_distributed() -> None:
    """Leave the process group (if any); safe to call twice."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over ranks (a detached copy; ``value`` itself when not distributed)."""
    if not is_distributed():
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world_size()


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` [B, ...] from every rank in rank order, without gradients (ids, labels)."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums the gradient over ranks and keeps this rank's slice.

    All-reduce + slice instead of reduce-scatter because gloo (CPU) has no reduce-scatter; the extra traffic
    is one feature matrix, negligible next to the towers.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        tensor = tensor.contiguous()
        ctx.rank, ctx.n = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor)
        return torch.cat(parts, dim=0)  # [world * B, ...]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` [B, ...] from every rank in rank order -> [world * B, ...], differentiably.

    Every rank must pass the same shape. Returns ``tensor`` unchanged when not distributed.

    Example:
        >>> all_gather_with_grad(torch.ones(2, 3)).shape  # single process
        torch.Size([2, 3])
    """
    if not is_distributed():
        return tensor
    return _GatherWithGrad.apply(tensor)
