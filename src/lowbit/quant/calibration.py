"""Calibration statistics for GPTQ/AWQ: each layer's inputs, captured from the model's own forward.

Implements the ``CalibrationProvider`` protocol of :mod:`lowbit.quant.methods` (GPTQ: Frantar et al., 2022,
"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"; AWQ: Lin et al., 2023,
"AWQ: Activation-aware Weight Quantization"). ``stats_for`` hooks the module object it is given, runs the
tower's path (images for ``vision``, texts for ``text``, both for ``projector``) over the cached
calibration batches, and stops each forward as soon as the module has seen its input. Because
``quantize_`` replaces modules one at a time in definition order, every call sees the already quantized
earlier layers: sequential, error-aware calibration as in the GPTQ paper.

Per module it accumulates XᵀX (float64 [K, K], over all rows) and keeps a seeded uniform subsample of at
most ``max_rows`` input rows. Padding positions of the text tokens are left out.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.base import DualEncoder
from lowbit.quant.methods import QuantContext

_IMAGE_TOWERS = {"vision"}
_TEXT_TOWERS = {"text"}


class CalibrationWarning(UserWarning):
    """A module saw no calibration input (it is not on the encode paths)."""


class _Captured(Exception):
    """Raised from the forward hook to stop the forward once the target module's input is recorded."""


