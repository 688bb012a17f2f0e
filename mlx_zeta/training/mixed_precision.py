r"""Mixed-precision helpers for :class:`~mlx_zeta.training.Trainer`: low-precision
copies of float32 master weights and dynamic loss scaling for float16.

The scheme (Micikevicius et al., "Mixed Precision Training", https://arxiv.org/abs/1710.03740):
the model keeps float32 *master* weights and the optimizer keeps float32 state. Each
micro-batch casts a copy of the trainable weights to the compute dtype, runs forward and
backward in it (the gradients are those of the low-precision copy), and casts the
gradients back to float32 before they are averaged, clipped and applied to the masters.

Trade-offs:

- bfloat16 has float32's exponent range, so gradients neither overflow nor underflow
  more than in float32 and no loss scaling is needed; its 8-bit mantissa (eps 2^-8)
  makes each activation and gradient ~2-3 significant digits, so losses differ from a
  float32 run by about 1e-2 relative and trajectories diverge slowly.
- float16 has a 11-bit mantissa (closer to float32) but a narrow range (max 65504,
  smallest normal 6e-5): small gradients flush to zero unless the loss is multiplied
  by a scale :math:`S` before the backward pass and the gradients divided by :math:`S`
  afterwards. :class:`DynamicLossScaler` halves :math:`S` and skips the update when a
  gradient is not finite, and doubles it after ``growth_interval`` good steps. The
  finiteness check reads one value back per step (a synchronisation).
- Memory: the master copy stays, so weights cost 4 + 2 bytes per parameter during a
  step instead of 4; the saving is in the activations kept for the backward pass.
  Updates smaller than a bfloat16 ulp of the weight are not lost, since they land on
  the float32 masters.
- On MLX's CPU backend bfloat16/float16 matmuls are not faster than float32 (they
  may be slower); the gain is on GPUs (Metal, CUDA).
"""

from typing import Any

import mlx.core as mx
from mlx.utils import tree_map, tree_reduce

__all__ = ["cast_floating", "all_finite", "DynamicLossScaler", "COMPUTE_DTYPES"]

COMPUTE_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def cast_floating(tree: Any, dtype: mx.Dtype) -> Any:
    """The tree with every floating array cast to ``dtype`` (others unchanged)."""
    return tree_map(lambda a: a.astype(dtype) if isinstance(a, mx.array) and mx.issubdtype(a.dtype, mx.floating)
                    else a, tree)


def all_finite(tree: Any) -> mx.array:
    """Scalar bool array: every element of every array of the tree is finite."""
    return tree_reduce(lambda acc, a: mx.logical_and(acc, mx.isfinite(a).all()), tree, mx.array(True))


class DynamicLossScaler:
    r"""Loss scale for float16 training: :math:`S \leftarrow S / 2` (and skip the update) on a
    non-finite gradient, :math:`S \leftarrow 2S` after ``growth_interval`` finite steps in a row.

    Args:
        init_scale (float): starting scale. Default: ``2**15``.
        growth_interval (int): finite steps before the scale doubles. Default: ``2000``.
        min_scale (float): the scale never drops below this. Default: ``1.0``.
    """

    def __init__(self, init_scale: float = 2.0 ** 15, growth_interval: int = 2000, min_scale: float = 1.0):
        if init_scale <= 0 or min_scale <= 0 or growth_interval < 1:
            raise ValueError(f"[DynamicLossScaler] expected positive scales and growth_interval >= 1, got "
                             f"init_scale={init_scale}, min_scale={min_scale}, growth_interval={growth_interval}")
        self.scale, self.growth_interval, self.min_scale = float(init_scale), growth_interval, float(min_scale)
        self.good_steps = 0

    def update(self, finite: bool) -> bool:
        """Record one step's finiteness; returns whether its update should be applied."""
        if not finite:
            self.scale = max(self.scale / 2, self.min_scale)
            self.good_steps = 0
            return False
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale *= 2
            self.good_steps = 0
        return True

    def state_dict(self) -> dict:
        return dict(scale=self.scale, good_steps=self.good_steps)

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
