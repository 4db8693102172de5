"""Visual instruction tuning of the built-in ``llava-fashion``: train the projector, vision tower and LM frozen.

Steps: (1) visual-token features of the training images from the frozen vision tower, computed once and
cached under ``$LOWBIT_HOME/features/llava-*`` (float16, atomic writes); (2) the projector's standardisation
from those features; (3) the projector trained with the shared loop (``lowbit.train.loop.train``, AdamW,
warm-up + cosine) on multi-turn conversations generated from Fashion-MNIST and shapes labels
(``lowbit.data.vqa``): each sequence is one image with several question/answer turns, the loss is the LM's
cross-entropy on the answer tokens only (``llava_chat.encode_conversation``); (4) held-out exact-match
accuracy; (5) the projector (float16) + config + log written atomically.

The LM's weights never get gradients (``requires_grad_(False)``), so backpropagation through it only
computes activation gradients, and the vocabulary projection runs only on positions that carry a label.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lowbit.data.vqa import VQASet, load_vqa
from lowbit.errors import LowbitError
from lowbit.io import atomic_path
from lowbit.models.llava import LlavaConfig, LlavaModel, from_parts
from lowbit.models.llava_chat import IGNORE_INDEX, encode_conversation
from lowbit.models.token_pruning import prune_tokens
from lowbit.paths import lowbit_home


@dataclass(frozen=True)
class ProjectorTraining:
    """Hyper-parameters of the projector build (defaults = the shipped ``llava-fashion``'s last run; its
    assets/llava-fashion/BUILD.md lists the resumed runs that led there)."""

    n_fashion: int = 2000
    n_shapes: int = 1000
    turns: int = 2
    align_steps: int = 200  # stage 1: visual tokens -> caption embeddings (no LM forward; seconds)
    align_batch_size: int = 128
    align_lr: float = 3e-3
    steps: int = 2000  # stage 2: answer-token loss through the frozen LM (the expensive part, ~1.2 s per step)
    batch_size: int = 4
    lr: float = 2e-3
    warmup_steps: int = 5
    weight_decay: float = 0.0
    seed: int = 0
    n_eval: int = 100
    # share of answer-stage conversations whose visual tokens are pruned as at inference (ranked by the tower's
    # score, ratio drawn from PRUNE_TRAIN_RATIOS): the LM learns to answer from a subset, so pruning costs less
    prune_train: float = 0.5
    # the tower's token grid (LlavaConfig): 128 px at output stride 32 = 4x4 tokens (llava-fashion);
    # 192 px at output stride 16 = 12x12 (llava-fashion-hd)
    image_size: int = 128
    output_stride: int = 32
    # a projector file to start from (its weights; the standardisation is recomputed from this build's
    # features): a denser grid of the same tower's features starts from the sparser grid's projector
    init_from: str = ""


PRUNE_TRAIN_RATIOS = (0.25, 0.5, 0.75)


def hd_training(seed: int = 0) -> ProjectorTraining:
    """``llava-fashion-hd``'s first run: the 12x12 grid (192 px, output stride 16), fine-tuned from the shipped
    ``llava-fashion`` projector (same 1280-d features, 9x the tokens), so no caption-alignment stage."""
    from lowbit.models.llava import packaged_projector_path

    return ProjectorTraining(image_size=192, output_stride=16, init_from=str(packaged_projector_path("llava-fashion")),
                             align_steps=0, steps=450, lr=1e-3, seed=seed)


def hd_runs(seed: int = 0) -> tuple[ProjectorTraining, ProjectorTraining]:
    """Both runs of the shipped ``llava-fashion-hd`` build: ``hd_training``, then 600 steps on 3x the Fashion
    images (6,000), started from the first run's projector (``init_from`` is set to that file by the builder).
    The first run alone read 100 held-out Fashion questions at 0.81, the second at 0.89: its 144 tokens per
    image overfit 2,000 images' worth of conversations."""
    first = hd_training(seed)
    return first, replace(first, n_fashion=6000, steps=600, init_from="")


