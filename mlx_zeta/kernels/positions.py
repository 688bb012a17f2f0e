r"""Position-bias math shared by the kernels and the blocks: T5's relative-position buckets and
:class:`PositionBias`, an additive attention bias given by :math:`O(L)` data.

It lives in the kernel layer because :func:`~mlx_zeta.kernels.fused_attention` computes these
biases inside its kernels; :class:`~mlx_zeta.nn.RelativePositionBias`,
:class:`~mlx_zeta.nn.AlibiPositionalBias` and the struct layers import it from here.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import mlx.core as mx

__all__ = ["relative_position_bucket", "t5_relative_buckets", "PositionBias"]


def relative_position_bucket(relative_position: mx.array, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128) -> mx.array:
    r"""T5's bucket (int32) of each key-minus-query offset :math:`r = j - i`.

    With ``bidirectional``, half of the buckets hold :math:`r > 0`. Inside a half of :math:`N`
    buckets, distances :math:`n = |r|` below :math:`N/2` get a bucket each; larger ones share
    log-spaced buckets up to ``max_distance`` (the last bucket beyond):
    :math:`N/2 + \lfloor \log(n / (N/2)) / \log(d_{max} / (N/2)) \cdot (N - N/2) \rfloor`.
    Without ``bidirectional``, only :math:`r \le 0` (keys in the past) are distinguished.
    """
    n = -relative_position.astype(mx.int32)
    ret = mx.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        ret = ret + (n < 0).astype(mx.int32) * num_buckets
        n = mx.abs(n)
    else:
        n = mx.maximum(n, 0)
    max_exact = num_buckets // 2
    # Clamp keeps log() finite where the exact branch is taken anyway.
    n_large = mx.maximum(n, max_exact).astype(mx.float32)
    scaled = mx.log(n_large / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    val_if_large = mx.minimum(max_exact + scaled.astype(mx.int32), num_buckets - 1)
    return ret + mx.where(n < max_exact, n, val_if_large)


def t5_relative_buckets(q_len: int, k_len: int, *, bidirectional: bool = True, num_buckets: int = 32,
                        max_distance: int = 128, step: int = 0) -> mx.array:
    """T5 buckets for :func:`~mlx_zeta.kernels.fused_attention`: an int32 array of length
    ``q_len + k_len - 1`` whose entry ``n`` is the bucket of the key-minus-query offset
    ``j - i = n - (q_len - 1)`` for queries at positions ``step + i``, so
    ``t5_table[buckets[j - i + q_len - 1], h]`` equals
    :meth:`~mlx_zeta.nn.RelativePositionBias.compute_bias` ``(q_len, k_len, step)``."""
    rel = mx.arange(-(q_len - 1), k_len, dtype=mx.int32) - step
    return relative_position_bucket(rel, bidirectional, num_buckets, max_distance).astype(mx.int32)


class PositionBias(NamedTuple):
    r"""An additive attention-score bias given by :math:`O(L)` data instead of an
    :math:`(L_q, L_k)` array, so the fused kernels (:mod:`mlx_zeta.kernels.attention`) compute
    it in place; :meth:`materialize` builds the array where no kernel runs. With
    :math:`i' = i + L_k - L_q` (queries aligned to the end of the keys):

    .. math::

        B_{hij} = -m_h\,|j - i'| \ \ (\text{ALiBi}) \;+\; T_{\beta[j - i + L_q - 1],\, h} \ \ (\text{T5})

    Fields: ``alibi_slopes`` :math:`m` (H,) (zero for heads without ALiBi), ``t5_table``
    :math:`T` (num_buckets, H) and ``t5_buckets`` :math:`\beta` (L_q + L_k - 1,) int32 (see
    :func:`t5_relative_buckets`). Either part may be None.
    """

    alibi_slopes: Optional[mx.array] = None
    t5_table: Optional[mx.array] = None
    t5_buckets: Optional[mx.array] = None

    def materialize(self, q_len: int, k_len: int) -> Optional[mx.array]:
        """The bias as an array of shape (H, q_len, k_len), or None when empty; equal to
        :class:`~mlx_zeta.nn.AlibiPositionalBias` (float32) / :meth:`~mlx_zeta.nn.RelativePositionBias.compute_bias`
        (the table's dtype), and float32 when both are given."""
        q_pos = mx.arange(q_len)[:, None] + (k_len - q_len)  # i'
        k_pos = mx.arange(k_len)[None, :]
        bias = None
        if self.alibi_slopes is not None:
            dist = mx.abs(k_pos - q_pos).astype(mx.float32)
            bias = -self.alibi_slopes.astype(mx.float32)[:, None, None] * dist
        if self.t5_table is not None:
            offsets = k_pos - mx.arange(q_len)[:, None] + (q_len - 1)  # (q_len, k_len) into t5_buckets
            buckets = mx.stop_gradient(self.t5_buckets)  # integer indices: no gradient (e.g. under mx.checkpoint)
            t5 = self.t5_table[buckets[offsets]].transpose(2, 0, 1)
            bias = t5 if bias is None else bias + t5
        return bias
