"""Hostile and careless input, counted: the figures of issue 22's closing note.

Runs every case of ``tests/fuzz/cases.py`` per category (fixed seed: the same cases every run) plus the output
and weight-file cases built here, each under a 10 s alarm, and writes ``benchmarks/results/hostile.json``:
per category the cases tried, successes, clean errors (one-line ``LowbitError``), tracebacks (any other
exception, or a CLI internal error), hangs, silent accepts (invalid input accepted), outputs lost, and the
largest growth of the process's peak RSS with the input that caused it. Category ``kill-9``: real CLI processes
of ``quantize``, ``qat`` and ``train clip`` killed at random moments (``tests/fuzz/kill9.py``). About five
minutes on 2 cores (run it under ``flock /work/heavy.lock``).

    PYTHONPATH=src:. python benchmarks/bench_hostile.py
"""

from __future__ import annotations

import errno
import json
import os
import random
import resource
import shutil
import struct
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from lowbit.errors import LowbitError  # noqa: E402
from tests.fuzz import cases  # noqa: E402
from tests.fuzz.cases import Case  # noqa: E402

SEED = 22


def _rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_category(name: str, items: list[Case], lost: int = 0) -> dict[str, Any]:
    counts: Counter[str] = Counter()
    worst = (0, "")
    examples: dict[str, list[str]] = {}
    t0 = time.perf_counter()
    for case in items:
        before = _rss_kb()
        outcome, detail = cases.classify(case)
        grew = _rss_kb() - before
        if grew > worst[0]:
            worst = (grew, case.name)
        counts[outcome] += 1
        if outcome not in ("ok", "clean") and len(examples.setdefault(outcome, [])) < 5:
            examples[outcome].append(f"{case.name}: {detail}"[:300])
    row = {"category": name, "cases": len(items), "ok": counts["ok"], "clean_errors": counts["clean"],
           "tracebacks": counts["traceback"], "hangs": counts["hang"], "silent_accepts": counts["silent"],
           "valid_refused": counts["refused-valid"], "outputs_lost": lost,
           "worst_peak_rss_growth_mb": round(worst[0] / 1024, 1), "worst_input": worst[1],
           "seconds": round(time.perf_counter() - t0, 1), "examples": examples}
    print(f"{name:<14} {row['cases']:>5} cases  ok {row['ok']:>5}  clean {row['clean_errors']:>5}  "
          f"tracebacks {row['tracebacks']}  hangs {row['hangs']}  silent {row['silent_accepts']}  "
          f"lost {lost}  worst +{row['worst_peak_rss_growth_mb']} MB ({worst[1]})", flush=True)
    return row


def _checkpoint(root: Path) -> tuple[Path, Path, Any, Any]:
    from lowbit.workflows.load import load
    from lowbit.workflows.quantize import quantize, save
    from tests.models.tiny_family import write_tiny_family

    src = write_tiny_family(root / "src")
    model = load(f"tiny-family:{src}")
    report = quantize(model, "*=w4g32", progress=False)
    return src, save(model, root / "ck", report=report), model, report


def manifest_cases(ck: Path, work: Path, rng: random.Random) -> list[Case]:
    from lowbit.workflows.load import load

    manifest = json.loads((ck / "manifest.json").read_text())
    out = work / "mutated"
    shutil.copytree(ck, out)

    def run(m: Any) -> None:
        cases.write_manifest(out, m)
        load(str(out))

    return [Case(f"manifest-{name}", lambda m=m: run(m)) for name, m in cases.manifest_mutations(manifest, rng, 400)]