def visual_features(model: LlavaModel, data: VQASet, batch_size: int = 64,
                    progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen vision-tower tokens [N, T, C] (float16) and pruning scores [N, T] (float32) of ``data.images``,
    cached by content hash."""
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    for img in data.images:
        digest.update(img.tobytes())
    key = [model.config.image_size, type(model.vision).__name__]
    if model.config.output_stride != 32:  # (keeps the names of caches written before output_stride existed)
        key.append(model.config.output_stride)
    digest.update(json.dumps(key).encode())
    name = f"llava-{data.name}-{data.split}-{len(data)}-{digest.hexdigest()[:12]}.safetensors"
    path = lowbit_home() / "features" / name
    if path.is_file():
        cached = load_file(str(path))
        if "scores" in cached:  # caches written before pruning-aware training hold tokens only: recompute
            return cached["tokens"], cached["scores"]
    chunks, score_chunks = [], []
    for start in tqdm(range(0, len(data), batch_size), desc=f"vision tokens ({data.name})", disable=not progress,
                      leave=False):
        tokens, scores = model.vision(model.preprocess(data.images[start : start + batch_size]))  # [b, T, C], [b, T]
        chunks.append(tokens.to(torch.float16))
        score_chunks.append(scores.float())
    feats, scores = torch.cat(chunks).contiguous(), torch.cat(score_chunks).contiguous()
    with atomic_path(path) as tmp:
        save_file({"tokens": feats, "scores": scores}, str(tmp))
    return feats, scores


def answer_logits(m: LlavaModel, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM's logits at the positions that predict an answer token, and those tokens: ([N, V], [N]).

    ``batch``: cached visual tokens (``tokens`` [B, T_v, C], optional ``scores`` / ``prune_ratios``) and encoded
    conversations (``pre``, ``post``, ``labels``). Two models with the same visual-token count (the same
    tokenizer and pruning) give logits at the same positions, in the same order (answer distillation)."""
    raw = batch["tokens"].float()  # [B, T_v, C]
    ratios = batch.get("prune_ratios") or [0.0] * len(raw)
    scores = batch.get("scores")  # [B, T_v]: the tower's pruning scores, as at inference
    if scores is None and any(ratios):
        raise LowbitError("pruning-aware training needs the vision tower's token scores (batch['scores'])")
    kept = [t if not r else prune_tokens(t[None], scores[i][None], r)[0]
            for i, (t, r) in enumerate(zip(raw, ratios, strict=True))]
    visual = [m.projector(t) for t in kept]  # each [T_i, D], T_i <= T_v
    rows, labels = [], []
    for v, pre, post, lab in zip(visual, batch["pre"], batch["post"], batch["labels"], strict=True):
        rows.append(torch.cat([m.embed_ids(pre), v, m.embed_ids(post)]))  # [T_i, D]
        labels.append([IGNORE_INDEX] * (len(pre) + v.shape[0]) + lab)
    longest = max(r.shape[0] for r in rows)
    embeds = visual[0].new_zeros(len(rows), longest, visual[0].shape[-1])
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    target = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labels, strict=True)):  # right padding: positions start at 0
        embeds[i, : r.shape[0]], mask[i, : r.shape[0]] = r, 1
        target[i, : len(lab)] = torch.tensor(lab)
    # no KV cache: nothing decodes after this forward (and a cache written inside a gradient-checkpointed block
    # would be written again when the backward recomputes it)
    hidden = m.language.get_decoder()(inputs_embeds=embeds, attention_mask=mask,
                                      use_cache=False).last_hidden_state  # [B, T, D]
    shifted = target[:, 1:]  # token t+1 is predicted at position t
    keep = shifted != IGNORE_INDEX  # [B, T-1]
    logits = m.language.get_output_embeddings()(hidden[:, :-1][keep])  # [n_answer_tokens, V]
    return logits, shifted[keep]


class AnswerLoss(nn.Module):
    """Cross-entropy of the LM on answer tokens, given cached visual tokens; only the projector trains."""

    def __init__(self, model: LlavaModel) -> None:
        super().__init__()
        self.projector = model.projector  # the only registered submodule: checkpoints hold just the projector
        object.__setattr__(self, "_model", model)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits, targets = answer_logits(self._model, batch)
        loss = F.cross_entropy(logits.float(), targets)
        acc = (logits.argmax(-1) == targets).float().mean()
        return {"loss": loss, "token_acc": acc.detach()}


