"""NaN/Inf never scores: every metric counts a non-finite score as a miss, and a checkpoint holding NaN/Inf
scales is refused at load in one line naming the tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.data.shapes import generate_shapes
from lowbit.errors import LowbitError
from lowbit.eval.fidelity import accuracy_kept, fidelity
from lowbit.eval.retrieval import recall_at_k
from lowbit.eval.zeroshot import classify_embeddings, zeroshot_classify
from lowbit.workflows.load import load
from lowbit.workflows.quantize import quantize, save
from tests.models.tiny_family import write_tiny_family

BAD = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("bad", BAD)
def test_zeroshot_counts_a_nonfinite_score_as_a_miss(bad: float) -> None:
    labels = torch.tensor([0, 1, 2, 0])
    good = classify_embeddings(torch.eye(3)[labels], torch.eye(3), labels, ["a", "b", "c"])
    assert good["top1"] == 1.0
    r = classify_embeddings(torch.full((4, 3), bad), torch.eye(3), labels, ["a", "b", "c"])
    assert r["top1"] == 0.0 and r["top5"] == 0.0 and r["per_class_top1"] == {"a": 0.0, "b": 0.0, "c": 0.0}
    assert r.outputs.predictions.tolist() == [-1, -1, -1, -1]
    one_class = classify_embeddings(torch.full((2, 3), bad), torch.eye(3)[:1], torch.tensor([0, 0]), ["a"])
    assert one_class["top1"] == 0.0  # a single class cannot make a NaN a hit either


def test_zeroshot_a_nan_competitor_beats_the_true_class() -> None:
    labels = torch.tensor([0, 1])
    cls = torch.eye(3)
    cls[2] = float("nan")  # one class embedding is NaN: it may not be ranked below anything
    r = classify_embeddings(torch.eye(3)[labels], cls, labels, ["a", "b", "c"])
    assert r["top1"] == 0.0 and r["top5"] == 1.0


@pytest.mark.parametrize("bad", BAD)
def test_retrieval_counts_a_nonfinite_score_as_a_miss(bad: float) -> None:
    ids = torch.tensor([0, 1, 2, 3])
    assert recall_at_k(torch.eye(4), torch.eye(4), ids)["i2t_r1"] == 1.0
    r = recall_at_k(torch.full((4, 4), bad), torch.eye(4), ids)
    assert (r["i2t_r1"], r["i2t_r5"], r["t2i_r1"], r["t2i_r5"]) == (0.0, 0.0, 0.0, 0.0)
    half = torch.eye(4)
    half[:2] = bad  # two images NaN: their queries miss, the others still hit ...
    r = recall_at_k(half, torch.eye(4), ids)
    assert r["i2t_r1"] == 0.5
    # ... while as gallery items they cannot be ranked below anything: every caption query has them ahead
    assert r["t2i_r1"] == 0.0 and r["t2i_r5"] == 0.5


def test_fidelity_of_a_nan_model_agrees_with_nothing() -> None:
    labels = torch.tensor([0, 1, 2, 0])
    ref = classify_embeddings(torch.eye(3)[labels], torch.eye(3), labels, ["a", "b", "c"])
    nan = classify_embeddings(torch.full((4, 3), float("nan")), torch.full((3, 3), float("nan")), labels,
                              ["a", "b", "c"])
    f = fidelity(ref, nan)
    assert f["agreement"] == 0.0 and f["image_cosine"] == 0.0 and f["text_cosine"] == 0.0
    assert fidelity(nan, nan)["agreement"] == 0.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("nan")
    model = load(f"tiny-family:{write_tiny_family(root / 'src')}")
    report = quantize(model, "*=w4g32", progress=False)
    return save(model, root / "ck", report=report), model


def test_a_model_emitting_nan_scores_zero_not_one(checkpoint: tuple[Path, object]) -> None:
    data = generate_shapes(48, seed=1)
    float_model = load(str(checkpoint[0]))
    before = zeroshot_classify(float_model, data, progress=False)
    assert before["top1"] > 0.0
    broken = load(str(checkpoint[0]))
    for name, buf in broken.named_buffers():
        if name.endswith("scales"):
            buf.fill_(float("nan"))
    after = zeroshot_classify(broken, data, progress=False)
    assert after["top1"] == 0.0 and after["top5"] == 0.0
    assert accuracy_kept(before, after)["accuracy_kept"] == 0.0 and fidelity(before, after)["agreement"] == 0.0


@pytest.mark.parametrize("bad", BAD)
def test_nan_scales_in_a_real_checkpoint_fail_at_load_in_one_line(tmp_path: Path, checkpoint: tuple[Path, object],
                                                                   bad: float) -> None:
    import shutil

    out = tmp_path / "ck"
    shutil.copytree(checkpoint[0], out)
    tensors = load_file(str(out / "model.safetensors"))
    key = next(k for k in sorted(tensors) if k.endswith("scales"))
    tensors[key][0, 0] = bad
    save_file(tensors, str(out / "model.safetensors"), metadata={"lowbit": "{}"})
    with pytest.raises(LowbitError, match=rf"tensor '{key}' holds 1 NaN/Inf value of \d+; accepted: finite") as exc:
        load(str(out))
    assert "\n" not in str(exc.value)
