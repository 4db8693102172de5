"""kill -9 at random moments of ``lowbit quantize``, ``lowbit qat`` and ``lowbit train clip`` (real CLI processes).

Shared by ``tests/test_kill9.py`` and ``benchmarks/bench_hostile.py`` (category ``kill-9``). One ``Verb`` is a
command on tiny settings (a second or a few), the output it overwrites or resumes, and a fingerprint of its
result. A trial:

1. the uninterrupted run into ``ref/`` (once per verb): its fingerprint and its wall time ``T``;
2. an old output in place (``quantize``: a finished w8 checkpoint that the run replaces with ``--overwrite``;
   ``qat`` / ``train clip``: whatever the killed runs left);
3. the same command started and sent SIGKILL after a seeded uniform time in ``[0.05 T, 0.95 T]`` — or, for
   two thirds of the kills, at the first write under way after that time (a temporary output seen, then 0 or
   0..20 ms later): uniform times alone almost never land inside the few milliseconds a write takes —
   ``kills`` times in a row (each after the previous one died);
4. after each kill: the output directory is whole: ``quantize``'s old checkpoint, or its replacement, loads
   (never a mixture), and every training checkpoint left loads;
5. the command run to the end: it must clean what the killed runs left (no ``.NAME.*.tmp`` / ``.NAME.old``
   beside the outputs) and give the uninterrupted run's fingerprint.

Fingerprints are exact (sha256 of the output's tensor file plus the logged metrics without timings): the runs
are single-threaded (``OMP_NUM_THREADS=1``) and a resume restores weights, optimizer state, RNG and the data
position, so a resumed run repeats the same float operations in the same order and must be bit-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# The CLI with the test tree's families and datasets registered (tiny-family, tiny-qat, tiny-qat-data).
_RUNNER = ("import sys; import tests.models.tiny_family, tests.quant.qat_tiny; from lowbit.cli import main; "
           "sys.exit(main(sys.argv[1:]))")
TIMING_KEYS = {"samples_per_s", "seconds", "elapsed", "time", "tokens_per_s"}


@dataclass
class Verb:
    name: str
    argv: Callable[[Path], list[str]]  # the command for a work directory
    output: Callable[[Path], Path]  # the output that must stay whole
    fingerprint: Callable[[Path], dict[str, Any]]
    prepare: Callable[[Path], None] = lambda work: None  # the old output a run overwrites
    ref_seconds: float = 0.0
    ref_print: dict[str, Any] = field(default_factory=dict)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _log_metrics(path: Path) -> list[dict[str, Any]]:
    """The run log without wall-clock fields (the only thing allowed to differ between runs)."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def _env() -> dict[str, str]:
    path = f"{ROOT / 'src'}:{ROOT}"
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "LOWBIT_DEBUG": "1"}


