"""Training utilities: the :class:`Trainer` loop, learning-rate schedules, mixed
precision, atomic checkpoints and data-parallel helpers."""

from mlx_zeta.training.mixed_precision import DynamicLossScaler
from mlx_zeta.training.schedules import warmup_cosine
from mlx_zeta.training.trainer import Trainer
from mlx_zeta.training.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from mlx_zeta.training.distributed import average_gradients, is_main_process, shard_batch, sync_parameters, world

__all__ = ["Trainer", "warmup_cosine", "DynamicLossScaler", "save_checkpoint", "load_checkpoint", "world",
           "average_gradients", "is_main_process", "latest_checkpoint", "CheckpointError", "shard_batch",
           "sync_parameters"]
