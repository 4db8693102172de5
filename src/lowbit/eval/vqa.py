"""Visual question answering: exact-match accuracy, generative footprint and next-token fidelity.

- ``vqa_accuracy``: greedy answers to one generated question per held-out image (``lowbit.data.vqa``),
  compared after ``normalize_answer`` (lower case, no punctuation or leading article); ``accuracy`` overall and
  ``accuracy_<kind>`` per question kind. The first answer token's log-probabilities ride along in the outputs.
- ``vqa_fidelity``: against a reference run on the same questions: ``agreement`` (same first answer token,
  top-1), ``kl`` (mean KL(reference || candidate) of that token's distribution, nats), ``answer_agreement``.
- ``vqa_footprint``: ``ttft_ms`` (image in -> first token out, batch 1: preprocessing, vision, projector,
  prefill), ``decode_tok_s`` (tokens per second after the first, KV cache on), weight/disk bytes, peak RSS.
  Medians after one warm-up, on the engine ``chat`` runs (``llava_generate.forced_tokens``).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lowbit.data.base import ImageTextSet
from lowbit.data.vqa import VQASet, load_vqa, normalize_answer
from lowbit.errors import LowbitError
from lowbit.eval.results import Result

LOGPROB_DTYPE = torch.float16  # [N, vocab] per run: half the memory, KL error ~1e-3 nats


@dataclass
class VQAOutputs:
    """Per question: the normalised answer and the first answer token's log-probabilities [N, V]."""

    answers: list[str]
    first_logprobs: torch.Tensor
    kind: str = "vqa"


def _require_llava(model: Any) -> Any:
    from lowbit.models.llava import LlavaModel

    if not isinstance(model, LlavaModel):
        raise LowbitError(f"VQA tasks need a generative (llava) model; received a {type(model).__name__}; "
                          "accepted: llava-fashion-hd, llava-fashion, a Llava checkpoint directory or a quantized "
                          "llava model")
    return model


def vqa_accuracy(model: Any, data: VQASet, batch_size: int = 16, max_new_tokens: int = 8,
                 progress: bool = False) -> Result:
    """Exact-match accuracy of greedy answers to the first question of each image."""
    from tqdm.auto import tqdm

    from lowbit.models.llava_generate import Decoding, generate_batch

    model = _require_llava(model)
    turns = [t[0] for t in data.turns]
    answers: list[str] = []
    logprobs = []
    for start in tqdm(range(0, len(data), batch_size), desc=data.name, unit="batch", disable=not progress,
                      leave=False, delay=2):
        chunk = turns[start : start + batch_size]
        pixels = model.preprocess(data.images[start : start + batch_size])
        gen = generate_batch(model, pixels, [t.question for t in chunk], Decoding(max_new_tokens),
                             first_logprobs=True)
        answers += [normalize_answer(a) for a in gen.texts]
        logprobs.append(gen.first_logprobs.to(LOGPROB_DTYPE))
    correct = [a == normalize_answer(t.answer) for a, t in zip(answers, turns, strict=True)]
    metrics: dict[str, Any] = {"accuracy": sum(correct) / max(len(correct), 1), "n": len(correct)}
    for kind in sorted({t.kind for t in turns}):
        hits = [c for c, t in zip(correct, turns, strict=True) if t.kind == kind]
        metrics[f"accuracy_{kind}"] = sum(hits) / len(hits)
    return Result(metrics, VQAOutputs(answers, torch.cat(logprobs)))


def vqa_fidelity(reference: Result, candidate: Result) -> dict[str, Any]:
    """Next-token top-1 agreement, mean KL(reference || candidate) and answer agreement on the same questions."""
    ref, cand = reference.outputs, candidate.outputs
    if not isinstance(ref, VQAOutputs) or not isinstance(cand, VQAOutputs):
        raise LowbitError("VQA fidelity compares two VQA runs; received another kind of result")
    if ref.first_logprobs.shape != cand.first_logprobs.shape:
        raise LowbitError(f"VQA fidelity needs the same questions and vocabulary; received "
                          f"{tuple(ref.first_logprobs.shape)} vs {tuple(cand.first_logprobs.shape)}")
    p_log, q_log = ref.first_logprobs.float(), cand.first_logprobs.float()
    kl = (p_log.exp() * (p_log - q_log)).sum(-1).clamp(min=0)  # [N]
    same = [a == b for a, b in zip(ref.answers, cand.answers, strict=True)]
    return {
        "basis": "first answer token",
        "n": len(same),
        "agreement": float((p_log.argmax(-1) == q_log.argmax(-1)).float().mean()),
        "kl": float(kl.mean()),
        "answer_agreement": sum(same) / max(len(same), 1),
        "metric": "accuracy",
        "reference_accuracy": reference.get("accuracy"),
        "candidate_accuracy": candidate.get("accuracy"),
        "accuracy_kept": (candidate["accuracy"] / reference["accuracy"]) if reference.get("accuracy") else None,
    }


