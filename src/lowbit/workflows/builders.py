"""Builders of the built-in models: ``lowbit build NAME`` re-trains what a built-in model ships.

Each built-in model with trained parts registers one builder in ``BUILDERS``: ``lit-fashion`` (its two linear
heads, ``lit_build``) and ``llava-fashion`` (its projector, ``llava_build``). A builder takes ``out`` (the file
to write; default under ``$LOWBIT_HOME/models/NAME``), ``seed``, ``steps`` (None = the shipped build's) and
its own options, and returns the build log.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowbit.errors import check_options, keyword_parameters
from lowbit.io import check_output
from lowbit.paths import lowbit_home
from lowbit.registry import Registry

if TYPE_CHECKING:
    from lowbit.workflows.build_llava import ProjectorTraining

Builder = Callable[..., dict[str, Any]]
BUILDERS: Registry[Builder] = Registry("buildable model")


def _target(name: str, out: str | os.PathLike[str] | None, filename: str) -> Path:
    return Path(out) if out else lowbit_home() / "models" / name / filename


@BUILDERS.register("lit-fashion")
def build_lit(out: str | os.PathLike[str] | None = None, seed: int = 0, steps: int | None = None,
              n_train: int = 60000, n_test: int = 10000) -> dict[str, Any]:
    """Re-train lit-fashion's heads on ``n_train`` Fashion-MNIST images (+ shapes), evaluate on ``n_test``."""
    from lowbit.workflows.build_lit import HeadTraining, build_lit_heads

    hp = HeadTraining(seed=seed) if steps is None else HeadTraining(seed=seed, steps=steps)
    target = _target("lit-fashion", out, "heads.safetensors")
    return {"heads": str(target), **build_lit_heads(target, n_train=n_train, n_test=n_test, hp=hp)}


def _build_projector(name: str, hp: ProjectorTraining, out: str | os.PathLike[str] | None, steps: int | None,
                     run_dir: str | os.PathLike[str] | None) -> dict[str, Any]:
    from lowbit.workflows.build_llava import build_llava_projector

    if steps is not None:
        hp = replace(hp, steps=steps)
    target = _target(name, out, "projector.safetensors")
    return {"projector": str(target), **build_llava_projector(target, hp, run_dir=run_dir)}


@BUILDERS.register("llava-fashion")
def build_llava(out: str | os.PathLike[str] | None = None, seed: int = 0, steps: int | None = None,
                run_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Re-train llava-fashion's projector (visual instruction tuning); ``run_dir`` keeps checkpoints, so a
    killed build resumes."""
    from lowbit.workflows.build_llava import ProjectorTraining

    return _build_projector("llava-fashion", ProjectorTraining(seed=seed), out, steps, run_dir)


@BUILDERS.register("llava-fashion-hd")
def build_llava_hd(out: str | os.PathLike[str] | None = None, seed: int = 0, steps: int | None = None,
                   run_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Build llava-fashion-hd's projector (12x12 visual tokens) as shipped: two runs (``build_llava.hd_runs``),
    the first from llava-fashion's shipped projector, the second from the first's (written beside ``out`` as
    ``*.run1.safetensors``); ``steps`` sets the second run's; ``run_dir`` keeps both runs' checkpoints."""
    from lowbit.workflows.build_llava import build_llava_projector, hd_runs

    first, second = hd_runs(seed)
    target = _target("llava-fashion-hd", out, "projector.safetensors")
    run1 = target.with_name(f"{target.stem}.run1.safetensors")
    dirs = (None, None) if run_dir is None else (Path(run_dir) / "run1", Path(run_dir) / "run2")
    logs = [build_llava_projector(run1, first, run_dir=dirs[0])]
    second = replace(second, init_from=str(run1), steps=second.steps if steps is None else steps)
    logs.append(build_llava_projector(target, second, run_dir=dirs[1]))
    return {"projector": str(target), "run1": str(run1), **logs[-1], "runs": logs}


def build(name: str, out: str | os.PathLike[str] | None = None, seed: int = 0, steps: int | None = None,
          overwrite: bool = False, **options: Any) -> dict[str, Any]:
    """Run the builder registered for ``name``; options other than its own are refused with one line. ``out``
    may replace only a file a build wrote (safetensors with lowbit's metadata) unless ``overwrite``."""
    builder = BUILDERS.get(name)
    check_options(f"build {name!r}", options, keyword_parameters(builder, skip=("out", "seed", "steps")))
    if out is not None:
        check_output(out, "lowbit-safetensors", overwrite=overwrite, sources=[options.get("run_dir")])
    return builder(out=out, seed=seed, steps=steps, **options)
