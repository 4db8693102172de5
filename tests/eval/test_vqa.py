"""VQA evaluation on a tiny random Llava: JSON keys, exact-match scoring, fidelity (agreement, KL), footprint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowbit.errors import LowbitError
from tests.models.llava_tiny import write_tiny_llava


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    from lowbit.models import load_model

    return load_model(str(write_tiny_llava(tmp_path_factory.mktemp("tiny-llava-eval"))))


def test_evaluate_vqa_task_json_keys_and_self_fidelity(tiny) -> None:
    from lowbit.eval import evaluate

    ref = evaluate(tiny, "shapes-vqa", limit=6, progress=False)
    out = evaluate(tiny, "shapes-vqa", limit=6, reference=ref, progress=False)
    assert 0.0 <= out["metrics"]["accuracy"] <= 1.0 and out["metrics"]["n"] == 6
    assert out["metrics"]["kl"] == pytest.approx(0.0, abs=1e-6) and out["metrics"]["agreement"] == 1.0
    assert out["fidelity"]["answer_agreement"] == 1.0
    fp = out["footprint"]
    assert fp["ttft_ms"] > 0 and fp["peak_rss_mib"] > 0
    assert fp["decode_tok_s"] is None or fp["decode_tok_s"] > 0  # None: noise hid the decode time
    assert fp["visual_tokens"] == 16 and fp["prompt_tokens"] > 16


def test_exact_match_scoring_counts_correct_answers(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    from lowbit.data.vqa import load_vqa
    from lowbit.eval import vqa
    from lowbit.models import llava_generate

    data = load_vqa("fashion-vqa", "test", limit=8)
    truth = [t[0].answer for t in data.turns]
    real = llava_generate.generate_batch

    def half_right(model, pixels, questions, decoding, stream=None, first_logprobs=False):  # noqa: ANN001
        gen = real(model, pixels, questions, decoding, first_logprobs=first_logprobs)
        start = half_right.seen
        half_right.seen += len(questions)
        gen.texts = [f"The {truth[start + i].title()}." if (start + i) % 2 == 0 else "wrong"
                     for i in range(len(questions))]
        return gen

    half_right.seen = 0
    monkeypatch.setattr(llava_generate, "generate_batch", half_right)
    result = vqa.vqa_accuracy(tiny, data, batch_size=3)
    assert result["accuracy"] == 0.5


def test_fidelity_of_a_perturbed_model_shows_kl(tiny) -> None:
    import copy

    from lowbit.data.vqa import load_vqa
    from lowbit.eval.vqa import vqa_accuracy, vqa_fidelity

    data = load_vqa("shapes-vqa", "test", limit=4)
    other = copy.deepcopy(tiny)
    with torch.no_grad():
        for p in other.projector.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    fid = vqa_fidelity(vqa_accuracy(tiny, data), vqa_accuracy(other, data))
    assert fid["kl"] > 1e-4 and 0.0 <= fid["agreement"] <= 1.0


def test_vqa_task_refuses_a_dual_encoder(tmp_path: Path) -> None:
    from lowbit.eval import evaluate
    from lowbit.models import load_model
    from tests.models.conftest import write_tiny

    tiny_clip_dir = write_tiny(tmp_path / "clip", "clip")
    with pytest.raises(LowbitError, match="VQA tasks need a generative"):
        evaluate(load_model(str(tiny_clip_dir)), "fashion-vqa", limit=2, footprint=False, progress=False)
