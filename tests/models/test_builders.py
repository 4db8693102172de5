"""``lowbit build``: one registry of builders; unknown models and options are one clear line, exit 2."""

from __future__ import annotations

import pytest

from lowbit.cli import main
from lowbit.models.builders import BUILDERS


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
