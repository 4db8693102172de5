"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a directory ``<out_dir>/checkpoints/step-00001200/`` written atomically (a crash mid-write
leaves the previous checkpoint intact):

- ``model.safetensors``: the model's ``state_dict`` (the unwrapped module, never a DDP wrapper)
- ``optimizer.safetensors``: optimizer state tensors, keyed ``state.<param index>.<name>``
- ``rng.safetensors``: each rank's torch RNG state, keyed ``torch.rank<r>``
- ``state.json``: step, data position, config, optimizer param groups, numpy/python RNG states, metrics

Only tensors and JSON: loading never unpickles anything, so a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.errors import LowbitError
from lowbit.io import atomic_path

CHECKPOINT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass
class Checkpoint:
    """A loaded checkpoint: tensors plus the JSON state (see the module docstring)."""

    path: Path
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]
    state: dict[str, Any]


def step_dir(out_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives."""
    return Path(out_dir) / CHECKPOINT_DIR / f"step-{step:08d}"


def checkpoints_newest_first(out_dir: str | Path) -> list[Path]:
    """The complete checkpoints under ``out_dir``, highest step first (atomic writes: a directory with this
    name is complete, unless the disk damaged it since; ``load_latest_checkpoint`` falls back past those)."""
    root = Path(out_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True) if (p / "state.json").is_file()]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``out_dir``, or None."""
    found = checkpoints_newest_first(out_dir)
    return found[0] if found else None


def load_latest_checkpoint(out_dir: str | Path) -> Checkpoint | None:
    """The newest checkpoint under ``out_dir`` that reads back whole; a damaged newer one (truncated tensors,
    garbled state) is skipped with a warning. None when there is none; a ``LowbitError`` when all are damaged."""
    import warnings

    found = checkpoints_newest_first(out_dir)
    errors = []
    for path in found:
        try:
            return load_checkpoint(path)
        except LowbitError as exc:
            errors.append(str(exc))
            warnings.warn(f"training checkpoint {path} is damaged ({str(exc)[:160]}); trying the previous one",
                          UserWarning, stacklevel=2)
    if found:
        raise LowbitError(f"every training checkpoint under {out_dir} is damaged ({len(found)}; newest: "
                          f"{errors[0][:200]}); accepted: delete {Path(out_dir) / CHECKPOINT_DIR} to start over")
    return None


def capture_rng() -> tuple[torch.Tensor, dict[str, Any]]:
    """This process's RNG states: torch's as a uint8 tensor, numpy's and python's as JSON-ready values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return torch.get_rng_state(), {
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def restore_rng(torch_state: torch.Tensor, other: dict[str, Any]) -> None:
    """Inverse of ``capture_rng``."""
    torch.set_rng_state(torch_state.to(torch.uint8))
    kind, keys, pos, has_gauss, cached = other["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = other["python"]
    random.setstate((version, tuple(internal), gauss))


def _flatten_optimizer(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in opt_state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    groups = [dict(g) for g in meta["param_groups"]]
    for g in groups:  # JSON turned tuples into lists; AdamW unpacks either, but keep the original type
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """A ``state_dict`` safetensors accepts: detached, contiguous, no storage shared between entries."""
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rng_states: list[torch.Tensor],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write the checkpoint of ``step`` atomically; keep the newest ``keep`` checkpoints. Returns its path.

    ``rng_states`` holds every rank's torch RNG state (rank order); ``state`` is JSON-ready extra state
    (data position, config, python/numpy RNG, metrics).
    """
    target = step_dir(out_dir, step)
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    with atomic_path(target, is_dir=True) as tmp:
        save_file(model_tensors(model), str(tmp / "model.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file({f"torch.rank{r}": s.contiguous() for r, s in enumerate(rng_states)}, str(tmp / "rng.safetensors"))
        full = {"step": step, **state, "optimizer": opt_meta}
        (tmp / "state.json").write_text(json.dumps(full, indent=1) + "\n")
    _prune(Path(out_dir), keep)
    return target


def _prune(out_dir: Path, keep: int) -> None:
    root = out_dir / CHECKPOINT_DIR
    steps = sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()), key=lambda p: p.name)
    for old in steps[: max(len(steps) - max(keep, 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint directory written by ``save_checkpoint`` (tensors and JSON only; no pickle)."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        return Checkpoint(
            path=path,
            step=int(state["step"]),
            model=load_file(str(path / "model.safetensors")),
            optimizer=load_file(str(path / "optimizer.safetensors")),
            rng=load_file(str(path / "rng.safetensors")),
            state=state,
        )
    except Exception as exc:
        if not isinstance(exc, (OSError, ValueError, KeyError, TypeError, RecursionError)) and \
                type(exc).__name__ != "SafetensorError":
            raise
        raise LowbitError(
            f"cannot read training checkpoint {path}: {exc}; expected a directory with model.safetensors, "
            "optimizer.safetensors, rng.safetensors and state.json (delete it to start over)"
        ) from exc


def restore_optimizer(optimizer: torch.optim.Optimizer, ckpt: Checkpoint) -> None:
    """Load the checkpoint's optimizer state into ``optimizer`` (built over the same parameters)."""
    optimizer.load_state_dict(_unflatten_optimizer(ckpt.optimizer, ckpt.state["optimizer"]))
