"""Normalisation layers over the last axis: zeta's RMSNorm, SimpleRMSNorm, ScaleNorm, LayerNorm.

Every layer computes its statistics in float32 and casts the result back to the
input's dtype: a float16 sum of squares overflows (65504) once features reach a
few hundred, e.g. 64 features of size 300 sum to 5.8e6.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.common import check_int, check_positive

__all__ = ["RMSNorm", "SimpleRMSNorm", "ScaleNorm", "LayerNorm", "rms_norm"]


def _check_init(cls: str, dim: int, eps: float) -> None:
    check_int(cls, "dim", dim, 1, says="dim must be a positive integer")
    check_positive(cls, "eps", eps, says="eps must be positive")


def _check_input(cls: str, dim: int, x: mx.array) -> None:
    if x.ndim == 0 or x.shape[-1] != dim:
        raise ValueError(f"[{cls}] expected input with last dimension {dim}, got shape {tuple(x.shape)}")


def _unit(x: mx.array, eps: float) -> mx.array:
    """float32 ``x / max(||x||_2, eps)`` over the last axis (safe gradient at x = 0)."""
    x = x.astype(mx.float32)
    sumsq = mx.sum(mx.square(x), axis=-1, keepdims=True)
    return x * mx.rsqrt(mx.maximum(sumsq, eps * eps))


def rms_norm(x: mx.array, gamma: mx.array, eps: float = 1e-12) -> mx.array:
    """:class:`RMSNorm`'s math with the gain ``gamma`` (d,) passed in; shared by the block
    and :func:`mlx_zeta.functional.rms_norm`."""
    y = _unit(x, eps) * (math.sqrt(x.shape[-1]) * gamma.astype(mx.float32))
    return y.astype(x.dtype)


class RMSNorm(nn.Module):
    r"""Root-mean-square normalisation with a learned per-feature gain.

    .. math::

        y = \frac{x}{\max(\lVert x \rVert_2, \epsilon)} \sqrt{d} \odot \gamma
          = \frac{x}{\operatorname{RMS}(x)} \odot \gamma \quad (\lVert x \rVert_2 \ge \epsilon)

    over the last axis of size :math:`d`, with :math:`\gamma` initialised to ones
    (the x-transformers form zeta follows). zeta's ``RMSNorm`` normalised over
    axis ``-2`` and scaled by :math:`d^{-1/2}`; this one normalises the features
    and scales by :math:`\sqrt{d}`, so the output has unit RMS at init.
    Statistics are computed in float32.

    Args:
        dim (int): Feature size :math:`d` of the last axis.
        eps (float, optional): Floor on :math:`\lVert x \rVert_2`. Default: ``1e-12``.

    Shape:
        - Input: :math:`(*, d)`.
        - Output: :math:`(*, d)`, same dtype as the input.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.nn import RMSNorm
        >>> norm = RMSNorm(64)
        >>> norm(mx.random.normal((2, 5, 64))).shape
        (2, 5, 64)

    Reference:
        Zhang & Sennrich, "Root Mean Square Layer Normalization", 2019.
        https://arxiv.org/abs/1910.07467
    """

    def __init__(self, dim: int, eps: float = 1e-12):
        super().__init__()
        _check_init("RMSNorm", dim, eps)
        self.dim = dim
        self.eps = eps
        self.gamma = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        _check_input("RMSNorm", self.dim, x)
        return rms_norm(x, self.gamma, self.eps)


class SimpleRMSNorm(nn.Module):
    r"""Parameter-free RMS normalisation.

    .. math::

        y = \frac{x}{\max(\lVert x \rVert_2, \epsilon)} \sqrt{d}

    over the last axis of size :math:`d`: every row comes out with unit RMS.
    zeta multiplied by :math:`d^{-1/2}` instead of :math:`\sqrt{d}`, leaving an
    RMS of :math:`1/d`; that is fixed here. Statistics are computed in float32.

    Args:
        dim (int): Feature size :math:`d` of the last axis.
        eps (float, optional): Floor on :math:`\lVert x \rVert_2`. Default: ``1e-12``.

    Shape:
        - Input: :math:`(*, d)`.
        - Output: :math:`(*, d)`, same dtype as the input.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.nn import SimpleRMSNorm
        >>> SimpleRMSNorm(2)(mx.array([3.0, 4.0]))  # [3, 4] / 5 * sqrt(2)
        array([0.848528, 1.13137], dtype=float32)

    Reference:
        Zhang & Sennrich, "Root Mean Square Layer Normalization", 2019.
        https://arxiv.org/abs/1910.07467
    """

    def __init__(self, dim: int, eps: float = 1e-12):
        super().__init__()
        _check_init("SimpleRMSNorm", dim, eps)
        self.dim = dim
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        _check_input("SimpleRMSNorm", self.dim, x)
        return (_unit(x, self.eps) * math.sqrt(self.dim)).astype(x.dtype)


class ScaleNorm(nn.Module):
    r"""ScaleNorm: projection onto a sphere whose radius is a single learned scalar.

    .. math::

        y = g \, \frac{x}{\max(\lVert x \rVert_2, \epsilon)}

    over the last axis of size :math:`d`, with the scalar :math:`g` initialised to
    :math:`\sqrt{d}` as in the paper, so the output has unit RMS at init (the
    same output as x-transformers' ScaleNorm). zeta initialised :math:`g` to
    :math:`d^{-1/2}`, which leaves an RMS of :math:`1/d`; that is fixed here.
    Statistics are computed in float32.

    Args:
        dim (int): Feature size :math:`d` of the last axis.
        eps (float, optional): Floor on :math:`\lVert x \rVert_2`. Default: ``1e-5``.

    Shape:
        - Input: :math:`(*, d)`.
        - Output: :math:`(*, d)`, same dtype as the input.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.nn import ScaleNorm
        >>> norm = ScaleNorm(512)
        >>> norm(mx.random.normal((1, 10, 512))).shape
        (1, 10, 512)

    Reference:
        Nguyen & Salazar, "Transformers without Tears: Improving the Normalization
        of Self-Attention", 2019. https://arxiv.org/abs/1910.05895
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        _check_init("ScaleNorm", dim, eps)
        self.dim = dim
        self.eps = eps
        self.g = mx.full((1,), math.sqrt(dim))

    def __call__(self, x: mx.array) -> mx.array:
        _check_input("ScaleNorm", self.dim, x)
        return (_unit(x, self.eps) * self.g.astype(mx.float32)).astype(x.dtype)


class LayerNorm(nn.Module):
    r"""zeta's LayerNorm: centred, variance-normalised, with a learned gain and no bias.

    .. math::

        y = \frac{x - \operatorname{E}[x]}{\sqrt{\operatorname{Var}[x] + \epsilon}} \odot g

    over the last axis (biased variance), :math:`g` initialised to ones.
    :math:`\epsilon` is ``eps`` for float32 inputs and ``fp16_eps`` for float16
    and bfloat16 inputs. With ``stable=True`` each row is first divided by its
    largest magnitude :math:`\max_i |x_i|` (treated as a constant, no gradient),
    which changes only how :math:`\epsilon` weighs against the variance. zeta
    divided by the signed maximum, which flips the output's sign for rows whose
    entries are all negative; the magnitude is used here. Statistics are
    computed in float32.

    Args:
        dim (int): Feature size of the last axis.
        eps (float, optional): :math:`\epsilon` for float32 inputs. Default: ``1e-5``.
        fp16_eps (float, optional): :math:`\epsilon` for float16/bfloat16 inputs.
            Default: ``1e-3``.
        stable (bool, optional): Rescale rows by their largest magnitude first.
            Default: ``False``.

    Shape:
        - Input: :math:`(*, \text{dim})`.
        - Output: :math:`(*, \text{dim})`, same dtype as the input.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.nn import LayerNorm
        >>> norm = LayerNorm(10)
        >>> norm(mx.random.normal((32, 10))).shape
        (32, 10)

    Reference:
        Ba, Kiros & Hinton, "Layer Normalization", 2016.
        https://arxiv.org/abs/1607.06450
    """

    def __init__(self, dim: int, eps: float = 1e-5, fp16_eps: float = 1e-3, stable: bool = False):
        super().__init__()
        _check_init("LayerNorm", dim, eps)
        check_positive("LayerNorm", "fp16_eps", fp16_eps, says="fp16_eps must be positive")
        self.dim = dim
        self.eps = eps
        self.fp16_eps = fp16_eps
        self.stable = stable
        self.g = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        _check_input("LayerNorm", self.dim, x)
        eps = self.fp16_eps if x.dtype in (mx.float16, mx.bfloat16) else self.eps
        h = x.astype(mx.float32)
        if self.stable:
            peak = mx.stop_gradient(mx.max(mx.abs(h), axis=-1, keepdims=True))  # (*, 1)
            h = h / mx.where(peak > 0, peak, 1.0)
        return mx.fast.layer_norm(h, self.g.astype(mx.float32), None, eps).astype(x.dtype)
