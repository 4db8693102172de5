"""Calibration statistics for GPTQ/AWQ: each layer's inputs, captured from the model's own forward.

Implements the ``CalibrationProvider`` protocol of :mod:`lowbit.quant.methods` (GPTQ: Frantar et al., 2022,
"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"; AWQ: Lin et al., 2023,
"AWQ: Activation-aware Weight Quantization"). ``stats_for`` hooks the module object it is given, runs the
tower's path (images for ``vision``, texts for ``text``, both for ``projector``) over the cached
calibration batches, and stops each forward as soon as the module has seen its input. Because
``quantize_`` replaces modules one at a time in definition order, every call sees the already quantized
earlier layers: sequential, error-aware calibration as in the GPTQ paper.

Per module it accumulates XᵀX (float64 [K, K], over all rows) and keeps a seeded uniform subsample of at
most ``max_rows`` input rows. Padding positions of the text tokens are left out. A grouped (depthwise)
conv gets one Hessian per group instead (``extra["group_hessians"]`` [G, Kg, Kg]), since each group's
output channels see only their own input channels.
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
from lowbit.kernels.quant_linear import is_quantized
from lowbit.models.base import DualEncoder
from lowbit.models.spec import input_padding
from lowbit.quant.defaults import DEFAULT_CALIB_SAMPLES
from lowbit.quant.methods import QuantContext

SEQUENTIAL_MODES = ("layer", "block")
_CAPTURABLE = (nn.Linear, nn.Conv2d)  # what a block pass records (float ones only: see is_quantized)
_IMAGE_TOWERS = {"vision"}
_TEXT_TOWERS = {"text"}


class CalibrationWarning(UserWarning):
    """A module saw no calibration input (it is not on the encode paths)."""


class _Captured(Exception):
    """Raised from the forward hook to stop the forward once the target module's input is recorded."""


