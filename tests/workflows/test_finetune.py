"""``lowbit finetune`` (QLoRA) on the tiny dual encoder: a packed model trains its adapters on the shared loop,
a run killed after a checkpoint and resumed equals the uninterrupted one, the CLI saves PEFT adapters and a
merged packed checkpoint, and bad targets are one line (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from lowbit.errors import LowbitError
from lowbit.quant import lora as L
from tests.quant.qat_tiny import dying_at, tiny_data  # noqa: F401  (registers tiny-qat and tiny-qat-data)

OPTS = {"data": "tiny-qat-data", "batch_size": 8, "lr": 1e-2, "warmup_steps": 1, "train_samples": 24,
        "eval_samples": 0, "log_every": 1, "progress": False}


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> str:
    model = lowbit.load("tiny-qat")
    report = lowbit.quantize(model, "*=w4g8", progress=False)
    out = tmp_path_factory.mktemp("packed") / "w4"
    lowbit.save(model, out, report=report)
    return str(out)


def adapters(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapters" / L.ADAPTER_WEIGHTS))


def test_interrupted_then_resumed_equals_uninterrupted(packed: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import lowbit.train.qat as qat_mod

    torch.set_num_threads(1)
    opts = {**OPTS, "lora": 4, "targets": "vision@conv1x1,text", "steps": 6, "ckpt_every": 3, "teacher": "tiny-qat"}
    full = lowbit.finetune(packed, tmp_path / "full", **opts)
    assert full["steps"] == 6 and full["lora"]["layers"] == 3
    real = qat_mod.qat_batches

    monkeypatch.setattr(qat_mod, "qat_batches", dying_at(real, 4))  # checkpoint at 3 exists
    with pytest.raises(KeyboardInterrupt):
        lowbit.finetune(packed, tmp_path / "cut", **opts)
    monkeypatch.setattr(qat_mod, "qat_batches", real)
    resumed = lowbit.finetune(packed, tmp_path / "cut", **opts)
    assert resumed["resumed_from"] == 3
    a, b = adapters(tmp_path / "full"), adapters(tmp_path / "cut")
    assert a.keys() == b.keys() and len(a) == 6
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert any(float(v.abs().sum()) > 0 for k, v in a.items() if "lora_B" in k)  # trained
    # checkpoints hold the adapters only (and their optimizer state), not the packed model
    ckpt = load_file(str(tmp_path / "full" / "checkpoints" / "step-00000006" / "model.safetensors"))
    assert set(ckpt) == {k.removeprefix(L.PEFT_PREFIX) for k in a}


def test_cli_saves_adapters_and_merged_checkpoint(packed: str, tmp_path: Path) -> None:
    from lowbit.cli.finetune import main

    out = tmp_path / "run"
    argv = ["finetune", packed, "--lora", "2", "--targets", "text,projector", "--data", "tiny-qat-data",
            "--steps", "3", "--batch-size", "8", "--lr", "1e-2", "--train-samples", "16", "--eval-samples", "8",
            "--merge", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lora"]["layers"] == 4 and summary["evals"][-1]["eval"]["top1"] >= 0
    assert 0 <= summary["merge"]["rel_rms"] < 1 and summary["merge"]["delta_rel_rms"] > 0
    config = json.loads((out / "adapters" / L.ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2
    assert config["target_modules"] == ["projector.image", "projector.text", "text.0", "text.2"]
    merged = lowbit.load(str(out / "model"))
    assert not L.lora_layers(merged)
    with_adapters = lowbit.load(packed)
    L.load_adapters(with_adapters, out / "adapters")
    assert len(L.lora_layers(with_adapters)) == 4
    bad = list(argv)
    bad[argv.index("--targets") + 1] = "vision/nothing"
    assert main([*bad[:-3], "--out", str(tmp_path / "bad")]) == 2


def test_bad_options_are_one_line(packed: str, tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match="exceeds layer"):
        lowbit.finetune(packed, tmp_path / "r", **{**OPTS, "lora": 64, "steps": 1})
    with pytest.raises(LowbitError, match="is not one"):
        lowbit.finetune("tiny-qat", tmp_path / "r3", **{**OPTS, "lora": 2, "steps": 1, "merge": True})
    with pytest.raises(LowbitError, match="does not take rank"):
        lowbit.finetune(packed, tmp_path / "r2", rank=4)


def test_llava_answer_loss_trains_language_adapters(tmp_path: Path) -> None:
    """The llava path: adapters on the packed language model's q/v projections, answer-token loss on generated
    instructions; the saved adapters load onto the float model with PEFT."""
    peft = pytest.importorskip("peft")
    from tests.models.llava_tiny import write_tiny_llava

    torch.set_num_threads(1)
    src = write_tiny_llava(tmp_path / "float", max_positions=512)
    model = lowbit.load(str(src))
    lowbit.save(model, tmp_path / "w4", report=lowbit.quantize(model, "language=w4g16", progress=False))
    summary = lowbit.finetune(str(tmp_path / "w4"), tmp_path / "ft", lora=2,
                              targets="language/*q_proj,language/*v_proj", steps=3, batch_size=2, lr=1e-2,
                              train_samples=4, eval_samples=0, ckpt_every=3, log_every=1, progress=False)
    assert summary["lora"]["layers"] == 4 and summary["conversations"] == 4
    log = [json.loads(line) for line in (tmp_path / "ft" / "train_log.jsonl").read_text().splitlines()]
    assert all(0 < h["loss"] < 20 for h in log if "loss" in h)
    state = adapters(tmp_path / "ft")
    assert any(float(v.abs().sum()) > 0 for k, v in state.items() if "lora_B" in k)
    peft_model = peft.PeftModel.from_pretrained(lowbit.load(str(src)), str(tmp_path / "ft" / "adapters"))
    assert len([n for n, _ in peft_model.named_modules() if n.endswith("q_proj.lora_A")]) == 2


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(tmp_path: Path) -> None:
    """``torchrun -m lowbit.cli.finetune`` on 2 processes trains the same adapters as 1 (the global batch split)."""
    import os
    import subprocess
    import sys

    from tests.models.llava_tiny import write_tiny_llava

    src = write_tiny_llava(tmp_path / "float", max_positions=512)
    model = lowbit.load(str(src))
    lowbit.save(model, tmp_path / "w4", report=lowbit.quantize(model, "language=w4g16", progress=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    torchrun = Path(sys.executable).with_name("torchrun")
    for n in (1, 2):
        subprocess.run([str(torchrun), "--nproc_per_node", str(n), "--master_port", f"2952{n}", "-m",
                        "lowbit.cli.finetune", "finetune", str(tmp_path / "w4"), "--lora", "2", "--targets",
                        "language/*q_proj", "--steps", "3", "--batch-size", "4", "--lr", "1e-2", "--train-samples",
                        "8", "--eval-samples", "0", "--ckpt-every", "3", "--no-progress", "--out",
                        str(tmp_path / f"run{n}")], check=True, env=env, timeout=300)
    one, two = adapters(tmp_path / "run1"), adapters(tmp_path / "run2")
    assert one.keys() == two.keys()
    for k in one:  # measured: equal to 1.5e-8 (float summation order of the gathered gradients)
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-6, msg=k)
    assert max(float(v.abs().max()) for k, v in one.items() if "lora_B" in k) > 1e-3  # they did train


def test_llava_default_targets_and_gradient_checkpointing(tmp_path: Path) -> None:
    """llava's default targets are the LM's decoder blocks (not the head, not the vision tower, which trains on
    cached tokens and is refused); recomputing the blocks keeps fewer activations and gives the same gradients."""
    from lowbit.workflows.finetune import AdapterAnswerLoss, checkpoint_blocks, default_targets, llava_batches
    from tests.models.llava_tiny import write_tiny_llava

    torch.set_num_threads(1)
    src = write_tiny_llava(tmp_path / "float", max_positions=512)
    with pytest.raises(LowbitError, match="vision tower"):
        lowbit.finetune(str(src), tmp_path / "v", lora=2, targets="vision", steps=1, batch_size=2,
                        train_samples=2, eval_samples=0, progress=False)
    model = lowbit.load(str(src))
    lowbit.quantize(model, "language=w4g16", progress=False)
    report = L.attach_lora(model, L.LoraConfig(r=2, targets=default_targets(model)))
    assert {row["tower"] for row in report.layers.values()} == {"language"}
    assert len(report.layers) == 2 * 7 and not any("lm_head" in p or "embed" in p for p in report.layers)
    with torch.no_grad():  # non-zero B: the gradients reach the A matrices too
        for m in L.lora_layers(model).values():
            m.lora_B.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    batches, _, _ = llava_batches(model, "fashion-vqa", 2, 2)
    batch = next(iter(batches(0, 0, 1)))
    loss = AdapterAnswerLoss(model).train()

    def step() -> tuple[int, dict[str, torch.Tensor]]:
        saved = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal saved
            saved += t.numel() * t.element_size()
            return t

        for p in L.lora_parameters(model):
            p.grad = None
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = loss(batch)
        out["loss"].backward()
        return saved, {k: v.grad.clone() for k, v in L.lora_state(model).items()}

    kept, plain = step()
    assert checkpoint_blocks(model) == 2
    kept_recomputed, recomputed = step()
    assert kept_recomputed < kept / 2
    for k in plain:
        torch.testing.assert_close(recomputed[k], plain[k], rtol=0, atol=1e-6, msg=k)


def test_llava_answer_distillation(tmp_path: Path) -> None:
    """``teacher`` on llava: the loss is ``task_weight * CE + KL(teacher || student)`` of the answer logits (zero
    KL against the student's own float weights), the adapters train on the KL alone (``task_loss="none"``), and
    a teacher that cannot be distilled from, or a distillation mode llava lacks, is one line."""
    from lowbit.train.losses import token_kl_loss
    from lowbit.workflows.build_llava import answer_logits
    from lowbit.workflows.finetune import AdapterAnswerLoss, llava_batches
    from tests.models.llava_tiny import write_tiny_llava

    torch.set_num_threads(1)
    src = write_tiny_llava(tmp_path / "float", max_positions=512)
    teacher = lowbit.load(str(src))
    model = lowbit.load(str(src))
    L.attach_lora(model, L.LoraConfig(r=2, targets="language/*q_proj"))
    batches, _, _ = llava_batches(model, "fashion-vqa", 2, 2)
    batch = next(iter(batches(0, 0, 1)))
    same = AdapterAnswerLoss(model, teacher, ce_weight=0.5)(batch)
    assert abs(float(same["kl"])) < 1e-6 and torch.allclose(same["loss"], 0.5 * same["ce"], atol=1e-6)

    lowbit.save(model := lowbit.load(str(src)), tmp_path / "w2",
                report=lowbit.quantize(model, "language=w2g16", progress=False))
    packed = lowbit.load(str(tmp_path / "w2"))
    out = AdapterAnswerLoss(packed, teacher, ce_weight=0.25, temperature=2.0)(batch)
    with torch.no_grad():
        s, targets = answer_logits(packed, batch)
        t, _ = answer_logits(teacher, batch)
    kl = token_kl_loss(s, t, 2.0)
    assert float(kl) > 1e-3
    torch.testing.assert_close(out["kl"], kl)
    torch.testing.assert_close(out["loss"], 0.25 * torch.nn.functional.cross_entropy(s, targets) + kl)

    opts = {"lora": 2, "targets": "language/*q_proj,language/*v_proj", "steps": 3, "batch_size": 2, "lr": 1e-2,
            "train_samples": 4, "eval_samples": 0, "ckpt_every": 3, "log_every": 1, "progress": False}
    summary = lowbit.finetune(str(tmp_path / "w2"), tmp_path / "ft", teacher=str(src), task_loss="none", **opts)
    assert "KL" in summary["loss"] and summary["loss"].startswith("0 x")
    log = [json.loads(line) for line in (tmp_path / "ft" / "train_log.jsonl").read_text().splitlines()]
    assert all(h["loss"] == pytest.approx(h["kl"]) and h["kl"] > 0 for h in log if "loss" in h)
    assert any(float(v.abs().sum()) > 0 for k, v in adapters(tmp_path / "ft").items() if "lora_B" in k)
    for bad, match in (({"teacher": str(src), "distill": "cosine"}, "accepted: kl, both"),
                       ({"teacher": "tiny-qat"}, "student's vocabulary"),
                       ({"task_loss": "none"}, "needs a loss"),
                       ({"teacher": str(src), "temperature": 0.0}, "temperature must be > 0")):
        with pytest.raises(LowbitError, match=match):
            lowbit.finetune(str(tmp_path / "w2"), tmp_path / f"bad{len(match)}", **{**opts, **bad})
