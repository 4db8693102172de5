"""Block-wise reconstruction of a ``prepare_qat``-ed model (Block-AP of EfficientQAT).

Chen, Shao, Zhang, Luo, Liu (2024), "EfficientQAT: Efficient Quantization-Aware Training for Large Language
Models", arXiv:2407.11062. Stage one, Block-AP, trains each block's latent weights and quantizer steps (and,
here, optionally the block's float parameters: norm affines, biases) to reproduce the float block's output,
one block at a time, on block inputs cached once from calibration data; no backpropagation through the whole
network, so on a CPU it costs a few passes over the calibration set. Stage two (E2E-QP: only the steps,
end to end, with distillation) is ``lowbit.train.qat`` with ``train="scales"``.

For block i the student input is the output of the already-reconstructed student blocks 0..i-1 and the
target is the float teacher's block output on the float chain, so each block also learns to undo the error
it receives (errors do not compound unseen). The loss is the MSE normalised by the target's mean square.

The LAST block of a tower is reconstructed through the rest of the model, up to the L2-normalised
embedding (the ``embedding_tails`` of the family's spec, ``lowbit.models.spec``: e.g. pooling + the projector
head): the error that matters is the embedding's direction, and a projector over standardised features weighs
feature channels very differently from an MSE on the raw feature map. The tail's own parameters (the
projector, quantized or not) train with the block. ``BlockAPConfig.tail=False`` keeps the plain feature-map target.

Which modules are blocks is the ``block_chains`` of the family's spec (``lowbit.models.spec.BLOCK_CHAINS``, per
tower class): e.g. EfficientNet-Lite0 (its MBConv blocks, then the head conv + BN + activation), a Hugging Face
encoder (its transformer layers), and any ``nn.Sequential`` (its children). Blocks must be chained: block i's
first positional input is block i-1's output; other arguments (attention masks, ...) are captured per batch
from the model's own forward.

Example:
    >>> prepare_qat(student, "vision=w1.58,text=w1.58")  # doctest: +SKIP
    >>> report = block_ap_(student, teacher, {"vision": pixel_batches, "text": token_batches})  # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.base import DualEncoder
from lowbit.models.spec import embedding_tail, tower_blocks
from lowbit.quant.qat import QATLayer


class _WithTail(nn.Module):
    """A block followed by its embedding tail (called with the block's own arguments)."""

    def __init__(self, block: nn.Module, tail: nn.Module) -> None:
        super().__init__()
        self.block, self.tail = block, tail

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.tail(_run(self.block, x, (args, kwargs)))


# --- configuration and report -------------------------------------------------------------------------------------
@dataclass
class BlockAPConfig:
    """Block-AP hyper-parameters. ``steps`` Adam steps per block (one cached batch each, cycling through
    reshuffled passes), cosine-decayed rates: ``lr`` latent weights, ``scale_lr`` quantizer steps,
    ``float_lr`` the block's float parameters (0: frozen); ``match_norms`` see ``match_norm_statistics``;
    ``tail``: reconstruct the last block through its embedding tail (module docstring)."""

    steps: int = 100
    lr: float = 1e-4
    scale_lr: float = 1e-3
    float_lr: float = 1e-3
    match_norms: bool = True
    tail: bool = True
    seed: int = 0

    def validate(self) -> None:
        if self.steps < 0:
            raise LowbitError(f"block reconstruction steps must be >= 0; received {self.steps}")
        for name in ("lr", "scale_lr", "float_lr"):
            if getattr(self, name) < 0:
                raise LowbitError(f"block reconstruction {name} must be >= 0; received {getattr(self, name)}")


@dataclass
class BlockResult:
    """One block: relative output error (MSE / target mean square) on the calibration set at the PTQ start,
    after matching norm statistics, and after training."""

    tower: str
    index: int
    quant_layers: int
    error_start: float
    error_before: float
    error_after: float
    seconds: float


@dataclass
class BlockAPReport:
    blocks: list[BlockResult] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": round(self.seconds, 1), "blocks": [asdict(b) for b in self.blocks]}


# --- capture ----------------------------------------------------------------------------------------------------
class _Stop(Exception):
    """Raised by the capture hook once every block's arguments are recorded."""


Extras = tuple[tuple[Any, ...], dict[str, Any]]


def _encode(model: DualEncoder, tower: str, inputs: Any) -> None:
    if tower == "vision":
        model.encode_image(inputs)
    elif tower == "text":
        model.encode_text(inputs)
    else:
        raise LowbitError(f"block reconstruction runs the vision or text tower; received {tower!r}")


@torch.no_grad()
def capture(model: DualEncoder, tower: str, blocks: Sequence[nn.Module], inputs: Any) -> tuple[torch.Tensor,
                                                                                              list[Extras]]:
    """Run ``model`` on one batch: block 0's first input, and every block's other arguments (per block)."""
    extras: list[Extras] = [((), {}) for _ in blocks]
    first: list[torch.Tensor] = []
    called = [False] * len(blocks)

    def hook(i: int) -> Callable[..., None]:
        def pre(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if i == 0:
                first.append(args[0].detach())
            extras[i] = (tuple(args[1:]), dict(kwargs))
            called[i] = True
            if all(called[j] for j in range(len(blocks)) if _is_called_by_forward(blocks[j])):
                raise _Stop

        return pre

    handles = [b.register_forward_pre_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)
               if _is_called_by_forward(b)]
    try:
        _encode(model, tower, inputs)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if not first:
        raise LowbitError(f"the {tower} tower's first block never ran; is the block chain right for this model?")
    return first[0], extras


def _is_called_by_forward(block: nn.Module) -> bool:
    return not getattr(block, "assembled", False)


def _run(block: nn.Module, x: torch.Tensor, extra: Extras) -> torch.Tensor:
    out = block(x, *extra[0], **extra[1])
    return out[0] if isinstance(out, tuple) else out


# --- reconstruction -----------------------------------------------------------------------------------------------
def _block_params(block: nn.Module, cfg: BlockAPConfig) -> list[dict[str, Any]]:
    weights, steps, floats = [], [], []
    quant_ids: set[int] = set()
    for m in block.modules():
        if isinstance(m, QATLayer):
            weights.append(m.module.weight)
            steps.extend(m.quantizer.parameters())
            # Only the latent weight and the steps are the quantizer's: the wrapped layer's bias stays a float
            # parameter of the block (trained with ``float_lr`` like norms).
            quant_ids.update(id(p) for p in (m.module.weight, *m.quantizer.parameters()))
    if cfg.float_lr > 0:
        floats = [p for p in block.parameters() if id(p) not in quant_ids and p.is_floating_point()]
    groups = [{"params": ps, "lr": lr} for ps, lr in ((weights, cfg.lr), (steps, cfg.scale_lr), (floats, cfg.float_lr))
              if ps and lr > 0]
    return groups


def _rel_error(block: nn.Module, xs: list[torch.Tensor], extras: list[list[Extras]], i: int,
               targets: list[torch.Tensor], norms: list[float]) -> float:
    with torch.no_grad():
        num = sum(float((_run(block, x, e[i]) - t).pow(2).mean()) for x, e, t in zip(xs, extras, targets, strict=True))
    return num / max(sum(norms), 1e-30)


def _moments(block: nn.Module, norm: nn.Module, xs: list[torch.Tensor], extras: list[list[Extras]],
             index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of ``norm``'s input [C] over every calibration batch through ``block``."""
    acc: list[torch.Tensor] = []

    def hook(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach().transpose(0, 1).reshape(args[0].shape[1], -1)  # [B, C, H, W] -> [C, B*H*W]
        acc.append(torch.stack([x.sum(1), x.pow(2).sum(1), torch.full_like(x[:, 0], x.shape[1])]))

    handle = norm.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for x, e in zip(xs, extras, strict=True):
                _run(block, x, e[index])
    finally:
        handle.remove()
    s, sq, n = torch.stack(acc).sum(0)  # [3, C]
    mean = s / n
    return mean, (sq / n - mean.pow(2)).clamp_min(0).sqrt()


@torch.no_grad()
def match_norm_statistics(student: nn.Module, teacher: nn.Module, xs: list[torch.Tensor], fp: list[torch.Tensor],
                          s_extras: list[list[Extras]], t_extras: list[list[Extras]], index: int) -> int:
    """Re-estimate the batch norms of a student block so each normalises its (quantized) input the way the
    teacher's normalises the float input: the first two moments per channel match on the calibration data.

    With pre-norm moments (m_t, s_t) in the teacher and (m_s, s_s) in the student, the student's running
    statistics become var' = var_t (s_s / s_t)^2 and mean' = m_s - (m_t - mean_t) s_s / s_t — bias
    correction for the output shift quantization causes (the mean of a ReLU input times the weight error),
    which batch norm's division by a small running std would otherwise amplify. In order, one norm at a
    time, since correcting one changes the inputs of the next. Returns how many norms were matched.
    """
    s_norms = [m for m in student.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    t_norms = [m for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for sn, tn in zip(s_norms, t_norms, strict=True):
        m_s, s_s = _moments(student, sn, xs, s_extras, index)
        m_t, s_t = _moments(teacher, tn, fp, t_extras, index)
        ratio = s_s / s_t.clamp_min(1e-8)
        sn.running_var.copy_(tn.running_var * ratio.pow(2))
        sn.running_mean.copy_(m_s - (m_t - tn.running_mean) * ratio)
    return len(s_norms)


def reconstruct_block(block: nn.Module, xs: list[torch.Tensor], extras: list[list[Extras]], index: int,
                      targets: list[torch.Tensor], cfg: BlockAPConfig) -> tuple[float, float]:
    """Train ``block`` (its QAT and, with ``float_lr``, float parameters) so ``block(xs[b]) ≈ targets[b]``.

    Returns the relative output error (sum of MSEs / sum of target mean squares) before and after.
    """
    norms = [float(t.pow(2).mean()) for t in targets]
    before = _rel_error(block, xs, extras, index, targets, norms)
    groups = _block_params(block, cfg)
    if not groups or cfg.steps == 0:
        return before, before
    params = [p for g in groups for p in g["params"]]
    saved = {id(p): p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(groups)
    base = [g["lr"] for g in optimizer.param_groups]
    gen = torch.Generator().manual_seed(cfg.seed + index)
    order: list[int] = []
    try:
        for step in range(cfg.steps):
            if not order:
                order = torch.randperm(len(xs), generator=gen).tolist()
            b = order.pop()
            for g, lr in zip(optimizer.param_groups, base, strict=True):
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
            loss = (_run(block, xs[b], extras[b][index]) - targets[b]).pow(2).mean() / max(norms[b], 1e-30)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        for p in block.parameters():
            p.requires_grad_(saved[id(p)])
    return before, _rel_error(block, xs, extras, index, targets, norms)


def block_ap_tower(student: DualEncoder, teacher: DualEncoder, tower: str, batches: Sequence[Any],
                   cfg: BlockAPConfig, log: Callable[[str], None] | None = None) -> list[BlockResult]:
    """Block-AP of one tower over calibration ``batches`` (what ``encode_image``/``encode_text`` take)."""
    s_blocks = tower_blocks(student.towers()[tower])
    t_blocks = tower_blocks(teacher.towers()[tower])
    if len(s_blocks) != len(t_blocks):
        raise LowbitError(f"student and teacher {tower} towers have {len(s_blocks)} vs {len(t_blocks)} blocks")
    s_caps = [capture(student, tower, s_blocks, b) for b in batches]
    t_caps = [capture(teacher, tower, t_blocks, b) for b in batches]
    xs = [c[0] for c in s_caps]  # student chain inputs of the current block
    fp = [c[0] for c in t_caps]  # float chain inputs of the current block
    s_extras = [c[1] for c in s_caps]
    t_extras = [c[1] for c in t_caps]
    if cfg.tail:
        s_tail, t_tail = embedding_tail(student, tower), embedding_tail(teacher, tower)
        if s_tail is not None and t_tail is not None:
            s_blocks[-1], t_blocks[-1] = _WithTail(s_blocks[-1], s_tail), _WithTail(t_blocks[-1], t_tail)
    results: list[BlockResult] = []
    for i, (sb, tb) in enumerate(zip(s_blocks, t_blocks, strict=True)):
        t0 = time.perf_counter()
        with torch.no_grad():
            targets = [_run(tb, x, e[i]) for x, e in zip(fp, t_extras, strict=True)]
        n_quant = sum(isinstance(m, QATLayer) for m in sb.modules())
        start = _rel_error(sb, xs, s_extras, i, targets, [float(t.pow(2).mean()) for t in targets])
        if cfg.match_norms and n_quant:
            match_norm_statistics(sb, tb, xs, fp, s_extras, t_extras, i)
        before, after = reconstruct_block(sb, xs, s_extras, i, targets, cfg)
        with torch.no_grad():
            xs = [_run(sb, x, e[i]) for x, e in zip(xs, s_extras, strict=True)]
        fp = targets
        results.append(BlockResult(tower, i, n_quant, start, before, after, time.perf_counter() - t0))
        if log is not None:
            log(f"block-ap {tower}[{i}] {n_quant} quant layers: rel. error {start:.4f} -> {before:.4f} (norms) "
                f"-> {after:.4f} "
                f"({results[-1].seconds:.1f}s)")
    return results


def block_ap_(student: DualEncoder, teacher: DualEncoder, calibration: dict[str, Sequence[Any]],
              config: BlockAPConfig | dict[str, BlockAPConfig] | None = None,
              log: Callable[[str], None] | None = None) -> BlockAPReport:
    """Block-AP of every tower in ``calibration`` (``{"vision": [pixels, ...], "text": [tokens, ...]}``), in place.

    ``student`` must be ``prepare_qat``-ed; ``teacher`` is the float model (not modified). Both run in eval
    mode (batch-norm statistics frozen by autograd; ``match_norms`` re-estimates them explicitly). ``config``
    is one for all towers or one per tower. Deterministic given the seed.
    """
    configs = config if isinstance(config, dict) else {t: config or BlockAPConfig() for t in calibration}
    for tower in calibration:
        if tower not in configs:
            raise LowbitError(f"no block reconstruction config for tower {tower!r}; received {sorted(configs)}")
        configs[tower].validate()
    t0 = time.perf_counter()
    student.eval()
    teacher.eval()
    report = BlockAPReport()
    for tower, batches in calibration.items():
        if batches:
            report.blocks.extend(block_ap_tower(student, teacher, tower, batches, configs[tower], log))
    report.seconds = time.perf_counter() - t0
    return report