class CaptionAlignLoss(nn.Module):
    """Stage 1: every projected visual token regresses onto the mean LM input embedding of the image's caption.

    A cheap warm start (the projector alone, no LM forward): the LM then already reads the visual tokens as
    roughly "the words describing the image", and the expensive answer-loss stage only has to refine them.
    The loss is the MSE normalised by the targets' mean square, so 1.0 = predicting zeros.
    """

    def __init__(self, projector: nn.Module) -> None:
        super().__init__()
        self.projector = projector

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.projector(batch["tokens"].float())  # [B, T, D]
        target = batch["targets"].unsqueeze(1).expand_as(out)  # [B, D] -> [B, T, D]
        loss = (out - target).pow(2).mean() / target.pow(2).mean().clamp(min=1e-12)
        return {"loss": loss}


@torch.no_grad()
def caption_targets(model: LlavaModel, captions: list[str]) -> torch.Tensor:
    """Mean input embedding [N, D] of each caption's tokens (tokenized as mid-sentence text)."""
    rows = [model.embed_ids(model.tokenizer(" " + c, add_special_tokens=False)["input_ids"]).mean(0) for c in captions]
    return torch.stack(rows)


def conversations(model: LlavaModel, data: VQASet) -> list[Any]:
    return [encode_conversation(model.tokenizer, [(t.question, t.answer) for t in turns], model.config.system)
            for turns in data.turns]


def _pool(model: LlavaModel, hp: ProjectorTraining,
          progress: bool) -> tuple[torch.Tensor, torch.Tensor, list[Any], list[str]]:
    sets = []
    if hp.n_fashion:
        sets.append(load_vqa("fashion-vqa", "train", limit=hp.n_fashion, turns_per_image=hp.turns, seed=hp.seed))
    if hp.n_shapes:
        sets.append(load_vqa("shapes-vqa", "train", limit=hp.n_shapes, turns_per_image=hp.turns, seed=hp.seed))
    tokens, scores = zip(*[visual_features(model, s, progress=progress) for s in sets], strict=True)
    convs = [c for s in sets for c in conversations(model, s)]
    return torch.cat(tokens), torch.cat(scores), convs, [c for s in sets for c in s.captions or []]


def train_projector(model: LlavaModel, hp: ProjectorTraining, out_dir: str | Path | None = None,
                    progress: bool = True) -> list[dict[str, Any]]:
    """Initialise and train ``model.projector`` in place on generated conversations; returns the loss log."""
    from lowbit.train.loop import TrainConfig, train
    from lowbit.train.sampling import index_batches

    torch.manual_seed(hp.seed)
    random.seed(hp.seed)
    feats, scores, convs, captions = _pool(model, hp, progress)
    proj = model.projector
    flat = feats.float().reshape(-1, feats.shape[-1])  # [N*T, C]
    with torch.no_grad():
        proj.mean.copy_(flat.mean(0))
        proj.std.copy_(flat.std(0).clamp(min=1e-3))
        gen = torch.Generator().manual_seed(hp.seed)
        for layer in proj.layers:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=layer.in_features ** -0.5, generator=gen)
                nn.init.zeros_(layer.bias)
        # LM input embeddings have a typical scale; start the visual tokens at that scale, not at ~1.
        emb_rms = model.language.get_input_embeddings().weight.pow(2).mean().sqrt()
        last = [m for m in proj.layers if isinstance(m, nn.Linear)][-1]
        last.weight.mul_(float(emb_rms))
        if hp.init_from:
            from lowbit.models.llava import load_projector_state, read_projector_file

            start, _ = read_projector_file(Path(hp.init_from))
            load_projector_state(proj, {**start, "mean": proj.mean.clone(), "std": proj.std.clone()})
    model.requires_grad_(False)
    proj.requires_grad_(True)
    history: list[dict[str, Any]] = []
    if hp.align_steps:
        targets = caption_targets(model, captions)

        def collate_align(idx: np.ndarray, step: int) -> dict[str, torch.Tensor]:
            i = torch.as_tensor(idx)
            return {"tokens": feats[i], "targets": targets[i]}

        align = TrainConfig(steps=hp.align_steps, lr=hp.align_lr, weight_decay=0.0, warmup_steps=hp.warmup_steps,
                            batch_size=hp.align_batch_size, seed=hp.seed, log_every=10, progress=progress,
                            min_lr_ratio=0.05)
        state = train(CaptionAlignLoss(proj), lambda m, b: m(b),
                      index_batches(len(captions), hp.align_batch_size, hp.seed, collate_align), align,
                      params=list(proj.parameters()))
        history += [{"stage": "align", **h} for h in state.history]

    def collate(idx: np.ndarray, step: int) -> dict[str, Any]:
        rng = random.Random(hp.seed * 1_000_003 + step)  # seeded per step: resume replays the same pruning
        ratios = [rng.choice(PRUNE_TRAIN_RATIOS) if rng.random() < hp.prune_train else 0.0 for _ in idx]
        i = torch.as_tensor(idx)
        return {"tokens": feats[i], "scores": scores[i], "pre": [convs[j].pre for j in idx],
                "post": [convs[j].post for j in idx], "labels": [convs[j].labels for j in idx],
                "prune_ratios": ratios}

    if hp.steps:
        config = TrainConfig(steps=hp.steps, lr=hp.lr, weight_decay=hp.weight_decay, warmup_steps=hp.warmup_steps,
                             batch_size=hp.batch_size, seed=hp.seed, log_every=10, progress=progress, min_lr_ratio=0.05,
                             out_dir=str(out_dir) if out_dir else None, ckpt_every=20 if out_dir else 0)
        batches = index_batches(len(convs), hp.batch_size, hp.seed, collate)
        state = train(AnswerLoss(model), lambda m, b: m(b), batches, config, params=list(proj.parameters()))
        history += [{"stage": "answers", **h} for h in state.history]
    model.requires_grad_(False)
    model.eval()
    return history


