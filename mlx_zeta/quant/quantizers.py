"""The BitNet b1.58 quantizers: per-tensor absmean ternarization of weights and per-token
absmax int8 quantization of activations. Shared by the training layer
(:class:`~mlx_zeta.quant.BitLinear`) and the packed inference layer
(:class:`~mlx_zeta.quant.TernaryLinear`), which import them from here."""

from typing import Tuple

import mlx.core as mx

__all__ = ["absmean_scale", "ternarize", "absmax_scale", "quantize_activations", "QMAX", "QMIN"]

QMAX = 127  # int8 activations are clipped to [-128, 127]; the absmax maps to +-127
QMIN = -128


def absmean_scale(w: mx.array, eps: float = 1e-5) -> mx.array:
    r"""Per-tensor weight scale :math:`s_w = 1 / \max(\operatorname{mean}|W|, \epsilon)` (float32 scalar).

    BitNet b1.58 (Ma et al., 2024, eq. 1-3; "training tips, code and FAQ", 2024):
    weights are divided by their mean absolute value before rounding to {-1, 0, 1}.
    Example: ``[-1.23, 0.12, 4.56, 2.3, -5.34]`` has mean :math:`|w| = 2.71`, so
    :math:`s_w = 0.36900369`.
    """
    return 1.0 / mx.maximum(mx.mean(mx.abs(w.astype(mx.float32))), eps)


def ternarize(w: mx.array, eps: float = 1e-5) -> Tuple[mx.array, mx.array]:
    r"""Round-clip :math:`W s_w` to {-1, 0, 1}: returns ``(q int8, s_w float32 scalar)``.

    .. math:: Q = \operatorname{clip}(\operatorname{round}(W s_w), -1, 1), \qquad W \approx Q / s_w

    Rounding is half-to-even, as ``torch.round`` and ``mx.round``.
    """
    scale = absmean_scale(w, eps)
    q = mx.clip(mx.round(w.astype(mx.float32) * scale), -1, 1)
    return q.astype(mx.int8), scale


def absmax_scale(x: mx.array, eps: float = 1e-5) -> mx.array:
    r"""Per-token activation scale :math:`s_x = 127 / \max(\max_j |x_j|, \epsilon)` over the last
    axis, float32, shape ``(*, 1)``."""
    return QMAX / mx.maximum(mx.max(mx.abs(x.astype(mx.float32)), axis=-1, keepdims=True), eps)


def quantize_activations(x: mx.array, eps: float = 1e-5) -> Tuple[mx.array, mx.array]:
    r"""Per-token int8 absmax quantization: returns ``(q int8, s_x float32 of shape (*, 1))``.

    .. math:: Q_x = \operatorname{clip}(\operatorname{round}(x s_x), -128, 127), \qquad x \approx Q_x / s_x
    """
    scale = absmax_scale(x, eps)
    q = mx.clip(mx.round(x.astype(mx.float32) * scale), QMIN, QMAX)
    return q.astype(mx.int8), scale
