"""A plain PyTorch training loop, the reference for mlx_zeta.training.Trainer.

Stated independently here:
- Loss: next-token cross-entropy, mean over every target position: the model sees
  tokens[:, :-1] and predicts tokens[:, 1:].
- One step: zero the gradients, average the gradients of the micro-batches, clip the
  global L2 norm to ``max_grad_norm`` (torch.nn.utils.clip_grad_norm_: scale by
  c / (norm + 1e-6) when that is below 1), set the learning rate of the step from
  ``lr_fn(step)`` (step counted from 0), then ``optimizer.step()``.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, List, Optional

import torch
import torch.nn.functional as F


def next_token_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])  # (b, n - 1, vocab)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def warmup_cosine_ref(peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> Callable[[int], float]:
    """Learning rate of step s: peak * s / W while s < W, then a half cosine from peak to min_lr."""
    def lr(s: int) -> float:
        if s < warmup_steps:
            return peak_lr * s / warmup_steps
        t = min(s - warmup_steps, total_steps - warmup_steps) / (total_steps - warmup_steps)
        return min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * t))
    return lr


def train_reference(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: Iterable[List[torch.Tensor]],
                    max_grad_norm: Optional[float] = None, lr_fn: Optional[Callable[[int], float]] = None) -> List[float]:
    """Run one optimizer step per list of micro-batches in ``steps``; returns the mean losses."""
    losses = []
    model.train()
    for step, micro in enumerate(steps):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for tokens in micro:
            loss = next_token_loss(model, tokens) / len(micro)
            loss.backward()
            total += loss.item()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        if lr_fn is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_fn(step)
        optimizer.step()
        losses.append(total)
    return losses
