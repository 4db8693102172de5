"""``text``: a language model on a text file: perplexity, and against a reference llama.cpp's KL-divergence stats.

The file is tokenized once and cut into consecutive windows of ``WINDOW`` tokens (the last, shorter one kept
when it has at least 2 tokens). As in llama.cpp's ``perplexity``, each window is one forward from its start and
only its second half is scored (positions ``max(1, len // 2)`` to the end): every scored token has at least half
a window of context. Over the scored tokens:

- ``perplexity`` = exp(mean negative log-likelihood), ``nll`` the mean itself;
- with ``reference=`` (``llama-perplexity --kl-divergence``'s statistics): ``kl_mean`` and ``kl_p99`` of the
  per-token KL(reference || model) of the next-token distributions, ``same_top_p`` the share of tokens whose
  top-1 token agrees, and the reference's perplexity.

The distributions are never stored: comparing runs both models window by window (``TextOutputs``), so memory
stays one window of logits whatever the file's length. ``limit`` keeps the first ``limit`` windows.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowbit.data.base import ImageTextSet
from lowbit.data.text import read_text_items
from lowbit.errors import LowbitError
from lowbit.eval.footprint import disk_bytes, weight_bytes
from lowbit.eval.results import Result

WINDOW = 512  # tokens per window (at most the model's context window)


@dataclass
class TextOutputs:
    """What comparing needs: the model and the windows it scored (recomputed window by window)."""

    model: Any
    windows: list[torch.Tensor]
    kind: str = "text"


@dataclass
class TextSet(ImageTextSet):
    """A text to score: the file's content as the one caption, no images; ``limit`` windows at most."""

    limit: int | None = None


def load_text(spec: Any, limit: int | None = None) -> ImageTextSet:
    """A text file's content (chat JSONL conversations as their message texts) as the set's one caption."""
    if isinstance(spec, ImageTextSet):
        return spec
    path = Path(os.fspath(spec))
    if not path.is_file():
        raise LowbitError(f"task 'text' needs data= a text file; received {os.fspath(spec)!r}; accepted: a .txt/.md "
                          "file or chat/text JSONL")
    items = read_text_items(path)
    text = "\n\n".join(i if isinstance(i, str) else "\n".join(m["content"] for m in i) for i in items)
    return TextSet(name=path.name, images=[], captions=[text], limit=limit)


def text_windows(model: Any, text: str, window: int = WINDOW, limit: int | None = None) -> list[torch.Tensor]:
    """Consecutive windows [T <= window] of the text's token ids (the tokenizer's special tokens added once)."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None or not hasattr(model, "language"):
        raise LowbitError(f"task 'text' measures a language model; received a {type(model).__name__}; accepted: a "
                          "causal-LM directory, .gguf file or a quantized one")
    window = min(window, int(getattr(model, "context_window", window)))
    ids = list(tokenizer(text)["input_ids"])
    windows = [torch.tensor(ids[s:s + window], dtype=torch.long) for s in range(0, len(ids), window)
               if len(ids) - s >= 2]
    if not windows:
        raise LowbitError("the text is shorter than 2 tokens; accepted: a text file with something to predict")
    return windows[:limit] if limit is not None else windows


def first_scored(n: int) -> int:
    """The first position whose prediction a window of ``n`` tokens scores (its second half)."""
    return max(1, n // 2)


@torch.inference_mode()
def window_logprobs(model: Any, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities [S, V] of the scored next tokens, their targets [S]) of one window."""
    start = first_scored(window.numel())
    logits = model.language(window[None]).logits[0, start - 1:-1].float()  # predictions of tokens start..end
    return torch.log_softmax(logits, dim=-1), window[start:]


def run_text(model: Any, data: ImageTextSet, batch_size: int = 1, progress: bool = False) -> Result:
    """Perplexity of ``model`` over the windows of the set's text."""
    windows = text_windows(model, data.captions[0] if data.captions else "", limit=getattr(data, "limit", None))
    nll, count = 0.0, 0
    for w in windows:
        logp, target = window_logprobs(model, w)
        nll -= float(logp.gather(1, target[:, None]).sum())
        count += target.numel()
    return Result({"perplexity": math.exp(nll / count), "nll": nll / count, "tokens_scored": count,
                   "windows": len(windows), "window": int(windows[0].numel())}, TextOutputs(model, windows))


def compare_text(reference: Result, candidate: Result) -> dict[str, Any]:
    """KL(reference || candidate) per scored token: mean, 99th percentile; same top-1 token share."""
    ref, cand = reference.outputs, candidate.outputs
    if not isinstance(ref, TextOutputs) or not isinstance(cand, TextOutputs) or len(ref.windows) != len(cand.windows) \
            or any(not torch.equal(a, b) for a, b in zip(ref.windows, cand.windows, strict=True)):
        raise LowbitError("the reference tokenizes the text differently (or was not run on the text task); accepted: "
                          "a reference with the same tokenizer, e.g. the float model the quantized one came from")
    kls, same = [], 0
    for window in cand.windows:
        p_log, _ = window_logprobs(ref.model, window)
        q_log, _ = window_logprobs(cand.model, window)
        kls.append((p_log.exp() * (p_log - q_log)).sum(-1).clamp(min=0))  # [S]; tiny negatives are rounding
        same += int((p_log.argmax(-1) == q_log.argmax(-1)).sum())
    kl = torch.cat(kls).double()
    return {"kl_mean": float(kl.mean()), "kl_p99": float(torch.quantile(kl, 0.99)), "kl_max": float(kl.max()),
            "same_top_p": same / kl.numel(), "reference_perplexity": float(reference["perplexity"]),
            "tokens_compared": int(kl.numel())}


def text_footprint(model: Any, data: ImageTextSet, checkpoint: str | os.PathLike[str] | None = None,
                   progress: bool = False) -> dict[str, Any]:
    """Weight bytes in memory and, for a checkpoint, on disk (latency: ``lowbit bench``, not this task)."""
    return {**weight_bytes(model), "disk_bytes": None if checkpoint is None else disk_bytes(checkpoint)}


def text_tasks(task_cls: Any) -> list[Any]:
    return [task_cls("text", run_text, None, description="language model on data=<text file>: perplexity; with "
                     "a reference, KL mean / p99 and same top-1 token share", footprint=text_footprint,
                     compare=compare_text, fidelity_metrics=("kl_mean", "kl_p99", "same_top_p"),
                     loader=load_text)]