def save_projector(model: LlavaModel, path: str | Path, log: dict[str, Any], vision: str = "lit-fashion",
                   language: str = "smollm2-135m-instruct") -> None:
    """Write the projector (float16 weights, float32 standardisation) with config + log metadata, atomically."""
    from safetensors.torch import save_file

    state = {k: (v.half() if k.endswith("weight") or k.endswith("bias") else v.float()).contiguous()
             for k, v in model.projector_state().items()}
    meta = {"config": asdict(model.config), "vision": vision, "language": language, "log": log}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"lowbit": json.dumps(meta)})


def build_llava_projector(target: str | Path, hp: ProjectorTraining = ProjectorTraining(), progress: bool = True,
                          run_dir: str | Path | None = None) -> dict[str, Any]:
    """Build ``llava-fashion``'s projector into ``target``: train, evaluate held-out, save; returns the log.

    ``run_dir`` keeps the answer stage's checkpoints, so re-running a killed build resumes it.
    """
    from lowbit.eval.vqa import vqa_accuracy

    t0 = time.perf_counter()
    model = from_parts("lit-fashion", "smollm2-135m-instruct",
                       LlavaConfig(image_size=hp.image_size, output_stride=hp.output_stride))
    history = train_projector(model, hp, out_dir=run_dir, progress=progress)
    t_train = time.perf_counter() - t0
    held_out = {name: vqa_accuracy(model, load_vqa(name, "test", limit=hp.n_eval), progress=progress)["accuracy"]
                for name in ("fashion-vqa", "shapes-vqa")}
    log = {"hyperparameters": asdict(hp), "history": history, "held_out_accuracy": held_out,
           "train_seconds": round(t_train, 1), "torch_threads": torch.get_num_threads()}
    save_projector(model, target, log)
    return log


def main(argv: list[str] | None = None) -> int:
    """``python -m lowbit.workflows.build_llava --out FILE [--seed N] [--steps N] ...``: build and print the log."""
    import argparse

    defaults = ProjectorTraining()
    parser = argparse.ArgumentParser(prog="python -m lowbit.workflows.build_llava", description=main.__doc__)
    parser.add_argument("--out", required=True, help="projector .safetensors file to write")
    parser.add_argument("--run-dir", help="checkpoints of the answer stage (a re-run resumes)")
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    hp = ProjectorTraining(**{k: getattr(args, k) for k in asdict(defaults)})
    log = build_llava_projector(args.out, hp, run_dir=args.run_dir)
    print(json.dumps({k: v for k, v in log.items() if k != "history"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
