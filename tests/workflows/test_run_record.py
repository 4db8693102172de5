"""A resumable run's record: written once, a resume with other arguments or a damaged record refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowbit.errors import LowbitError
from lowbit.workflows.run_record import check_run_record


def test_written_then_same_accepted_and_different_refused(tmp_path: Path) -> None:
    check_run_record(str(tmp_path), "run.json", "qat", {"seed": 0, "recipe": "w2"}, {"seed": 0, "steps": 5})
    assert json.loads((tmp_path / "run.json").read_text()) == {"seed": 0, "recipe": "w2",
                                                              "args": {"seed": 0, "steps": 5}}
    check_run_record(str(tmp_path), "run.json", "qat", {"seed": 0, "recipe": "w2"}, {"seed": 0, "steps": 9})
    with pytest.raises(LowbitError, match=r"holds a different qat run \(seed: 0 -> 1\)"):
        check_run_record(str(tmp_path), "run.json", "qat", {"seed": 1, "recipe": "w2"}, {})


@pytest.mark.parametrize("text", ["[1, 2]", "{not json", "null"])
def test_damaged_record_is_one_line(tmp_path: Path, text: str) -> None:
    (tmp_path / "run.json").write_text(text)
    with pytest.raises(LowbitError) as err:  # a list once reached .get() in the finetune copy: AttributeError
        check_run_record(str(tmp_path), "run.json", "finetune", {"seed": 0}, {})
    assert "\n" not in str(err.value) and "finetune run record" in str(err.value)