def start(verb: Verb, work: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", _RUNNER, *verb.argv(work)], cwd=work, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def run_to_end(verb: Verb, work: Path, timeout: float = 300) -> float:
    """Run the command to completion; its wall time. A failure raises with the end of its stderr."""
    t0 = time.perf_counter()
    proc = start(verb, work)
    _, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{verb.name} exited {proc.returncode}: {err.decode(errors='replace')[-1500:]}")
    return time.perf_counter() - t0


def kill_after(verb: Verb, work: Path, seconds: float, in_write: float | None = None) -> bool:
    """Start the command and SIGKILL it after ``seconds``; with ``in_write``, from then on wait for the first
    temporary output to appear (a write under way) and kill ``in_write`` seconds later. False when the command
    had already finished."""
    proc = start(verb, work)
    out = verb.output(work)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        while in_write is not None and proc.poll() is None and not leftovers(out.parent, out, out / "checkpoints"):
            time.sleep(0.0005)
        if in_write:
            time.sleep(in_write)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            return True
    proc.communicate()
    return False


def leftovers(*dirs: Path) -> list[str]:
    """Temporaries of killed runs (``atomic_path``'s ``.NAME.PID.xxxx.tmp``, a ``.NAME.old`` moved aside)."""
    found = []
    for d in dirs:
        if d.is_dir():
            found += [str(p) for p in d.iterdir() if p.name.startswith(".") and p.name.endswith((".tmp", ".old"))]
    return sorted(found)


# --- the verbs ------------------------------------------------------------------------------------------------------
def _quantize_print(work: Path) -> dict[str, Any]:
    ck = work / "ck"
    manifest = json.loads((ck / "manifest.json").read_text())
    return {"tensors": _sha(ck / "model.safetensors"), "recipe": manifest.get("recipe")}


def _quantize_prepare(work: Path) -> None:
    from tests.models.tiny_family import write_tiny_family

    if not (work / "src").exists():
        write_tiny_family(work / "src")
    if not (work / "ck").exists():  # the old output: a w8 checkpoint, replaced by the w4 run with --overwrite
        proc = subprocess.run([sys.executable, "-c", _RUNNER, *_quantize_argv(work, "*=w8")], cwd=work, env=_env(),
                              capture_output=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.decode(errors="replace")[-1500:])


def _quantize_argv(work: Path, recipe: str = "*=w4g32") -> list[str]:
    return ["quantize", f"tiny-family:{work / 'src'}", "--recipe", recipe, "--out", str(work / "ck"), "--overwrite"]


def _run_print(work: Path) -> dict[str, Any]:
    run = work / "run"
    summary = json.loads((run / "summary.json").read_text())
    keep = {k: v for k, v in summary.items() if k in ("steps", "eval", "final_eval", "last", "bits_per_weight")}
    if isinstance(keep.get("last"), dict):
        keep["last"] = {k: v for k, v in keep["last"].items() if k not in TIMING_KEYS}
    return {"tensors": _sha(run / "model" / "model.safetensors"), "log": _log_metrics(run / "train_log.jsonl"),
            "summary": keep}


QAT_ARGV = ["qat", "tiny-qat", "--recipe", "vision=w1:binary,text=w1.58", "--data", "tiny-qat-data", "--steps", "8",
            "--batch-size", "8", "--lr", "1e-2", "--warmup-steps", "1", "--eval-every", "4", "--eval-samples", "16",
            "--ckpt-every", "1", "--train-samples", "32", "--no-progress"]
CLIP_ARGV = ["train", "clip", "--data", "shapes", "--steps", "8", "--batch-size", "8", "--warmup-steps", "1",
             "--limit", "32", "--log-every", "1", "--ckpt-every", "1", "--eval-task", "", "--arch", "vision_layers=1",
             "--arch", "text_layers=1", "--num-workers", "0", "--no-progress"]


def verbs() -> list[Verb]:
    return [
        Verb("quantize", _quantize_argv, lambda w: w / "ck", _quantize_print, prepare=_quantize_prepare),
        Verb("qat", lambda w: [*QAT_ARGV, "--out", str(w / "run")], lambda w: w / "run", _run_print),
        Verb("train-clip", lambda w: [*CLIP_ARGV, "--out", str(w / "run")], lambda w: w / "run", _run_print),
    ]


def check_whole(verb: Verb, work: Path, old: dict[str, Any] | None) -> str:
    """'' when what the killed run left is whole, else what is wrong."""
    out = verb.output(work)
    if verb.name == "quantize":
        import tests.models.tiny_family  # noqa: F401  (the family the checkpoint names)
        from lowbit.workflows.load import load

        try:
            load(str(out))
            now = _quantize_print(work)
        except Exception as exc:  # noqa: BLE001  (any failure to load is the finding)
            return f"the checkpoint does not load after the kill: {type(exc).__name__}: {exc}"[:300]
        if now not in (old, verb.ref_print):
            return "the checkpoint is neither the old one nor the new one"
        return ""
    from lowbit.train.state import checkpoints_newest_first, load_checkpoint

    for ckpt in checkpoints_newest_first(out) if out.exists() else []:
        try:
            load_checkpoint(ckpt)
        except Exception as exc:  # noqa: BLE001
            return f"{ckpt.name} does not load after the kill: {type(exc).__name__}: {exc}"[:300]
    return ""


def reference(verb: Verb, root: Path) -> Verb:
    """The uninterrupted run: its wall time and fingerprint."""
    work = root / f"{verb.name}-ref"
    work.mkdir(parents=True)
    verb.prepare(work)
    verb.ref_seconds = run_to_end(verb, work)
    verb.ref_print = verb.fingerprint(work)
    return verb


def trial(verb: Verb, work: Path, rng: random.Random, kills: int = 1, first_in_write: bool = False) -> dict[str, Any]:
    """Kill ``verb`` ``kills`` times at seeded random moments, then run it to the end; what was found.

    Returns ``{"killed": n, "at": [...], "lost": msg, "left_by_kills": n, "old_kept": n, "leftovers": [...],
    "same": bool, "error": msg}``: kills that hit a running process, the seconds after start, what was found not
    whole after a kill, the most temporaries a kill left, kills after which the old quantize output was still
    the one in place, temporaries left after the final run, whether its result is the uninterrupted one's."""
    work.mkdir(parents=True, exist_ok=True)
    verb.prepare(work)
    old = verb.fingerprint(work) if verb.name == "quantize" else None
    out = verb.output(work)
    row: dict[str, Any] = {"killed": 0, "at": [], "lost": "", "left_by_kills": 0, "old_kept": 0, "leftovers": [],
                           "same": False, "error": ""}
    for i in range(kills):
        at = round(rng.uniform(0.05, 0.95) * verb.ref_seconds, 3)
        row["at"].append(at)
        in_write = rng.choice([None, 0.0, rng.uniform(0, 0.02)])  # any moment, or inside a write
        if i == 0 and first_in_write:
            in_write = 0.0
        row["killed"] += kill_after(verb, work, at, in_write)
        row["left_by_kills"] = max(row["left_by_kills"], len(leftovers(out.parent, out, out / "checkpoints")))
        row["lost"] = row["lost"] or check_whole(verb, work, old)
        row["old_kept"] += old is not None and verb.fingerprint(work) == old
    try:
        run_to_end(verb, work)
        row["leftovers"] = leftovers(out.parent, out, out / "checkpoints")
        row["same"] = verb.fingerprint(work) == verb.ref_print
    except Exception as exc:  # noqa: BLE001
        row["error"] = f"{type(exc).__name__}: {exc}"[-600:]
    return row
