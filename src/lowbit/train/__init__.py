"""Training: the shared loop (``train``, ``TrainConfig``), contrastive/distillation losses, data-parallel helpers,
model presets and the ``lowbit train clip`` command.

Importing ``lowbit`` never imports this package; it is only loaded by training code and the CLI verbs.

Example:
    >>> from lowbit.train import TrainConfig, index_batches, train  # doctest: +SKIP
    >>> batches = index_batches(n, 64, seed=0, collate=collate)  # doctest: +SKIP
    >>> state = train(model, loss_fn, batches, TrainConfig(steps=100))  # doctest: +SKIP
"""

from lowbit.train.loop import TrainConfig, TrainState, lr_at, train, unwrap
from lowbit.train.losses import clip_loss, distill_kl_loss, embedding_cosine_loss, siglip_loss
from lowbit.train.patch_dropout import enable_patch_dropout
from lowbit.train.sampling import index_batches, step_indices

__all__ = [
    "TrainConfig",
    "TrainState",
    "clip_loss",
    "distill_kl_loss",
    "embedding_cosine_loss",
    "enable_patch_dropout",
    "index_batches",
    "lr_at",
    "siglip_loss",
    "step_indices",
    "train",
    "unwrap",
]
