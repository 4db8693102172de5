"""Block-AP (EfficientQAT block-wise reconstruction): lower block errors, exact folding, norm matching, the stage."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels.quant_linear import set_backend
from lowbit.models.spec import EMBEDDING_TAILS, L2Normalize, SpatialMean, register_tail, tower_blocks
from lowbit.quant.block_ap import BlockAPConfig, block_ap_, match_norm_statistics
from lowbit.quant.qat import convert_qat, prepare_qat, qat_parameters
from lowbit.train.block_ap_stage import (
    STATE_FILE,
    BlockAPStage,
    block_ap_texts,
    calibration_batches,
    run_block_ap_stage,
)
from tests.quant.qat_tiny import TinyDual, tiny_data

RECIPE = "vision=w1.58,text=w1:binary,projector=skip"


def _calibration(model: TinyDual) -> dict[str, list]:
    data = tiny_data(64, captions=True)
    return {"vision": [model.preprocess(data.images[i : i + 16]) for i in range(0, 64, 16)],
            "text": [model.tokenize(data.captions[i : i + 16]) for i in range(0, 64, 16)]}


def _outputs(model: TinyDual) -> torch.Tensor:
    data = tiny_data(16, seed=3, captions=True)
    with torch.no_grad():
        return torch.cat([model.encode_image(model.preprocess(data.images)),
                          model.encode_text(model.tokenize(data.captions))])


def test_block_ap_reduces_every_quantized_blocks_error_and_folds_exactly() -> None:
    teacher, student = TinyDual(), TinyDual()
    prepare_qat(student, RECIPE)
    report = block_ap_(student, teacher, _calibration(student), BlockAPConfig(steps=150, lr=3e-3, scale_lr=1e-2,
                                                                              float_lr=1e-2))
    quantized = [b for b in report.blocks if b.quant_layers]
    assert [(b.tower, b.index) for b in quantized] == [("vision", 0), ("vision", 2), ("text", 0), ("text", 2)]
    for b in quantized:  # measured: 3.1x, 5.5x (vision), 5.8x, 16.6x (text) lower than the PTQ start
        assert b.error_after < 0.5 * b.error_start, b
    # the whole student ends closer to the teacher than the PTQ start did
    ptq = TinyDual()
    prepare_qat(ptq, RECIPE)
    ref = _outputs(teacher)
    err_ptq, err_bap = (float((_outputs(m) - ref).pow(2).mean()) for m in (ptq, student))
    assert err_bap < 0.25 * err_ptq  # measured 8.4x lower
    fake = _outputs(student)
    convert_qat(student)
    set_backend(student, "reference")  # exact float comparison: the default kernels quantize activations to int8
    torch.testing.assert_close(_outputs(student), fake, rtol=0, atol=1e-5)


def test_block_ap_is_deterministic_and_trains_only_the_block() -> None:
    runs = []
    for _ in range(2):
        teacher, student = TinyDual(), TinyDual()
        prepare_qat(student, RECIPE)
        block_ap_(student, teacher, _calibration(student), BlockAPConfig(steps=20, float_lr=0.0))
        runs.append(student)
    for a, b in zip(runs[0].state_dict().values(), runs[1].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # float_lr=0: the float projector and biases are exactly the teacher's
    torch.testing.assert_close(runs[0].projector["image"].weight, TinyDual().projector["image"].weight)
    assert all(p.requires_grad for p in qat_parameters(runs[0])["weights"])  # trainability restored


def test_biases_of_quantized_layers_train_with_the_float_lr() -> None:
    teacher, student = TinyDual(), TinyDual()
    prepare_qat(student, RECIPE)
    block_ap_(student, teacher, _calibration(student), BlockAPConfig(steps=20, lr=3e-3, scale_lr=1e-2,
                                                                     float_lr=1e-2))
    quant_biases = [(student.text[i].module.bias, teacher.text[i].bias) for i in (0, 2)]  # text: quantized linears
    for trained, original in quant_biases:  # Adam at 1e-2 for 20 steps moves every bias by ~0.1
        assert float((trained.detach() - original.detach()).abs().max()) > 1e-2
    frozen = TinyDual()
    prepare_qat(frozen, RECIPE)
    block_ap_(frozen, teacher, _calibration(frozen), BlockAPConfig(steps=20, lr=3e-3, scale_lr=1e-2, float_lr=0.0))
    torch.testing.assert_close(frozen.text[0].module.bias, teacher.text[0].bias, rtol=0, atol=0)


@pytest.fixture
def tiny_vision_tail() -> Iterator[None]:
    """TinyDual's vision tail (mean pool -> image head -> unit rows), registered for one test only."""
    key = (TinyDual, "vision")
    register_tail(*key)(lambda m: nn.Sequential(SpatialMean(), m.projector["image"], L2Normalize()))
    yield
    EMBEDDING_TAILS.pop(key)


def _image_cosine_error(student: TinyDual, teacher: TinyDual) -> float:
    data = tiny_data(64, seed=3, captions=True)  # held-out images
    with torch.no_grad():
        a, b = (m.encode_image(m.preprocess(data.images)) for m in (student, teacher))
    return 1.0 - float((a * b).sum(-1).mean())