def _median_s(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: allocator growth, lazy kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def first_token_fn(model: Any, image: Any, question: str) -> Callable[[], torch.Tensor]:
    """What time to first token measures, as a call: PIL image -> preprocess, vision, projector (pruning as
    the model's config says), prefill on the engine ``chat`` uses -> the greedy first token [1, 1]."""
    from lowbit.models.llava_generate import forced_tokens

    model = _require_llava(model)
    return torch.inference_mode()(lambda: forced_tokens(model, model.preprocess([image]), question, 1))


@torch.inference_mode()
def vqa_footprint(model: Any, data: VQASet, checkpoint: str | os.PathLike[str] | None = None, repeats: int = 5,
                  decode_tokens: int = 32) -> dict[str, Any]:
    """Time to first token and decode speed at batch 1 on the first sample, plus sizes and peak RSS."""
    from lowbit.eval.footprint import disk_bytes, file_bytes, peak_rss_mib, state_bytes, weight_bytes
    from lowbit.models.llava_generate import forced_tokens

    model = _require_llava(model)
    image, question = data.images[0], data.turns[0][0].question
    lm = model.language
    prefill = first_token_fn(model, image, question)

    def decode_run(n: int) -> None:
        forced_tokens(model, model.preprocess([image]), question, n)

    was_training = model.training
    model.eval()
    try:
        ttft = _median_s(prefill, repeats)
        one = _median_s(lambda: decode_run(1), max(repeats // 2, 1))
        many = _median_s(lambda: decode_run(decode_tokens + 1), max(repeats // 2, 1))
        n_visual = int(model.visual_embeddings(model.preprocess([image])).shape[1])
        n_prompt = int(model.prompt_embeddings(torch.zeros(1, n_visual, lm.config.hidden_size), [question])[0].shape[1])
    finally:
        model.train(was_training)
    result: dict[str, Any] = dict(weight_bytes(model))
    result.update({
        "disk_bytes": None if checkpoint is None else disk_bytes(checkpoint),
        # what a user ships (the same keys as lowbit.eval.footprint): every file, tokenizer and manifest included
        "file_bytes": state_bytes(model) if checkpoint is None else file_bytes(checkpoint),
        "file_bytes_scope": ("state dict as stored (no checkpoint file)" if checkpoint is None
                             else "every file of the checkpoint directory"),
        "fp16_bytes": state_bytes(model, torch.float16),
        "ttft_ms": ttft * 1000,
        # None when noise made the longer run no slower than the 1-token run: no honest rate to report
        "decode_tok_s": decode_tokens / (many - one) if many > one else None,
        "visual_tokens": n_visual,
        "prompt_tokens": n_prompt,
        "peak_rss_mib": peak_rss_mib(),
        "threads": torch.get_num_threads(),
        "latency_scope": "batch 1; ttft = PIL image -> first token (preprocess, vision, projector, prefill); "
                         "decode = tokens/s after the first, KV cache on; both on the engine chat uses (lean "
                         "for Llama-family LMs with a float KV cache, else transformers'); medians after warm-up",
        "peak_rss_scope": "whole process, high-water mark since start",
    })
    return result


# --- task adapters (registered in lowbit.eval.tasks) -------------------------------------------------------------
def _vqa_set_for(name: str, data: ImageTextSet) -> VQASet:
    """The generated VQA questions of the images ``evaluate`` loaded (same split, same first-N subset)."""
    return load_vqa(name, "test", limit=len(data))


def vqa_runner(name: str) -> Callable[[Any, ImageTextSet, int, bool], Result]:
    def run(model: Any, data: ImageTextSet, batch_size: int, progress: bool) -> Result:
        return vqa_accuracy(model, _vqa_set_for(name, data), batch_size=min(batch_size, 16), progress=progress)

    return run


def vqa_footprint_runner(name: str) -> Callable[..., dict[str, Any]]:
    def run(model: Any, data: ImageTextSet, checkpoint: str | os.PathLike[str] | None = None,
            progress: bool = False) -> dict[str, Any]:
        return vqa_footprint(model, _vqa_set_for(name, data.subset(1)), checkpoint=checkpoint)

    return run


def vqa_tasks(task_cls: type) -> list[Any]:
    """The VQA ``Task`` entries (``task_cls`` is ``lowbit.eval.tasks.Task``, passed in to avoid an import cycle)."""
    return [
        task_cls(name, vqa_runner(name), dataset, description=description, footprint=vqa_footprint_runner(name),
                 compare=vqa_fidelity, fidelity_metrics=("kl", "agreement"))
        for name, dataset, description in (
            ("fashion-vqa", "fashion-mnist", "generated questions on Fashion-MNIST test images, exact match"),
            ("shapes-vqa", "shapes", "shape/colour/count/position/size questions on shapes test images"),
        )
    ]
