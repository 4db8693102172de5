"""``--out`` never destroys user data: the output guard (``lowbit.io.check_output``) and atomic replacement under
injected disk-full errors, on a real packed checkpoint of the tiny test family."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

import lowbit.workflows.checkpoint as ckpt
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.io import OUTPUT_MARKER, RESULT_KEY, atomic_path, check_output, clean_stale_temporaries, write_json
from lowbit.workflows.load import load
from lowbit.workflows.quantize import quantize, save
from tests.models.tiny_family import write_tiny_family


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, object]:
    """(float source dir, quantized model, report)."""
    src = write_tiny_family(tmp_path_factory.mktemp("tiny") / "src")
    model = load(f"tiny-family:{src}")
    report = quantize(model, "*=w4g32", progress=False)
    return src, model, report


def _docs(tmp_path: Path) -> Path:
    docs = tmp_path / "mydocs"
    (docs / "photos").mkdir(parents=True)
    (docs / "thesis.tex").write_text("chapter 1")
    return docs


def _embedding(model: object) -> torch.Tensor:
    torch.manual_seed(0)
    return model.encode_image(torch.rand(2, 3, 32, 32))  # type: ignore[attr-defined]


def test_a_folder_of_documents_is_refused_and_kept(tmp_path: Path, tiny: tuple) -> None:
    _, model, report = tiny
    docs = _docs(tmp_path)
    with pytest.raises(LowbitError, match=r"mydocs' is a directory holding 2 entries that is not a lowbit "
                                          r"packed-checkpoint output.*--overwrite"):
        save(model, docs, report=report)
    assert (docs / "thesis.tex").read_text() == "chapter 1" and (docs / "photos").is_dir()
    save(model, docs, report=report, overwrite=True)  # asked for: replaced
    assert sorted(p.name for p in docs.iterdir()) == ["manifest.json", "model.safetensors"]


def test_a_file_is_refused_not_hidden_as_old(tmp_path: Path, tiny: tuple) -> None:
    _, model, report = tiny
    note = tmp_path / "note.txt"
    note.write_text("keep me")
    with pytest.raises(LowbitError, match="an existing file that is not a lowbit packed-checkpoint"):
        save(model, note, report=report)
    assert note.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["note.txt"]


def test_an_existing_checkpoint_and_an_empty_directory_are_replaced(tmp_path: Path, tiny: tuple) -> None:
    _, model, report = tiny
    (tmp_path / "empty").mkdir()
    save(model, tmp_path / "empty", report=report)
    save(model, tmp_path / "empty", report=report)  # a lowbit checkpoint: replaced without --overwrite
    assert json.loads((tmp_path / "empty" / "manifest.json").read_text())["format"] == "lowbit-packed"


@pytest.mark.parametrize("relation", ["equal", "inside", "containing"])
def test_the_source_is_never_an_output_even_with_overwrite(tmp_path: Path, tiny: tuple, relation: str) -> None:
    src, model, report = tiny
    out = {"equal": src, "inside": src / "q", "containing": src.parent}[relation]
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    with pytest.raises(LowbitError, match=r"(is|is inside|contains) the source"):
        save(model, out, report=report, overwrite=True)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_a_loaded_checkpoint_is_not_saved_onto_itself(tmp_path: Path, tiny: tuple) -> None:
    _, model, report = tiny
    save(model, tmp_path / "ck", report=report)
    packed = load(str(tmp_path / "ck"))
    with pytest.raises(LowbitError, match="is the source"):
        save(packed, tmp_path / "ck", overwrite=True)


@pytest.mark.parametrize("name", ["", ".", "..", "a/..", "/"])
def test_names_that_name_no_new_output(name: str) -> None:
    with pytest.raises(LowbitError, match=r"(is empty|names the current, parent or root directory)"):
        check_output(name, "packed-checkpoint")


def test_a_parent_that_is_a_file_or_unwritable(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(LowbitError, match="is not a directory"):
        check_output(tmp_path / "f" / "out", "packed-checkpoint")
    with pytest.raises(LowbitError, match=r"cannot (write|create)"):  # /proc refuses even root
        with atomic_path(Path("/proc/lowbit-out"), is_dir=True):
            pass


def test_json_naming_a_directory_or_a_foreign_file(tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match="--json .* is a directory; accepted: a file name"):
        check_output(tmp_path, "json-result", flag="--json")
    (tmp_path / "package.json").write_text('{"name": "x"}')
    with pytest.raises(LowbitError, match="not a lowbit json-result"):
        check_output(tmp_path / "package.json", "json-result", flag="--json")
    write_json(tmp_path / "r.json", {RESULT_KEY: "json-result", "metrics": {}})
    check_output(tmp_path / "r.json", "json-result")  # an earlier result: replaced


def test_stale_temporaries_of_a_killed_run_are_cleaned(tmp_path: Path, tiny: tuple) -> None:
    _, model, report = tiny
    dead = tmp_path / ".ck.999999999.abcd.tmp"  # no such pid
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")
    live = tmp_path / f".ck.{os.getpid()}.efgh.tmp"  # a run still going: left alone
    live.mkdir()
    save(model, tmp_path / "ck", report=report)
    assert not dead.exists() and live.exists()


def test_a_kill_between_the_two_renames_is_undone(tmp_path: Path) -> None:
    old = tmp_path / ".ck.old"  # the old output moved aside, the new one not yet in place
    old.mkdir()
    (old / "manifest.json").write_text("{}")
    clean_stale_temporaries(tmp_path / "ck")
    assert (tmp_path / "ck" / "manifest.json").is_file() and not old.exists()


def test_outputs_get_ordinary_permissions(tmp_path: Path, tiny: tuple) -> None:
    _, model, report = tiny
    previous = os.umask(0o022)
    try:
        save(model, tmp_path / "ck", report=report)
        write_json(tmp_path / "r.json", {})
    finally:
        os.umask(previous)
    assert (tmp_path / "ck").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "ck" / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644


def _enospc(*_: object, **__: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("step", ["safetensors", "manifest", "rename-old-aside", "rename-new-in"])
def test_disk_full_at_every_write_step_keeps_the_old_checkpoint(tmp_path: Path, tiny: tuple, step: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _, model, report = tiny
    out = save(model, tmp_path / "ck", report=report)
    expected = _embedding(load(str(out)))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    if step == "safetensors":
        monkeypatch.setattr(ckpt, "save_file", _enospc)
    elif step == "manifest":
        real_write = Path.write_text
        monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: _enospc() if self.name == "manifest.json"
                            else real_write(self, *a, **k))
    else:
        real_replace, calls = os.replace, []

        def replace(a: object, b: object) -> None:
            calls.append(1)
            if len(calls) == (1 if step == "rename-old-aside" else 2):
                _enospc()
            real_replace(a, b)

        monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(LowbitError, match="No space left on device; the existing output is unchanged"):
        save(model, out, report=report)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary left behind
    assert torch.equal(_embedding(load(str(out))), expected)


def test_cli_quantize_into_documents_is_one_line_exit_2(tmp_path: Path, tiny: tuple,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    src, _, _ = tiny
    docs = _docs(tmp_path)
    code = main(["quantize", f"tiny-family:{src}", "--recipe", "*=w8", "--out", str(docs)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "refusing to replace it" in err
    assert (docs / "thesis.tex").read_text() == "chapter 1"
    code = main(["quantize", f"tiny-family:{src}", "--recipe", "*=w8", "--out", str(src), "--overwrite"])
    assert code == 2 and "is the source" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["sweep", "lit-fashion", "--out", "{docs}"],
    ["demo", "--out", "{docs}"],
    ["data", "shard", "shapes", "--out", "{docs}"],
    ["train", "clip", "--data", "shapes", "--out", "{docs}"],
    ["qat", "lit-fashion", "--recipe", "w8", "--out", "{docs}"],
    ["build", "lit-fashion", "--out", "{docs}/thesis.tex"],
    ["eval", "lit-fashion", "--task", "fashion-mnist", "--json", "{docs}"],
    ["eval", "lit-fashion", "--task", "fashion-mnist", "--json", "{docs}/thesis.tex"],
])
def test_every_verb_refuses_user_data_before_any_work(tmp_path: Path, argv: list[str],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    docs = _docs(tmp_path)
    code = main([a.format(docs=docs) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert (docs / "thesis.tex").read_text() == "chapter 1" and sorted(p.name for p in docs.iterdir()) == [
        "photos", "thesis.tex"]


def test_run_directories_are_marked_and_resumable(tmp_path: Path) -> None:
    from lowbit.io import prepare_run_dir
    from lowbit.workflows import sweep  # noqa: F401  (registers the sweep kind)

    run = prepare_run_dir(tmp_path / "s", "sweep")
    (run / "rows").mkdir()
    assert json.loads((run / OUTPUT_MARKER).read_text()) == {"kind": "sweep"}
    assert prepare_run_dir(tmp_path / "s", "sweep") == run  # a re-run resumes
    with pytest.raises(LowbitError, match="not a lowbit qat-run"):
        from lowbit.workflows import qat  # noqa: F401

        prepare_run_dir(tmp_path / "s", "qat-run")


def test_an_evaluation_written_before_the_marker_is_still_replaced(tmp_path: Path) -> None:
    old = tmp_path / "r.json"
    old.write_text(json.dumps({"task": "fashion-mnist", "metrics": {"top1": 0.7}}))
    check_output(old, "json-result", flag="--json")
    old.write_text(json.dumps({"name": "my-package"}))
    with pytest.raises(LowbitError, match="not a lowbit json-result"):
        check_output(old, "json-result", flag="--json")