def test_last_block_through_the_embedding_tail_brings_embeddings_closer(tiny_vision_tail: None) -> None:
    errors = {}
    for tail in (False, True):
        teacher, student = TinyDual(), TinyDual()
        prepare_qat(student, RECIPE)
        cfg = BlockAPConfig(steps=150, lr=3e-3, scale_lr=1e-2, float_lr=1e-2, tail=tail)
        report = block_ap_(student, teacher, {"vision": _calibration(student)["vision"]}, cfg)
        errors[tail] = _image_cosine_error(student, teacher)
        head_moved = not torch.equal(student.projector["image"].weight, teacher.projector["image"].weight)
        assert head_moved == tail  # the tail's (float) image head trains with the last block, only then
        assert (report.blocks[-1].error_after < 0.5 * report.blocks[-1].error_start) == tail
    # measured 1 - cos: 3.8e-4 -> 4.8e-5 (7.8x lower) on one thread; 1.7e-4 -> 5.2e-5 (3.3x) in CI on two
    # (150 training steps amplify float reduction order), so the bar asks for 2x
    assert errors[True] < 0.5 * errors[False]


def test_match_norm_statistics_matches_the_teachers_normalised_moments() -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU6(), nn.Conv2d(16, 16, 1),
                            nn.BatchNorm2d(16)).eval()
    with torch.no_grad():
        for bn in (teacher[1], teacher[4]):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.05, 2.0)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for conv in (student[0], student[3]):
            conv.weight.add_(0.3 * conv.weight.abs().mean() * torch.randn_like(conv.weight))
    xs = [torch.rand(4, 8, 6, 6) + 0.5 for _ in range(3)]  # positive inputs: quantization error shifts the mean
    extras = [[((), {})] for _ in xs]

    def moments(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            y = torch.cat([m(x) for x in xs]).transpose(0, 1).reshape(16, -1)  # [C, N*H*W]
        return y.mean(1), y.std(1, correction=0)

    before = [(a - b).abs().max() for a, b in zip(moments(student), moments(teacher), strict=True)]
    assert match_norm_statistics(student, teacher, xs, xs, extras, extras, 0) == 2
    after = [(a - b).abs().max() for a, b in zip(moments(student), moments(teacher), strict=True)]
    assert before[0] > 0.1 and after[0] < 1e-4 and after[1] < 1e-4  # mean and std of the block output match


def test_unknown_tower_type_is_a_clear_error() -> None:
    with pytest.raises(LowbitError, match="accepted tower types"):
        tower_blocks(nn.Linear(2, 2))


def test_stage_saves_and_a_rerun_loads_instead_of_recomputing(tmp_path: Path) -> None:
    teacher, student = TinyDual(), TinyDual()
    prepare_qat(student, RECIPE)
    data = tiny_data(48)
    batches = calibration_batches(student, data, 48, 16, 4)
    # text: 4 classes x 12 calibration templates, none of them a zero-shot prompt
    assert [len(batches["vision"]), len(batches["text"])] == [3, 12]
    prompts = {t.replace("{}", c) for c in data.classnames for t in data.templates}
    assert not prompts & set(block_ap_texts(data, 48)) and len(block_ap_texts(data, 48)) == 48
    stage = BlockAPStage(samples=48, image_batch=16, text_batch=4,
                         block=BlockAPConfig(steps=10, lr=3e-3, scale_lr=1e-2))
    report = run_block_ap_stage(student, teacher, data, stage, tmp_path, seed=0, progress=False)
    assert (tmp_path / STATE_FILE).is_file() and len(report["blocks"]) == 7  # 4 + 3 blocks
    again = TinyDual()
    prepare_qat(again, RECIPE)
    report2 = run_block_ap_stage(again, TinyDual(), data, stage, tmp_path, seed=0, progress=False)
    assert report2 == json.loads((tmp_path / "block_ap.json").read_text())
    torch.testing.assert_close(_outputs(again), _outputs(student), rtol=0, atol=0)


def test_qat_command_block_ap_then_scales_only(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from lowbit.cli.qat import main

    out = tmp_path / "run"
    argv = ["qat", "tiny-qat", "--recipe", RECIPE, "--data", "tiny-qat-data", "--block-ap", "--block-ap-samples",
            "32", "--block-ap-steps", "10", "--steps", "3", "--train", "scales", "--batch-size", "8", "--lr", "1e-2",
            "--warmup-steps", "1", "--eval-samples", "16", "--ckpt-every", "3", "--train-samples", "32",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["block_ap"]["blocks"]) == 7 and 0 <= summary["block_ap"]["eval"]["top1"] <= 1
    after_bap = load_file(str(out / STATE_FILE))
    final = {k.removeprefix("model."): v for k, v in
             load_file(str(out / "checkpoints" / "step-00000003" / "model.safetensors")).items()}
    latent = [k for k in after_bap if k.endswith("module.weight")]
    steps = [k for k in after_bap if k.endswith("quantizer.scale")]
    assert len(latent) == len(steps) == 4
    for k in latent:  # E2E-QP trains only the steps
        torch.testing.assert_close(final[k], after_bap[k], rtol=0, atol=0)
    assert any(not torch.equal(final[k], after_bap[k]) for k in steps)
    mtime = (out / STATE_FILE).stat().st_mtime_ns
    assert main(argv) == 0 and (out / STATE_FILE).stat().st_mtime_ns == mtime  # rerun: loaded, not recomputed
    bad = [a if a != "scales" else "everything" for a in argv]
    with pytest.raises(SystemExit):
        main(bad)
