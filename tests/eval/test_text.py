"""The ``text`` task: perplexity over windows of a text file, and llama.cpp's KL statistics against a reference."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.eval.text import first_scored, text_windows
from tests.models.causal_lm_tiny import save_tiny_causal_lm

TEXT = ("The quick brown fox jumps over the lazy dog. " * 30).strip()


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    return save_tiny_causal_lm("llama", tmp_path_factory.mktemp("lm") / "llama")


@pytest.fixture()
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "held_out.txt"
    path.write_text(TEXT)
    return path


@torch.no_grad()
def test_perplexity_is_exp_of_the_mean_nll_of_the_second_halves(lm_dir: Path, text_file: Path) -> None:
    model = lowbit.load(str(lm_dir))
    result = lowbit.evaluate(model, "text", data=str(text_file), footprint=False, progress=False)
    windows = text_windows(model, TEXT)
    # 1349 byte tokens in windows of the model's context (256 positions), the last one shorter
    assert [w.numel() for w in windows] == [256] * 5 + [69]
    nll, n = 0.0, 0
    for w in windows:  # by hand: every token of the window's second half, from the whole window's logits
        logp = torch.log_softmax(model.language(w[None]).logits[0].double(), -1)
        for t in range(first_scored(w.numel()), w.numel()):
            nll -= float(logp[t - 1, w[t]])
            n += 1
    metrics = result["metrics"]
    assert metrics["tokens_scored"] == n
    assert metrics["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert result["data"]["name"] == "held_out.txt"


def test_kl_against_itself_is_zero_and_against_w4_is_not(lm_dir: Path, text_file: Path) -> None:
    model = lowbit.load(str(lm_dir))
    same = lowbit.evaluate(model, "text", data=str(text_file), reference=lowbit.load(str(lm_dir)), footprint=False,
                           progress=False)["fidelity"]
    assert same["kl_mean"] == pytest.approx(0.0, abs=1e-7) and same["kl_p99"] == pytest.approx(0.0, abs=1e-6)
    assert same["same_top_p"] == 1.0
    quantized = lowbit.load(str(lm_dir))
    lowbit.quantize(quantized, "language=w2", progress=False)
    result = lowbit.evaluate(quantized, "text", data=str(text_file), reference=model, limit=2, progress=False)
    fid = result["fidelity"]
    assert 0 < fid["kl_mean"] <= fid["kl_p99"] <= fid["kl_max"] and 0 < fid["same_top_p"] < 1
    assert fid["tokens_compared"] == result["metrics"]["tokens_scored"] == 256  # 2 windows x 128 scored
    assert result["metrics"]["kl_mean"] == fid["kl_mean"] and result["footprint"]["weight_bytes"] > 0


def test_text_task_refuses_what_it_cannot_measure(lm_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match="needs data= a text file"):
        lowbit.evaluate(lowbit.load(str(lm_dir)), "text", data=str(tmp_path / "missing.txt"), footprint=False)
    with pytest.raises(LowbitError, match="needs data="):
        lowbit.evaluate(lowbit.load(str(lm_dir)), "text", footprint=False)