def _conv_patches(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Unfolded input patches [B, C*kh*kw, L] of a k x k conv (classes padding their own input padded first)."""
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        raise LowbitError(f"calibration of a conv with padding={module.padding!r}, "
                          f"padding_mode={module.padding_mode!r} is not supported")
    if type(module).forward is not nn.Conv2d.forward:
        pad = input_padding(module)  # the family spec's calibration hook (lowbit.models.spec)
        if pad is None:
            raise LowbitError(f"calibration of {type(module).__name__} (a Conv2d with its own forward) "
                              "is not supported for k x k kernels")
        x = pad(module, x)
    return nn.functional.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows X [S, K] a module's weight [N, K] multiplies, from its input tensor ``x``.

    Linear: [..., K] -> [S, K]. Conv2d (groups=1): 1x1 input [B, C, H, W] -> [B*H*W, C]; k x k convs are
    unfolded to [B*L, C*kh*kw], matching the weight viewed as [N, C*kh*kw]. Conv2d subclasses padding their
    input in ``forward`` (e.g. EfficientNet's TF-"same" convs) are padded the same way first, by their family
    spec's ``input_padding``; other Conv2d subclasses with their own ``forward`` are refused for k x k kernels,
    as their patches cannot be known here.
    Grouped (e.g. depthwise) convs have one row space per group: see ``grouped_input_rows``.
    """
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise LowbitError(
                f"input_rows: a grouped/depthwise conv (groups={module.groups}) has one input space per "
                "group; use grouped_input_rows"
            )
        if module.kernel_size == (1, 1) and module.stride == (1, 1) and tuple(module.padding) == (0, 0):
            b, c, h, w = x.shape
            return x.permute(0, 2, 3, 1).reshape(b * h * w, c)  # [B*H*W, C]
        cols = _conv_patches(module, x)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # [B, C*kh*kw, L] -> [B*L, C*kh*kw]
    return x.reshape(-1, x.shape[-1])  # [..., K] -> [S, K]


def grouped_input_rows(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Per-group rows [G, S, Kg] of a grouped conv: group g's output channels (weight rows
    g*N/G .. (g+1)*N/G - 1, viewed [N, Kg] with Kg = C/G*kh*kw) multiply only the patches of its own C/G
    input channels. Depthwise: G = C, Kg = kh*kw.
    """
    g = module.groups
    cols = _conv_patches(module, x)  # [B, C*kh*kw, L]; channel-major, so each group's block is contiguous
    b, ck, length = cols.shape
    kg = ck // g
    return cols.reshape(b, g, kg, length).permute(1, 0, 3, 2).reshape(g, b * length, kg)  # [G, B*L, Kg]


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
        self.abs_max: torch.Tensor | None = None  # float32 [K], for SmoothQuant's max |x|
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
        top = x.abs().amax(dim=0)
        self.abs_max = top if self.abs_max is None else torch.maximum(self.abs_max, top)
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


class _GroupedStats:
    """Running per-group XᵀX [G, Kg, Kg] (float64) and sum |x| [G, Kg] of a grouped conv's patch rows."""

    def __init__(self) -> None:
        self.gram: torch.Tensor | None = None
        self.abs_sum: torch.Tensor | None = None
        self.n_rows = 0

    def add(self, x: torch.Tensor) -> None:
        x64 = x.detach().to(torch.float64)  # [G, S, Kg]
        if x64.shape[1] == 0:
            return
        part = x64.transpose(1, 2) @ x64  # [G, Kg, Kg]
        self.gram = part if self.gram is None else self.gram + part
        abs_part = x64.abs().sum(dim=1)  # [G, Kg]
        self.abs_sum = abs_part if self.abs_sum is None else self.abs_sum + abs_part
        self.n_rows += x64.shape[1]


class ActivationCalibrator:
    """Captures each quantized module's calibration inputs by running ``model`` on images and texts.

    ``images``/``texts`` feed the ``vision``/``text`` towers (both feed ``projector`` and any other tower);
    they are preprocessed/tokenized once, in batches of ``batch_size``. ``max_rows`` input rows per module are
    kept (seeded by ``seed``) for AWQ and error measurement; the Hessian uses every row.

    ``sequential`` says how much of the already-quantized model a layer's statistics see. ``"layer"``
    (default): one pass per layer, stopped at that layer, so every layer sees all earlier quantized layers
    (GPTQ's "true sequential"). ``"block"``: one pass per block (the outermost ``nn.ModuleList`` entry a
    layer lives in: a transformer layer, an EfficientNet block) records all its layers at once, so layers
    see the quantized earlier blocks but their own block in float (GPTQ's default sequential order);
    fewer, shorter forwards.
    """

    def __init__(
        self,
        model: DualEncoder,
        images: Sequence[Image.Image] | None,
        texts: Sequence[str] | None,
        batch_size: int = 32,
        max_rows: int = 4096,
        seed: int = 0,
        sequential: str = "layer",
    ) -> None:
        if sequential not in SEQUENTIAL_MODES:
            raise LowbitError(f"calibration sequential={sequential!r}; accepted: {', '.join(SEQUENTIAL_MODES)}")
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
        self.sequential = sequential
        self._block_cache: dict[tuple[str, str], _RowStats | _GroupedStats] = {}
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
        """Run the ``tower``'s calibration path(s) and return ``module``'s input Hessian and sample rows.

        ``sequential="block"``: the first layer of a block triggers one pass that records every float
        Linear/Conv2d of that block; its siblings are then served from that pass (see the class docstring).
        """
        if self.sequential == "layer":
            return self._context(tower, module_name, module, self._capture(tower, {module_name: module})[module_name])
        if (tower, module_name) in self._block_cache:
            return self._context(tower, module_name, module, self._block_cache.pop((tower, module_name)))
        block = self._block_of(tower, module_name)
        targets = {module_name: module}
        for name, m in self.towers()[tower].named_modules():
            if (name == block or name.startswith(block + ".")) and isinstance(m, _CAPTURABLE) \
                    and not is_quantized(m):
                targets.setdefault(name, m)
        stats = self._capture(tower, targets)
        self._block_cache = {(tower, name): st for name, st in stats.items() if name != module_name}
        return self._context(tower, module_name, module, stats[module_name])

    @torch.no_grad()
    def stats_for_all(self, tower: str, modules: dict[str, nn.Module]) -> dict[str, QuantContext]:
        """Every module's statistics from one pass over the calibration data (the model as it is: a search
        measuring each layer alone on the float model needs no sequential passes; each batch's forward still
        stops once all have seen their input)."""
        stats = self._capture(tower, dict(modules))
        return {name: self._context(tower, name, m, stats[name]) for name, m in modules.items()}

    def on_quantized(self, tower: str, module_name: str, new_module: nn.Module) -> None:
        """A layer outside the block in the cache changed: the cached inputs may no longer be what it sees."""
        if self._block_cache and self._block_of(tower, module_name) != self._block_of(*next(iter(self._block_cache))):
            self._block_cache.clear()

    def towers(self) -> dict[str, nn.Module]:
        """The model's towers, by the names ``quantize_`` hands to ``stats_for``."""
        return self.model.towers()

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def _block_of(self, tower: str, module_name: str) -> str:
        """The outermost entry of an ``nn.ModuleList`` containing the module (a transformer layer, an
        EfficientNet block), or the module itself when it lies in no ModuleList."""
        root = self.towers()[tower]
        parts = module_name.split(".")
        for i in range(1, len(parts)):
            if isinstance(root.get_submodule(".".join(parts[:i])), nn.ModuleList):
                return ".".join(parts[: i + 1])
        return module_name

    def _capture(self, tower: str, targets: dict[str, nn.Module]) -> dict[str, _RowStats | _GroupedStats]:
        """Input statistics of every module in ``targets`` over all calibration batches of ``tower``.

        Each batch's forward stops as soon as every target has seen its input (its first call only).
        """
        stats: dict[str, _RowStats | _GroupedStats] = {
            name: _GroupedStats() if _is_grouped(m) else _RowStats(self.max_rows, self._generator())
            for name, m in targets.items()
        }
        mask: list[torch.Tensor | None] = [None]  # attention mask of the text batch in flight
        seen: set[str] = set()  # targets recorded in the batch in flight

        def make_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
            def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
                if name in seen:
                    return
                if not args or not isinstance(args[0], torch.Tensor):
                    raise LowbitError(f"module {name!r} got no tensor input during calibration")
                x = args[0]
                m = mask[0]
                if m is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(m.shape):
                    x = x[m.bool()]  # [B, T, K] -> [real tokens, K]: padding carries no signal
                stats[name].add(grouped_input_rows(mod, x) if _is_grouped(mod) else input_rows(mod, x))
                seen.add(name)
                if len(seen) == len(targets):
                    raise _Captured

            return hook

        was_training = self.model.training
        self.model.eval()
        handles = [m.register_forward_pre_hook(make_hook(name)) for name, m in targets.items()]
        try:
            for kind, forward, batches in self._paths(tower):
                for batch in batches:
                    mask[0] = batch.get("attention_mask") if kind == "text" else None
                    seen.clear()
                    try:
                        forward(batch)
                    except _Captured:
                        pass
        finally:
            for handle in handles:
                handle.remove()
            self.model.train(was_training)
        return stats

    def _context(self, tower: str, module_name: str, module: nn.Module,
                 stats: _RowStats | _GroupedStats) -> QuantContext:
        kind = module_kind(module)
        if stats.gram is None or stats.abs_sum is None:
            # A layer the encode paths never run (e.g. an unused pooler) cannot matter for the embeddings;
            # say so and let the method fall back to its calibration-free grid instead of failing the model.
            warnings.warn(
                f"module {module_name!r} of tower {tower!r} saw no input while running the calibration data; "
                "it is quantized without calibration statistics", CalibrationWarning, stacklevel=3,
            )
            return QuantContext(tower=tower, name=module_name, kind=kind, extra={"n_rows": 0})
        hessian = stats.gram * (2.0 / stats.n_rows)  # H = 2/S XᵀX as in GPTQ ([G, Kg, Kg] when grouped)
        act_abs_mean = (stats.abs_sum / stats.n_rows).to(torch.float32)  # [K] ([G, Kg] when grouped)
        if isinstance(stats, _GroupedStats):
            # No single [K, K] Hessian exists: methods that handle grouped layers read the per-group ones.
            return QuantContext(tower=tower, name=module_name, kind=kind, extra={
                "group_hessians": hessian, "act_abs_mean": act_abs_mean, "n_rows": stats.n_rows})
        return QuantContext(
            inputs=stats.rows, hessian=hessian, tower=tower, name=module_name, kind=kind,
            extra={"act_abs_mean": act_abs_mean, "act_abs_max": stats.abs_max, "n_rows": stats.n_rows},
        )


class ModuleCalibrator(ActivationCalibrator):
    """Calibration of any ``nn.Module`` (``quantize_``'s single tower ``model``): its layers' inputs captured
    while ``model`` runs on example inputs, each a tensor (``model(x)``), a tuple (``model(*x)``) or a mapping
    (``model(**x)``; an ``attention_mask`` of the same [B, T] as a layer's input leaves the padding out).

    Example:
        >>> calib = ModuleCalibrator(cnn, [torch.randn(8, 3, 32, 32)])  # doctest: +SKIP
        >>> quantize_(cnn, "*=w4:gptq", calibration=calib)  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, inputs: Sequence[Any], max_rows: int = 4096, seed: int = 0,
                 sequential: str = "layer", tower: str = "model") -> None:
        if not len(inputs):
            raise LowbitError("calibration needs at least one example input; received none")
        # the base class wants images or texts: one placeholder text, never tokenized (_paths is overridden)
        super().__init__(model, None, ["-"], max_rows=max_rows, seed=seed, sequential=sequential)  # type: ignore[arg-type]
        self.inputs = list(inputs)
        self.tower = tower

    def towers(self) -> dict[str, nn.Module]:
        return {self.tower: self.model}

    def _paths(self, tower: str) -> list[tuple[str, Callable[[Any], Any], list[Any]]]:
        return [("text", self._call, [b if isinstance(b, dict) else {"args": b} for b in self.inputs])]

    def _call(self, batch: dict[str, Any]) -> Any:
        if set(batch) == {"args"}:
            args = batch["args"]
            return self.model(*args) if isinstance(args, (tuple, list)) else self.model(args)
        return self.model(**batch)


class TokenCalibrator(ActivationCalibrator):
    """Calibration of a language model on token windows (``encode_text`` of right-padded batches): texts cut to
    windows, chat conversations, or sequences the model sampled itself (``lowbit.models.causal_lm``)."""

    def __init__(self, model: DualEncoder, windows: Sequence[torch.Tensor], batch_size: int = 8,
                 max_rows: int = 4096, seed: int = 0, sequential: str = "block") -> None:
        if not len(windows):
            raise LowbitError("calibration needs at least one token window; received none")
        # placeholder texts (one per window): the batches are given already tokenized, so they are never tokenized
        super().__init__(model, None, [""] * len(windows), batch_size=batch_size, max_rows=max_rows, seed=seed,
                         sequential=sequential)
        self._tokens = [_right_padded(windows[i:i + batch_size]) for i in range(0, len(windows), batch_size)]


def _right_padded(windows: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    longest = max(int(w.numel()) for w in windows)
    ids = torch.zeros(len(windows), longest, dtype=torch.long)
    mask = torch.zeros(len(windows), longest, dtype=torch.long)
    for i, w in enumerate(windows):
        ids[i, : w.numel()], mask[i, : w.numel()] = w, 1
    return {"input_ids": ids, "attention_mask": mask}


def _is_grouped(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1


def calibration_texts(captions: Sequence[str] | None, classnames: Sequence[str] | None,
                      templates: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """Up to ``n`` distinct calibration texts: the captions first, topped up with templates × classnames.

    Repeated captions add no information to XᵀX (datasets with templated captions, like Fashion-MNIST's,
    have one caption per class), so duplicates are dropped and the prompt templates (shuffled with
    ``seed``) fill the rest.
    """
    texts = list(dict.fromkeys(captions or []))[:n]
    if len(texts) < n and classnames:
        prompts = [p for p in dict.fromkeys(t.format(c) for c in classnames for t in templates) if p not in texts]
        random.Random(seed).shuffle(prompts)
        texts += prompts[: n - len(texts)]
    return texts


def calibration_from_dataset(
    model: DualEncoder,
    dataset_spec: str = "fashion-mnist",
    n_samples: int = DEFAULT_CALIB_SAMPLES,
    split: str = "train",
    seed: int = 0,
    batch_size: int = 32,
    max_rows: int = 4096,
    sequential: str = "block",
) -> ActivationCalibrator:
    """An :class:`ActivationCalibrator` over the first ``n_samples`` images (and captions) of a dataset.

    ``sequential`` defaults to ``"block"`` (GPTQ's own order: each block sees the quantized earlier blocks;
    one forward per block instead of one per layer keeps GPTQ of the whole default model to minutes).
    """
    from lowbit.data import resolve_dataset

    if n_samples < 1:
        raise LowbitError(f"calibration n_samples must be >= 1, got {n_samples}")
    data = resolve_dataset(dataset_spec, split=split, limit=n_samples)
    texts = calibration_texts(data.captions, data.classnames, data.templates, n_samples, seed)
    return ActivationCalibrator(model, data.images, texts, batch_size=batch_size, max_rows=max_rows, seed=seed,
                                sequential=sequential)
