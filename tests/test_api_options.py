"""Every loader and verb refuses an unknown option with one line naming it and the accepted ones (before any
work is done: these calls return in milliseconds)."""

from __future__ import annotations

import pytest

import lowbit
from lowbit.errors import LowbitError


def _one_line(err: pytest.ExceptionInfo[LowbitError], bad: str, *accepted: str) -> None:
    text = str(err.value)
    assert "\n" not in text and bad in text and "accepted options:" in text
    for name in accepted:
        assert name in text.split("accepted options:")[1]


def test_load_refuses_a_misspelt_option():
    with pytest.raises(LowbitError) as err:
        lowbit.load("lit-fashion", prune_raito=0.5)
    _one_line(err, "prune_raito", "heads", "optimize", "act_block")


def test_load_refuses_options_of_another_family():
    with pytest.raises(LowbitError) as err:
        lowbit.load("llava-fashion", backend="reference")  # a packed directory's option, not llava's
    _one_line(err, "backend", "prune_ratio", "kv_bits", "prune_layer", "projector")


@pytest.mark.parametrize("call, bad, accepted", [
    (lambda: lowbit.evaluate(None, "fashion-mnist", limt=5), "limt", ["limit", "reference"]),
    (lambda: lowbit.sweep("lit-fashion", ["w4"], ["rtn"], "fashion-mnist", "/nonexistent/x", limitt=3), "limitt",
     ["limit", "calib_samples"]),
    (lambda: lowbit.qat("lit-fashion", "w4", "/nonexistent/x", stepz=3), "stepz", ["steps", "lr"]),
    (lambda: lowbit.qat("lit-fashion", "w4", "/nonexistent/x", loss={"distil": "kl"}), "distil", ["distill"]),
    (lambda: lowbit.qat("lit-fashion", "w4", "/nonexistent/x", block_ap={"stepz": 1}), "stepz",
     ["steps", "match_norms"]),
    (lambda: lowbit.build("lit-fashion", n_trian=10), "n_trian", ["n_train", "n_test"]),
    (lambda: lowbit.chat(None, None, "what?", max_tokens=3), "max_tokens", ["max_new_tokens", "top_p"]),
    (lambda: lowbit.api.shard_dataset("shapes", "/nonexistent/x", shard_sz=3), "shard_sz", ["shard_size"]),
    (lambda: lowbit.api.train_clip("shapes", "/nonexistent/x", stepz=1), "stepz", ["steps", "batch_size"]),
])
def test_verbs_refuse_unknown_options(call, bad, accepted):
    with pytest.raises(LowbitError) as err:
        call()
    _one_line(err, bad, *accepted)