def output_cases(src: Path, ck: Path, model: Any, report: Any, work: Path) -> tuple[list[Case], list[Path]]:
    """Every --out a careless user types, against a folder of documents; plus disk full at every write step.
    Returns the cases and the documents that must survive them."""
    import lowbit.workflows.checkpoint as checkpoint
    from lowbit.cli import main
    from lowbit.io import write_result_json
    from lowbit.workflows.load import load
    from lowbit.workflows.quantize import save

    docs = work / "mydocs"
    (docs / "photos").mkdir(parents=True)
    (docs / "thesis.tex").write_text("chapter 1")
    note = work / "note.txt"
    note.write_text("keep")
    fifo = work / "fifo"
    os.mkfifo(fifo)
    items: list[Case] = []

    def cli(*argv: str) -> None:
        code = main(list(argv))
        if code == 1:
            raise RuntimeError("internal error")
        if code == 2:
            raise LowbitError("refused")

    outs = [str(docs), str(note), ".", "..", "", "/", str(src), str(src / "inside"), str(src.parent), str(fifo),
            "/proc/x/y", str(note / "sub"), str(ck), "a\x00b", str(docs / "thesis.tex")]
    replaceable = {str(ck)}  # an existing checkpoint: replacing it is what the user asked
    never = set(outs[2:12]) | {outs[13]}  # refused even with --overwrite
    for i, out in enumerate(outs):
        valid = None if out in replaceable else False
        items.append(Case(f"save-out-{i}", lambda o=out: save(model, o, report=report), valid=valid))
        if out in never:
            items.append(Case(f"save-out-{i}-overwrite", lambda o=out: save(model, o, report=report, overwrite=True),
                              valid=False))
        for verb in (["quantize", f"tiny-family:{src}", "--recipe", "*=w8", "--out"],
                     ["data", "shard", str(work / "nodata"), "--out"], ["sweep", "no-such-model", "--out"],
                     ["qat", "no-such-model", "--recipe", "w8", "--out"],
                     ["train", "clip", "--data", "no-such-data", "--out"],
                     ["export", "no-such-model", "--format", "gguf", "--out"]):
            items.append(Case(f"cli-{verb[0]}-out-{i}", lambda v=verb, o=out: cli(*v, o),
                              valid=None if out in replaceable and verb[0] == "quantize" else False))
        items.append(Case(f"json-{i}", lambda o=out: write_result_json(o, {"top1": 1.0}), valid=False))
    copy = work / "docs-copy"
    shutil.copytree(docs, copy)
    items.append(Case("overwrite-a-copy-when-asked", lambda: save(model, copy, report=report, overwrite=True),
                      valid=True))
    kept = save(model, work / "kept", report=report)
    for step in ("save_file", "manifest", "rename-1", "rename-2"):
        items.append(Case(f"enospc-{step}", lambda s=step: _disk_full(s, model, report, kept, checkpoint),
                          valid=False))
    items.append(Case("reload-after-enospc", lambda: load(str(kept)), valid=True))
    return items, [docs / "thesis.tex", docs / "photos", note, kept / "manifest.json", src / "config.json"]


