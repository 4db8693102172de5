"""``lowbit build``: one registry of builders; unknown models and options are one clear line, exit 2."""

from __future__ import annotations

import pytest

from lowbit.cli import main
from lowbit.workflows.builders import BUILDERS


def test_every_built_in_model_has_a_builder() -> None:
    assert set(BUILDERS.names()) >= {"lit-fashion", "llava-fashion", "llava-fashion-hd"}


@pytest.mark.parametrize("argv, fragment", [
    (["build", "no-such-model"], "no-such-model"),
    (["build", "lit-fashion", "--run-dir", "x"], "run_dir"),
    (["build", "llava-fashion", "--n-train", "5"], "n_train"),
])
def test_bad_build_requests_exit_2_with_one_line(argv: list[str], fragment: str, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err


def test_llava_fashion_hd_builds_its_two_runs_in_order(tmp_path) -> None:
    from unittest import mock

    from lowbit.models.llava import packaged_projector_path

    calls = []

    def fake_build(target, hp, run_dir=None):
        calls.append((target, hp, run_dir))
        return {"held_out_accuracy": {"fashion-vqa": 0.0}, "hyperparameters": {"steps": hp.steps}}

    with mock.patch("lowbit.workflows.build_llava.build_llava_projector", side_effect=fake_build):
        log = BUILDERS.get("llava-fashion-hd")(out=tmp_path / "p.safetensors", steps=7, run_dir=tmp_path / "runs")
    (t1, hp1, d1), (t2, hp2, d2) = calls
    assert hp1.init_from == str(packaged_projector_path("llava-fashion")) and (hp1.n_fashion, hp1.steps) == (2000, 450)
    assert hp2.init_from == str(t1) == log["run1"] and (hp2.n_fashion, hp2.steps) == (6000, 7)
    assert (hp1.image_size, hp1.output_stride) == (hp2.image_size, hp2.output_stride) == (192, 16)
    assert t2 == tmp_path / "p.safetensors" and (d1, d2) == (tmp_path / "runs" / "run1", tmp_path / "runs" / "run2")
    assert len(log["runs"]) == 2
