"""Training utilities: the :class:`Trainer` loop, learning-rate schedules, mixed
precision, atomic checkpoints, data-parallel helpers and low-rank adapters (LoRA, DoRA)."""

from mlx_zeta.training.mixed_precision import DynamicLossScaler
from mlx_zeta.training.schedules import warmup_cosine
from mlx_zeta.training.trainer import Trainer
from mlx_zeta.training.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from mlx_zeta.training.adapters import (DoRALinear, LoRALinear, adapter_parameters, apply_adapters, dense_weight,
                                       fuse_adapters, load_adapters, save_adapters)
from mlx_zeta.training.distributed import average_gradients, is_main_process, shard_batch, sync_parameters, world

__all__ = ["Trainer", "warmup_cosine", "DynamicLossScaler", "save_checkpoint", "load_checkpoint", "world",
           "average_gradients", "is_main_process", "latest_checkpoint", "CheckpointError", "shard_batch",
           "sync_parameters", "LoRALinear", "DoRALinear", "dense_weight", "apply_adapters", "adapter_parameters",
           "fuse_adapters", "save_adapters", "load_adapters"]