def _disk_full(step: str, model: Any, report: Any, out: Path, checkpoint: Any) -> None:
    from lowbit.workflows.quantize import save

    def full(*_: Any, **__: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    real_save, real_write, real_replace = checkpoint.save_file, Path.write_text, os.replace
    calls: list[int] = []

    def replace(a: Any, b: Any) -> None:
        calls.append(1)
        if len(calls) == int(step[-1]):
            full()
        real_replace(a, b)

    try:
        if step == "save_file":
            checkpoint.save_file = full
        elif step == "manifest":
            Path.write_text = lambda self, *a, **k: (full() if self.name == "manifest.json"  # type: ignore[method-assign]
                                                     else real_write(self, *a, **k))
        else:
            os.replace = replace
        save(model, out, report=report)
    finally:
        checkpoint.save_file, Path.write_text, os.replace = real_save, real_write, real_replace


def weight_cases(work: Path) -> list[Case]:
    import pickle

    from lowbit import api
    from lowbit.models.loading import load_model

    asset = Path(api.__file__).parent / "assets" / "clip-vit-tiny-fashion"
    load_model(str(asset))  # warm: transformers' first import takes seconds, which the alarm would count
    items = []
    data = (asset / "model.safetensors").read_bytes()
    damages = {"truncated-half": data[: len(data) // 2], "truncated-8": data[:8], "empty": b"",
               "header-2^60": struct.pack("<Q", 2**60) + data[8:64], "pickle": pickle.dumps({"a": 1}),
               "zeros": b"\0" * 4096, "header-garbage": struct.pack("<Q", 16) + b"{not json!!!!!!" + data[24:200]}
    for name, blob in damages.items():
        d = work / f"clip-{name}"
        shutil.copytree(asset, d)
        (d / "model.safetensors").write_bytes(blob)
        items.append(Case(f"weights-{name}", lambda d=d: load_model(str(d)), valid=False))
    d = work / "clip-config"
    shutil.copytree(asset, d)
    (d / "config.json").write_text("[" * 10000 + "]" * 10000)
    items.append(Case("weights-deep-config", lambda: load_model(str(d)), valid=False))
    return items


def nan_cases(ck: Path, work: Path) -> list[Case]:
    from safetensors.torch import load_file, save_file

    from lowbit.data.shapes import generate_shapes
    from lowbit.eval.zeroshot import zeroshot_classify
    from lowbit.workflows.load import load

    items = []
    for bad in (float("nan"), float("inf"), float("-inf")):
        out = work / f"nan-{bad}"
        shutil.copytree(ck, out)
        tensors = load_file(str(out / "model.safetensors"))
        for key in tensors:
            if key.endswith("scales"):
                tensors[key].fill_(bad)
        save_file(tensors, str(out / "model.safetensors"))
        items.append(Case(f"load-{bad}-scales", lambda o=out: load(str(o)), valid=False))

    def nan_model_scores() -> None:
        from lowbit.kernels.quant_linear import set_backend

        model = load(str(ck))
        set_backend(model, "reference")  # the ranking is under test, not the kernels (no compile on a cold cache)
        for name, buf in model.named_buffers():
            if name.endswith("scales"):
                buf.fill_(float("nan"))
        top1 = zeroshot_classify(model, generate_shapes(48, seed=1), progress=False)["top1"]
        if top1 != 0.0:
            raise AssertionError(f"a NaN model scored top-1 {top1}")  # a lie: counted as a traceback

    items.append(Case("nan-model-scores-zero", nan_model_scores, valid=True))
    return items


def jsonl_cases(work: Path) -> list[Case]:
    from lowbit.data.folder import load_folder

    lines = ['{"image": "a.png", "caption": ' + "[" * 10000 + "]" * 10000 + "}", '{"image": "a.png", "caption": NaN}',
             "[1, 2]", "{bad", '{"image": "../../etc/passwd", "caption": "x"}', "\x00", '"just a string"']
    items = []
    for i, line in enumerate(lines):
        d = work / f"jsonl-{i}"
        d.mkdir()
        (d / "index.jsonl").write_text(line + "\n")
        items.append(Case(f"jsonl-{i}", lambda d=d: load_folder(d)))
    return items


WORST_INPUTS = {  # the inputs that blew memory up before (issue 22), each measured in a fresh process
    "billion-laughs YAML": "p = root / 'b.yaml'; p.write_text(cases.billion_laughs()); load_recipe(str(p))",
    "100000x100000 PNG bomb": "decode_image(cases.bomb_png(100_000, 100_000))",
    "20000x1 PNG strip": "decode_image(cases.strip_png(20_000, 1))",
    "12 MP JPEG (kept)": "decode_image(PHOTO)",
    "10^20 group size recipe": "load_recipe('*=w4g100000000000000000000')",
    "10000-deep JSON manifest": "loads_json('[' * 10000 + ']' * 10000, 'manifest', 'JSON')",
}


_CHILD = """\
import sys, tempfile
from pathlib import Path
from PIL import Image
from tests.fuzz import cases
from lowbit.errors import LowbitError
from lowbit.limits import decode_image, loads_json
from lowbit.quant.recipe import load_recipe
root = Path(tempfile.mkdtemp())
PHOTO = root / "photo.jpg"
if "PHOTO" in sys.argv[1]:  # made in a grandchild: its pixels must not count
    import subprocess
    subprocess.run([sys.executable, "-c", "from PIL import Image; import sys; "
                    "Image.new('RGB', (4000, 3000), (9, 9, 9)).save(sys.argv[1])", str(PHOTO)], check=True)
def peak_kb():  # VmHWM: ru_maxrss would carry the parent's high-water mark across fork + exec
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark to the current RSS
before = peak_kb()
try:
    exec(sys.argv[1])
except LowbitError:
    pass
print(peak_kb() - before)
"""


def isolated_peaks() -> dict[str, float]:
    """Peak RSS growth (MB) of each worst input, in a fresh interpreter after the imports."""
    import subprocess

    out = {}
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}
    for name, code in WORST_INPUTS.items():
        done = subprocess.run([sys.executable, "-c", _CHILD, code], capture_output=True, text=True, env=env,
                              timeout=300)
        out[name] = round(int(done.stdout.strip().splitlines()[-1]) / 1024, 1) if done.returncode == 0 else -1.0
        print(f"  {name:<28} +{out[name]} MB", flush=True)
    return out


KILL_TRIALS = 8  # per verb, each 2 kills then a run to the end


def kill_category(work: Path, rng: random.Random, trials: int = KILL_TRIALS) -> dict[str, Any]:
    """kill -9 at random moments of real ``quantize`` / ``qat`` / ``train clip`` processes (``tests/fuzz/kill9.py``).
    A case is one kill that hit a running process: ``ok`` when what it left was whole (the old or the new
    checkpoint, loadable training checkpoints), the next run cleaned its temporaries and ended with the
    uninterrupted run's result bit for bit; a lost or mixed output counts as lost, a different result as silent
    (a resume that lies), a failed rerun as a traceback."""
    from tests.fuzz import kill9

    t0 = time.perf_counter()
    row: dict[str, Any] = {"category": "kill-9", "cases": 0, "ok": 0, "clean_errors": 0, "tracebacks": 0, "hangs": 0,
                           "silent_accepts": 0, "valid_refused": 0, "outputs_lost": 0, "verbs": {}, "examples": {}}
    for verb in kill9.verbs():
        kill9.reference(verb, work)
        stats = Counter()
        for i in range(trials):
            found = kill9.trial(verb, work / f"{verb.name}-{i}", rng, kills=2, first_in_write=i % 2 == 0)
            stats["kills"] += found["killed"]
            stats["temporaries_left_by_kills"] += found["left_by_kills"] > 0
            stats["old_checkpoint_kept"] += found["old_kept"]
            bad = ("tracebacks" if found["error"] else "outputs_lost" if found["lost"] or found["leftovers"]
                   else "silent_accepts" if not found["same"] else "")
            if bad:
                row[bad] += 1
                row["examples"].setdefault(bad, []).append(f"{verb.name}-{i}: {found}"[:300])
            else:
                row["ok"] += found["killed"]
            row["cases"] += found["killed"] if not bad else 1
        row["verbs"][verb.name] = {"trials": trials, "reference_seconds": round(verb.ref_seconds, 2), **stats}
    row["worst_peak_rss_growth_mb"] = 0.0  # the parent only waits; the children's peak is below
    row["worst_child_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    row["worst_input"] = "largest CLI process (killed or not)"
    row["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"kill-9         {row['cases']:>5} kills  ok {row['ok']:>5}  tracebacks {row['tracebacks']}  "
          f"lost {row['outputs_lost']}  resumed differently {row['silent_accepts']}  {row['verbs']}", flush=True)
    return row


def main() -> None:
    rng = random.Random(SEED)
    load_before = os.getloadavg()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lowbit-hostile-") as tmp:
        work = Path(tmp)
        src, ck, model, report = _checkpoint(work / "model")
        results.append(run_category("recipe-strings", list(cases.recipe_strings(rng, 400))))
        results.append(run_category("recipe-yaml", list(cases.recipe_yaml_cases(work / "yaml", rng, 200))))
        results.append(run_category("manifests", manifest_cases(ck, work, rng)))
        results.append(run_category("images", list(cases.image_cases(work / "images", rng, 400))))
        results.append(run_category("weight-files", weight_cases(work)))
        results.append(run_category("jsonl", jsonl_cases(work)))
        results.append(run_category("nan-inf", nan_cases(ck, work)))
        items, survivors = output_cases(src, ck, model, report, work / "outputs")
        row = run_category("outputs", items)
        row["outputs_lost"] = sum(not p.exists() for p in survivors)
        results.append(row)
        root = work / "cli"
        root.mkdir()
        (root / "docs").mkdir()
        (root / "docs" / "thesis.tex").write_text("keep")
        os.mkfifo(root / "fifo")
        from lowbit.cli import main as cli_main

        def cli_case(argv: list[str]) -> None:
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                try:
                    code = cli_main([a for a in argv if a != "--debug"])
                except SystemExit as exc:
                    code = exc.code
            if code == 1:
                raise RuntimeError(f"internal error for {argv}")
            if code == 2:
                raise LowbitError("usage or input error")

        row = run_category("cli", [Case(f"cli-{i}:{' '.join(a)[:80]}", lambda a=a: cli_case(a))
                                   for i, a in enumerate(cases.cli_argv(rng, root, 300))])
        row["outputs_lost"] = int(not (root / "docs" / "thesis.tex").exists())
        results.append(row)
        results.append(kill_category(work / "kill9", rng))
    totals = {k: sum(r[k] for r in results) for k in ("cases", "ok", "clean_errors", "tracebacks", "hangs",
                                                      "silent_accepts", "valid_refused", "outputs_lost")}
    worst = max(results, key=lambda r: r["worst_peak_rss_growth_mb"])
    from lowbit.eval.env import environment

    out = {"seed": SEED, "command": "PYTHONPATH=src:. python benchmarks/bench_hostile.py", "env": environment(),
           "load_average": {"before": [round(x, 2) for x in load_before],
                            "after": [round(x, 2) for x in os.getloadavg()]},
           "totals": totals, "worst_peak_rss_growth_mb": worst["worst_peak_rss_growth_mb"],
           "worst_input": f"{worst['category']}: {worst['worst_input']}",
           "process_peak_rss_mb": round(_rss_kb() / 1024, 1),
           "worst_inputs_isolated_peak_rss_growth_mb": isolated_peaks(), "categories": results}
    path = ROOT / "benchmarks" / "results" / "hostile.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(totals), f"worst +{out['worst_peak_rss_growth_mb']} MB ({out['worst_input']})")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
