"""Learning-rate schedules for :class:`~mlx_zeta.training.Trainer`, composed from
``mlx.optimizers.schedulers``."""

from typing import Callable

import mlx.core as mx
import mlx.optimizers as optim

from mlx_zeta.common import check_int

__all__ = ["warmup_cosine"]


def warmup_cosine(peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> Callable[[mx.array], mx.array]:
    r"""Linear warm-up to ``peak_lr``, then cosine decay to ``min_lr``.

    For the optimizer step :math:`s` (0 for the first update, as MLX's optimizers count),
    with :math:`W` = ``warmup_steps`` and :math:`T` = ``total_steps``:

    .. math::

        \eta(s) = \begin{cases}
            \eta_{\max}\, s / W & s < W \\
            \eta_{\min} + \tfrac{1}{2}(\eta_{\max} - \eta_{\min})
                \big(1 + \cos(\pi \min(s - W, T - W) / (T - W))\big) & s \ge W
        \end{cases}

    so the first update has learning rate 0 when :math:`W > 0` (the convention of MLX's
    ``join_schedules`` example and of Hugging Face's cosine schedule), :math:`\eta(W) =
    \eta_{\max}`, and :math:`\eta(s) = \eta_{\min}` for :math:`s \ge T`. Built as
    ``join_schedules([linear_schedule(0, peak, W), cosine_decay(peak, T - W, min_lr)], [W])``.

    Args:
        peak_lr (float): learning rate at the end of the warm-up.
        warmup_steps (int): steps of linear warm-up, ``>= 0``.
        total_steps (int): step at which the decay reaches ``min_lr``, ``> warmup_steps``.
        min_lr (float): final learning rate. Default: ``0``.

    Example:
        >>> import mlx.optimizers
        >>> from mlx_zeta.training import warmup_cosine
        >>> schedule = warmup_cosine(1e-3, warmup_steps=10, total_steps=100)
        >>> optimizer = mlx.optimizers.AdamW(learning_rate=schedule)
    """
    check_int("warmup_cosine", "warmup_steps", warmup_steps, 0)
    check_int("warmup_cosine", "total_steps", total_steps, warmup_steps + 1)
    if not 0 <= min_lr <= peak_lr:
        raise ValueError(f"[warmup_cosine] expected 0 <= min_lr <= peak_lr, got min_lr={min_lr}, peak_lr={peak_lr}")
    cosine = optim.cosine_decay(peak_lr, total_steps - warmup_steps, end=min_lr)
    if warmup_steps == 0:
        return cosine
    return optim.join_schedules([optim.linear_schedule(0.0, peak_lr, warmup_steps), cosine], [warmup_steps])