def _tf_same_pad(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Apply the input padding of EfficientNet's TF-'same' conv subclasses, which pad inside ``forward``."""
    static = getattr(module, "static_padding", None)
    if isinstance(static, nn.Module):
        return static(x)
    ih, iw = x.shape[-2:]
    kh, kw = module.kernel_size
    sh, sw = module.stride
    dh, dw = module.dilation
    pad_h = max((-(-ih // sh) - 1) * sh + (kh - 1) * dh + 1 - ih, 0)
    pad_w = max((-(-iw // sw) - 1) * sw + (kw - 1) * dw + 1 - iw, 0)
    return nn.functional.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows X [S, K] a module's weight [N, K] multiplies, from its input tensor ``x``.

    Linear: [..., K] -> [S, K]. Conv2d (groups=1): 1x1 input [B, C, H, W] -> [B*H*W, C]; k x k convs are
    unfolded to [B*L, C*kh*kw], matching the weight viewed as [N, C*kh*kw]. EfficientNet's TF-"same" conv
    subclasses (padding computed in ``forward``) are padded the same way first; other Conv2d subclasses
    with their own ``forward`` are refused for k x k kernels, as their patches cannot be known here.
    """
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise LowbitError(
                f"calibration of grouped/depthwise convs (groups={module.groups}) is not supported; "
                "quantize them with a method that needs no calibration (e.g. rtn)"
            )
        if module.kernel_size == (1, 1) and module.stride == (1, 1) and tuple(module.padding) == (0, 0):
            b, c, h, w = x.shape
            return x.permute(0, 2, 3, 1).reshape(b * h * w, c)  # [B*H*W, C]
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            raise LowbitError(f"calibration of a conv with padding={module.padding!r}, "
                              f"padding_mode={module.padding_mode!r} is not supported")
        if type(module).forward is not nn.Conv2d.forward:
            if "SamePadding" not in type(module).__name__:
                raise LowbitError(f"calibration of {type(module).__name__} (a Conv2d with its own forward) "
                                  "is not supported for k x k kernels")
            x = _tf_same_pad(module, x)
        cols = nn.functional.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # [B, C*kh*kw, L] -> [B*L, C*kh*kw]
    return x.reshape(-1, x.shape[-1])  # [..., K] -> [S, K]


def module_kind(module: nn.Module) -> str:
    """``linear``, ``conv1x1`` or ``conv`` (the manifest's ``kind``)."""
    if isinstance(module, nn.Conv2d):
        return "conv1x1" if module.kernel_size == (1, 1) else "conv"
    return "linear"


class _RowStats:
    """Running XᵀX and a uniform random subsample (smallest random keys win) of the rows seen."""

    def __init__(self, max_rows: int, generator: torch.Generator) -> None:
        self.max_rows = max_rows
        self.gen = generator
        self.gram: torch.Tensor | None = None  # float64 [K, K]
        self.abs_sum: torch.Tensor | None = None  # float64 [K], for AWQ's mean |x|
        self.n_rows = 0
        self.rows: torch.Tensor | None = None  # float32 [<=max_rows, K]
        self.keys: torch.Tensor | None = None  # float32 [<=max_rows]

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float32)  # [S, K]
        if x.shape[0] == 0:
            return
        x64 = x.to(torch.float64)
        part = x64.T @ x64  # [K, K]
        self.gram = part if self.gram is None else self.gram + part
        abs_part = x64.abs().sum(dim=0)  # [K]
        self.abs_sum = abs_part if self.abs_sum is None else self.abs_sum + abs_part
        self.n_rows += x.shape[0]
        if self.max_rows <= 0:
            return
        keys = torch.rand(x.shape[0], generator=self.gen)
        rows, all_keys = (x, keys) if self.rows is None else (
            torch.cat([self.rows, x]), torch.cat([self.keys, keys]))  # type: ignore[list-item]
        if rows.shape[0] > self.max_rows:
            keep = torch.topk(all_keys, self.max_rows, largest=False).indices.sort().values
            rows, all_keys = rows[keep], all_keys[keep]
        self.rows, self.keys = rows.clone(), all_keys


class ActivationCalibrator:
    """Captures each quantized module's calibration inputs by running ``model`` on images and texts.

    ``images``/``texts`` feed the ``vision``/``text`` towers (both feed ``projector`` and any other tower);
    they are preprocessed/tokenized once, in batches of ``batch_size``. ``max_rows`` input rows per module are
    kept (seeded by ``seed``) for AWQ and error measurement; the Hessian uses every row.
    """

    def __init__(
        self,
        model: DualEncoder,
        images: Sequence[Image.Image] | None,
        texts: Sequence[str] | None,
        batch_size: int = 32,
        max_rows: int = 4096,
        seed: int = 0,
    ) -> None:
        if not images and not texts:
            raise LowbitError("calibration needs at least one image or one text")
        if batch_size < 1:
            raise LowbitError(f"calibration batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.images = list(images or [])
        self.texts = list(texts or [])
        self.batch_size = batch_size
        self.max_rows = max_rows
        self.seed = seed
        self._pixels: list[torch.Tensor] | None = None
        self._tokens: list[dict[str, torch.Tensor]] | None = None

    # --- cached inputs ---------------------------------------------------------------------------------
    def pixel_batches(self) -> list[torch.Tensor]:
        """Preprocessed image batches [B, 3, H, W], computed on first use."""
        if self._pixels is None:
            bs = self.batch_size
            self._pixels = [self.model.preprocess(self.images[i : i + bs]) for i in range(0, len(self.images), bs)]
        return self._pixels

    def token_batches(self) -> list[dict[str, torch.Tensor]]:
        """Tokenized text batches, computed on first use."""
        if self._tokens is None:
            bs = self.batch_size
            self._tokens = [self.model.tokenize(self.texts[i : i + bs]) for i in range(0, len(self.texts), bs)]
        return self._tokens

    def _paths(self, tower: str) -> list[tuple[str, Callable[[Any], Any], list[Any]]]:
        """(kind, forward, batches) for the calibration paths that reach ``tower``."""
        image_path = ("image", self.model.encode_image, self.pixel_batches() if self.images else [])
        text_path = ("text", self.model.encode_text, self.token_batches() if self.texts else [])
        if tower in _IMAGE_TOWERS:
            if not self.images:
                raise LowbitError(f"tower {tower!r} needs calibration images, but none were given")
            return [image_path]
        if tower in _TEXT_TOWERS:
            if not self.texts:
                raise LowbitError(f"tower {tower!r} needs calibration texts, but none were given")
            return [text_path]
        return [p for p in (image_path, text_path) if p[2]]

    # --- CalibrationProvider ---------------------------------------------------------------------------
    @torch.no_grad()
    def stats_for(self, tower: str, module_name: str, module: nn.Module) -> QuantContext:
        """Run the ``tower``'s calibration path(s) and return ``module``'s input Hessian and sample rows."""
        stats = _RowStats(self.max_rows, torch.Generator().manual_seed(self.seed))
        mask: list[torch.Tensor | None] = [None]  # attention mask of the text batch in flight

        def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                raise LowbitError(f"module {module_name!r} got no tensor input during calibration")
            x = args[0]
            m = mask[0]
            if m is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(m.shape):
                x = x[m.bool()]  # [B, T, K] -> [real tokens, K]: padding carries no signal
            stats.add(input_rows(mod, x))
            raise _Captured

        was_training = self.model.training
        self.model.eval()
        handle = module.register_forward_pre_hook(hook)
        try:
            for kind, forward, batches in self._paths(tower):
                for batch in batches:
                    mask[0] = batch.get("attention_mask") if kind == "text" else None
                    try:
                        forward(batch)
                    except _Captured:
                        pass
        finally:
            handle.remove()
            self.model.train(was_training)
        kind = module_kind(module)
        if stats.gram is None or stats.abs_sum is None:
            # A layer the encode paths never run (e.g. an unused pooler) cannot matter for the embeddings;
            # say so and let the method fall back to its calibration-free grid instead of failing the model.
            warnings.warn(
                f"module {module_name!r} of tower {tower!r} saw no input while running the calibration data; "
                "it is quantized without calibration statistics", CalibrationWarning, stacklevel=2,
            )
            return QuantContext(tower=tower, name=module_name, kind=kind, extra={"n_rows": 0})
        hessian = stats.gram * (2.0 / stats.n_rows)  # H = 2/S XᵀX as in GPTQ
        act_abs_mean = (stats.abs_sum / stats.n_rows).to(torch.float32)  # [K]
        return QuantContext(
            inputs=stats.rows, hessian=hessian, tower=tower, name=module_name, kind=kind,
            extra={"act_abs_mean": act_abs_mean, "n_rows": stats.n_rows},
        )


def calibration_texts(captions: Sequence[str] | None, classnames: Sequence[str] | None,
                      templates: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """Up to ``n`` calibration texts: the captions, else templates × classnames shuffled with ``seed``."""
    if captions:
        return list(captions[:n])
    if not classnames:
        return []
    prompts = list(dict.fromkeys(t.format(c) for c in classnames for t in templates))
    random.Random(seed).shuffle(prompts)
    return prompts[:n]


def calibration_from_dataset(
    model: DualEncoder,
    dataset_spec: str = "fashion-mnist",
    n_samples: int = 128,
    split: str = "train",
    seed: int = 0,
    batch_size: int = 32,
    max_rows: int = 4096,
) -> ActivationCalibrator:
    """An :class:`ActivationCalibrator` over the first ``n_samples`` images (and captions) of a dataset."""
    from lowbit.data import resolve_dataset

    if n_samples < 1:
        raise LowbitError(f"calibration n_samples must be >= 1, got {n_samples}")
    data = resolve_dataset(dataset_spec, split=split, limit=n_samples)
    texts = calibration_texts(data.captions, data.classnames, data.templates, n_samples, seed)
    return ActivationCalibrator(model, data.images, texts, batch_size=batch_size, max_rows=max_rows, seed=seed)
