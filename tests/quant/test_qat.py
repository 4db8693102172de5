"""QAT: straight-through gradients, exact folding, training through the shared loop, resume, DDP, CLI."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowbit.errors import LowbitError
from lowbit.kernels.quant_linear import is_quantized, set_backend
from lowbit.quant.apply import quantize_
from lowbit.quant.fake_quant import BinaryLSQ, UniformLSQ, make_quantizer
from lowbit.quant.primitives import QuantSpec
from lowbit.quant.qat import QATLayer, convert_qat, prepare_qat, qat_layers, qat_parameters
from lowbit.quant.recipe import load_recipe
from lowbit.train.loop import TrainConfig
from lowbit.train.qat import QATLoss, train_qat
from lowbit.workflows.checkpoint import load_quantized, save_quantized
from tests.quant.qat_tiny import TinyDual, dying_at, tiny_data

RECIPES = ["*=w1:binary", "*=w1.58", "*=w1:pbllm", "*=w4g8", "*=w3g8a", "*=w2", "*=w8"]
GEN = torch.Generator().manual_seed(0)


def _batch(model: TinyDual, n: int = 8) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    data = tiny_data(n, captions=True)
    return model.preprocess(data.images), model.tokenize(data.captions)


def _outputs(model: TinyDual, pixels: torch.Tensor, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.encode_image(pixels), model.encode_text(tokens)])


# --- estimator ------------------------------------------------------------------------------------------------
def test_lsq_gradients_match_the_paper_formula() -> None:
    w = torch.randn(4, 16, generator=GEN)
    q = make_quantizer("rtn", w, QuantSpec(3), {}, "linear")
    assert isinstance(q, UniformLSQ)
    with torch.no_grad():
        q.scale.mul_(0.7)  # make some weights clip
    wl = w.clone().requires_grad_(True)
    up = torch.randn(4, 16, generator=GEN)
    (q(wl) * up).sum().backward()
    s = q.scale.detach().to(torch.float16).float()  # the step the forward used (fp16, straight-through)
    x = w / s
    lo, hi = -4, 3  # signed 3-bit levels
    inside = (torch.round(x) >= lo) & (torch.round(x) <= hi)  # clamp(round(x)) is what the estimator sees
    # LSQ: dw_q/dw = 1 inside the range, 0 outside; dw_q/ds = round(x) - x inside, the clamped level outside,
    # with the step's gradient scaled by 1 / sqrt(K * Q_P).
    torch.testing.assert_close(wl.grad, up * inside)
    ds = torch.where(inside, torch.round(x) - x, torch.round(x).clamp(lo, hi))
    g = 1 / math.sqrt(16 * 3)
    torch.testing.assert_close(q.scale.grad, (up * ds).sum(1, keepdim=True) * g, rtol=1e-4, atol=1e-6)


def test_binary_sign_estimator_clips_and_learns_the_scale() -> None:
    w = torch.randn(3, 32, generator=GEN)
    q = make_quantizer("binary", w, QuantSpec(1), {}, "linear")
    assert isinstance(q, BinaryLSQ)
    wl = w.clone().requires_grad_(True)
    up = torch.randn(3, 32, generator=GEN)
    out = q(wl)
    s = q.scale.detach().to(torch.float16).float()
    torch.testing.assert_close(out, torch.where(w >= 0, 1.0, -1.0) * s)  # exactly sign * s in the forward
    (out * up).sum().backward()
    inside = w.abs() <= s
    torch.testing.assert_close(wl.grad, up * inside)  # clipped straight-through (BNN)
    ds = torch.where(w >= 0, 1.0, -1.0) - torch.where(inside, w / s, 0.0)
    torch.testing.assert_close(q.scale.grad, (up * ds).sum(1, keepdim=True) / math.sqrt(32), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("recipe", RECIPES)
def test_gradients_reach_latent_weights_and_scales(recipe: str) -> None:
    model = TinyDual()
    prepare_qat(model, recipe)
    pixels, tokens = _batch(model)
    img, txt = model.encode_image(pixels), model.encode_text(tokens)
    (img @ txt.T).pow(2).sum().backward()
    params = qat_parameters(model)
    assert params["weights"] and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params["weights"])
    for layer in [m for _, m in qat_layers(model)]:
        scale = layer.quantizer.scale
        assert scale.grad is not None and scale.grad.abs().sum() > 0, layer.name
        # the asymmetric zero point only gets gradient from clipped weights: none at the min/max start


# --- folding ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", RECIPES)
def test_untrained_fold_is_the_ptq_model(recipe: str) -> None:
    pixels, tokens = _batch(TinyDual())
    qat, ptq = TinyDual(), TinyDual()
    prepare_qat(qat, recipe)
    report = convert_qat(qat)
    ptq_report = quantize_(ptq, recipe, progress=False)
    assert torch.equal(_outputs(qat, pixels, tokens), _outputs(ptq, pixels, tokens))
    assert [(m.kind, m.packed_bytes) for m in report.modules] == [(m.kind, m.packed_bytes) for m in ptq_report.modules]


@pytest.mark.parametrize("recipe", RECIPES)
def test_folded_packed_model_equals_fake_quant_model(recipe: str, tmp_path: Path) -> None:
    model = TinyDual()
    prepare_qat(model, recipe)
    with torch.no_grad():  # pretend training moved weights and steps
        for p in qat_parameters(model)["weights"]:
            p.add_(0.05 * torch.randn(p.shape, generator=GEN))
        for p in qat_parameters(model)["quant"]:
            p.mul_(1 + 0.2 * torch.rand(p.shape, generator=GEN))
    pixels, tokens = _batch(model)
    fake_weights = {n: layer.weight.detach().clone() for n, layer in qat_layers(model)}
    fake = _outputs(model, pixels, tokens)
    report = convert_qat(model)
    assert not qat_layers(model) and all(is_quantized(model.get_submodule(n)) for n in fake_weights)
    for name, w in fake_weights.items():  # bit-identical weights
        assert torch.equal(model.get_submodule(name).effective_weight(), w), name
    set_backend(model, "reference")  # exact float comparison: the default kernels quantize activations to int8
    folded = _outputs(model, pixels, tokens)
    torch.testing.assert_close(folded, fake, rtol=0, atol=1e-6)  # conv vs permute+matmul float order only
    save_quantized(model, report, load_recipe(recipe), tmp_path / "ck")
    loaded = load_quantized(tmp_path / "ck", build_float=lambda source: TinyDual())
    set_backend(loaded, "reference")
    assert torch.equal(_outputs(loaded, pixels, tokens), folded)


def test_prepare_keeps_the_original_module_and_refuses_twice() -> None:
    model = TinyDual()
    conv = model.vision[2]
    prepare_qat(model, "vision=w1:binary")
    assert isinstance(model.vision[2], QATLayer) and model.vision[2].module is conv
    assert model.vision[2].kernel_size == (1, 1)  # attribute reads fall through to the original
    with pytest.raises(LowbitError, match="already has QAT layers"):
        prepare_qat(model, "vision=w1:binary")
    with pytest.raises(LowbitError, match="QAT quantizer"):
        prepare_qat(TinyDual(), "vision=w1:pbllm-hessian")
    with pytest.raises(LowbitError, match="no QAT layers"):
        convert_qat(TinyDual())


# --- training through the shared loop ------------------------------------------------------------------------
def _config(out: Path | None, steps: int, **kw) -> TrainConfig:
    base = dict(steps=steps, lr=1e-2, weight_decay=0.0, warmup_steps=1, batch_size=8, log_every=1,
                out_dir=None if out is None else str(out), progress=False)
    return TrainConfig(**{**base, **kw})


def test_qat_steps_reduce_the_loss_on_a_fixed_batch() -> None:
    torch.set_num_threads(1)
    student, teacher = TinyDual(), TinyDual()
    prepare_qat(student, "vision=w1:binary,text=w1.58,projector=w2")
    data = tiny_data(8, captions=True)  # one batch, fixed captions: the same samples every step
    state = train_qat(student, teacher, data, _config(None, 25), QATLoss(task_weight=0.0))
    losses = [h["loss"] for h in state.history if "loss" in h]
    # measured: 0.105 -> 0.010 (distillation from the float copy of the same network)
    assert losses[-1] < 0.3 * losses[0], losses


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lowbit.train.qat as qat_mod

    torch.set_num_threads(1)
    recipe, data, loss = "vision=w1:binary,text=w1:pbllm", tiny_data(24), QATLoss()

    def run(out: Path) -> TinyDual:
        student, teacher = TinyDual(), TinyDual()
        prepare_qat(student, recipe)
        train_qat(student, teacher, data, _config(out, 6, ckpt_every=3), loss)
        return student

    full = run(tmp_path / "full")
    real = qat_mod.qat_batches

    monkeypatch.setattr(qat_mod, "qat_batches", dying_at(real, 4))  # checkpoint at 3 exists
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut")
    monkeypatch.setattr(qat_mod, "qat_batches", real)
    resumed = run(tmp_path / "cut")
    a, b = full.state_dict(), resumed.state_dict()
    # Same batches, steps, optimizer state and RNG, teacher targets computed in fixed chunks: bit-identical.
    for key in a:
        assert torch.equal(b[key], a[key]), key


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(tmp_path: Path) -> None:
    worker = Path(__file__).with_name("qat_tiny.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps, lr = 3, "1e-3"
    subprocess.run([sys.executable, str(worker), str(tmp_path / "one"), str(steps), lr], check=True, env=env,
                   timeout=300)
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", "29517", str(worker),
                    str(tmp_path / "two"), str(steps), lr], check=True, env=env, timeout=300)
    ckpt = f"checkpoints/step-{steps:08d}/model.safetensors"
    one, two = load_file(str(tmp_path / "one" / ckpt)), load_file(str(tmp_path / "two" / ckpt))
    assert one.keys() == two.keys()
    trained = [k for k in one if k.endswith((".module.weight", ".scale", ".row_step"))]
    assert len(trained) == 6 + 6 + 2  # 6 QAT layers (2 of them PB-LLM with a row step)
    # Same global batch (rank slices concatenated), gathered contrastive/KL terms, DDP-averaged gradients, so
    # the runs differ by float summation order only — which a quantizer can amplify (a code flips), hence a
    # short run at a small lr. Stated tolerance: parameters move up to 3e-3 (3 AdamW steps at lr 1e-3);
    # latent weights must agree to 1e-5 and every tensor to 1e-4 (measured: 4e-6 and 5e-5, the latter a
    # PB-LLM row step whose near-zero gradient meets AdamW's eps).
    for k in one:
        atol = 1e-5 if k.endswith(".module.weight") else 1e-4
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=atol, msg=k)
    start = TinyDual().state_dict()
    moved = max(float((one[k] - start[k.removeprefix("model.").replace(".module.", ".")]).abs().max())
                for k in trained if k.endswith(".module.weight"))
    assert moved > 1e-3  # the runs did train


@pytest.mark.slow
def test_qat_command_trains_folds_saves_and_resumes(tmp_path: Path) -> None:
    import lowbit
    from lowbit.cli.qat import main

    out = tmp_path / "run"
    argv = ["qat", "tiny-qat", "--recipe", "vision=w1:binary,text=w1.58", "--data", "tiny-qat-data",
            "--steps", "6", "--batch-size", "8", "--lr", "1e-2", "--warmup-steps", "1", "--eval-every", "3",
            "--eval-samples", "16", "--ckpt-every", "3", "--train-samples", "32", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    summary = (out / "summary.json").read_text()
    assert '"steps": 6' in summary and (out / "checkpoints" / "step-00000006").is_dir()
    model = lowbit.load(str(out / "model"))
    kinds = {m["kind"] for m in model.lowbit_manifest["report"]["modules"]}
    assert kinds == {"conv", "conv1x1", "linear"}
    result = lowbit.evaluate(model, "zeroshot", data=tiny_data(16), footprint=False, progress=False)
    assert 0 <= result["metrics"]["top1"] <= 1
    assert main(argv) == 0  # a finished run: resumes at step 6 and re-folds, no training
    bad = list(argv)
    bad[argv.index("--recipe") + 1] = "vision=w1:binary"
    assert main(bad) == 2  # a different recipe in the same run directory is refused
