"""Training: the shared loop (``train``, ``TrainConfig``), contrastive/distillation losses, data-parallel helpers,
model presets and the ``lowbit train clip`` command.

Importing ``lowbit`` never imports this package; it is only loaded by training code and the CLI verb.
"""

from lowbit.train.loop import TrainConfig, TrainState, lr_at, train, unwrap
from lowbit.train.sampling import index_batches, step_indices

__all__ = ["TrainConfig", "TrainState", "index_batches", "lr_at", "step_indices", "train", "unwrap"]
