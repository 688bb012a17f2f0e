"""Position-wise feed-forward blocks: zeta's ``FeedForward`` and its activations."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.common import check_int

__all__ = ["FeedForward", "ReluSquared", "affine", "feedforward"]


def affine(p: Mapping, x: mx.array) -> mx.array:
    """Apply a linear layer held in ``p``: an ``nn.Module`` (``nn.Linear``, a quantized
    replacement, ...) is called; a plain mapping ``{"weight": (out, in), "bias": (out,)}``
    gets ``mlx.nn.Linear``'s exact math, so a dict of its parameters gives the same numbers."""
    if isinstance(p, nn.Module):
        return p(x)
    if "bias" in p:
        return mx.addmm(p["bias"], x, p["weight"].T)
    return x @ p["weight"].T


def feedforward(p: Mapping, x: mx.array, act: Callable[[mx.array], mx.array], glu: bool,
                norm_eps: float = 1e-5, drop: Optional[Callable[[mx.array], mx.array]] = None) -> mx.array:
    r"""The :class:`FeedForward` math on a mapping of parameters (the block itself or a dict
    ``{"proj_in", "mult_bias"?, "norm"?, "proj_out"}``); shared by the block and
    :func:`mlx_zeta.functional.mlp`. A dict ``norm`` gets ``mlx.nn.LayerNorm``'s math with
    ``norm_eps``; ``drop`` (if given) is applied to the hidden layer."""
    h = affine(p["proj_in"], x)  # (*, h) or (*, 2h)
    if glu:
        u, v = mx.split(h, 2, axis=-1)  # value half, gate half: (*, h) each
        h = u * act(v)
    else:
        h = act(h)
    if "mult_bias" in p:
        h = h * p["mult_bias"]
    if "norm" in p:
        norm = p["norm"]
        h = norm(h) if isinstance(norm, nn.Module) else mx.fast.layer_norm(h, norm.get("weight"), norm.get("bias"), norm_eps)
    if drop is not None:
        h = drop(h)
    return affine(p["proj_out"], h)


def _relu_squared(x: mx.array) -> mx.array:
    return mx.square(nn.relu(x))


class ReluSquared(nn.Module):
    r"""Squared ReLU activation from Primer.

    .. math::

        \operatorname{ReLU}^2(x) = \max(x, 0)^2

    Shape:
        - Input: :math:`(*)`, any shape.
        - Output: :math:`(*)`, same shape as the input.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.nn import ReluSquared
        >>> act = ReluSquared()
        >>> act(mx.array([-1.0, 0.5, 2.0]))
        array([0, 0.25, 4], dtype=float32)

    Reference:
        So et al., "Primer: Searching for Efficient Transformers for Language
        Modeling", 2021. https://arxiv.org/abs/2109.08668
    """

    def __call__(self, x: mx.array) -> mx.array:
        return _relu_squared(x)


_ACCEPTED = (
    "dim", "dim_out", "mult", "glu", "glu_mult_bias", "swish", "relu_squared",
    "post_act_ln", "dropout", "no_bias", "zero_init_output", "custom_act", "swiglu",
    "inner_dim",
)


def _activation(relu_squared: bool, silu: bool, custom_act: Optional[Callable]) -> Callable:
    """The hidden activation: ReLU², SiLU, ``custom_act`` (a Module trains with the block) or GELU."""
    if relu_squared:
        return _relu_squared
    if silu:
        return nn.silu
    return custom_act if custom_act is not None else nn.gelu


def _check_options(dim, dim_out, mult, inner_dim, dropout, swish, relu_squared, custom_act, swiglu, glu,
                   glu_mult_bias, kwargs: dict) -> None:
    """FeedForward's argument checks: sizes, and contradictory activation choices raise."""
    # zeta's CUDA-only switch: accepted when off, a clear error when on.
    if kwargs.pop("triton_kernels_on", False):
        raise ValueError("[FeedForward] triton_kernels_on=True is CUDA/Triton-only and has no MLX equivalent; drop it")
    if kwargs:
        raise ValueError(
            f"[FeedForward] unknown keyword argument(s): {', '.join(sorted(kwargs))}; accepted: {', '.join(_ACCEPTED)}"
        )
    for name, value in (("dim", dim), ("dim_out", dim if dim_out is None else dim_out)):
        check_int("FeedForward", name, value, 1, says=f"{name} must be a positive integer")
    check_int("FeedForward", "inner_dim", inner_dim, 1, optional=True,
              says="inner_dim must be a positive integer or None")
    if inner_dim is None and (not mult > 0 or int(dim * mult) < 1):
        raise ValueError(f"[FeedForward] mult must give a hidden width int(dim * mult) >= 1, got mult={mult!r} with dim={dim}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"[FeedForward] dropout must be in [0, 1), got {dropout!r}")
    if swish and relu_squared:
        raise ValueError("[FeedForward] swish=True and relu_squared=True are mutually exclusive; pick one activation")
    if custom_act is not None:
        if not callable(custom_act):
            raise ValueError(f"[FeedForward] custom_act must be callable, got {type(custom_act).__name__}")
        if swish or relu_squared:
            raise ValueError("[FeedForward] custom_act cannot be combined with swish=True or relu_squared=True")
    if swiglu and (relu_squared or custom_act is not None):
        raise ValueError("[FeedForward] swiglu=True fixes the gate activation to SiLU; got relu_squared or custom_act too")
    if glu_mult_bias and not (glu or swiglu):
        raise ValueError("[FeedForward] glu_mult_bias=True needs a gated projection (glu=True or swiglu=True)")



class FeedForward(nn.Module):
    r"""Transformer feed-forward block with zeta's options (GLU, SwiGLU, ReLU², ...).

    Without gating the block computes

    .. math::

        y = W_2 \, \operatorname{Drop}(\operatorname{LN}(\phi(W_1 x + b_1))) + b_2

    and with a gated linear unit (``glu=True`` or ``swiglu=True``) the input
    projection has :math:`2h` outputs, split into a value half and a gate half:

    .. math::

        [u, v] = W_1 x + b_1, \qquad
        y = W_2 \, \operatorname{Drop}(\operatorname{LN}(u \odot \phi(v) \odot m)) + b_2

    with :math:`h = \lfloor \text{dim} \cdot \text{mult} \rfloor`, :math:`m` the
    optional learned multiplicative bias (``glu_mult_bias``, initialised to ones)
    and :math:`\operatorname{LN}` present only with ``post_act_ln``.

    The activation :math:`\phi` is ReLU² if ``relu_squared``, SiLU if ``swish`` or
    ``swiglu``, ``custom_act`` if given, else exact (erf) GELU. Contradictory
    choices raise instead of one silently winning: ``swish`` with
    ``relu_squared``, ``custom_act`` with either, ``swiglu`` with ``relu_squared``
    or ``custom_act``, and ``glu_mult_bias`` without a gated projection.

    Fixes relative to zeta: ``swiglu=True`` is a SiLU-gated GLU (zeta halved the
    width and broke the output projection); ``no_bias`` removes the biases of
    both projections in every configuration (zeta inverted it for the output
    projection when ``post_act_ln`` was set, and ignored it for the GLU).

    Args:
        dim (int): Input feature size. Required.
        dim_out (int, optional): Output feature size. Default: ``dim``.
        mult (float, optional): Hidden width multiplier, :math:`h = \lfloor
            \text{dim} \cdot \text{mult} \rfloor`. Default: ``4``.
        glu (bool, optional): Gate the hidden layer with a GLU. Default: ``False``.
        glu_mult_bias (bool, optional): Learned per-feature scale on the GLU
            product; needs ``glu`` or ``swiglu``. Default: ``False``.
        swish (bool, optional): SiLU activation. Default: ``False``.
        relu_squared (bool, optional): ReLU² activation. Default: ``False``.
        post_act_ln (bool, optional): LayerNorm (with weight and bias) on the
            hidden layer after the activation. Default: ``False``.
        dropout (float, optional): Dropout probability on the hidden layer,
            active in training mode only. Default: ``0.0``.
        no_bias (bool, optional): Drop the biases of both projections.
            Default: ``False``.
        zero_init_output (bool, optional): Zero the output projection's weight
            and bias so the block starts as the zero map. Default: ``False``.
        custom_act (Callable, optional): Activation function or module; a module's
            parameters are trained with the block. Default: ``None``.
        swiglu (bool, optional): SwiGLU: a GLU gated by SiLU (implies ``glu``).
            Default: ``False``.
        inner_dim (int, optional): Hidden width :math:`h` given directly (e.g. a
            checkpoint's ``intermediate_size``); overrides ``mult``. Default: ``None``.

    Shape:
        - Input: :math:`(*, \text{dim})`.
        - Output: :math:`(*, \text{dim\_out})`.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.nn import FeedForward
        >>> ff = FeedForward(256, 512, glu=True, post_act_ln=True, dropout=0.2)
        >>> ff(mx.random.normal((1, 256))).shape
        (1, 512)

    References:
        Vaswani et al., "Attention Is All You Need", 2017; Shazeer, "GLU Variants
        Improve Transformer", 2020 (https://arxiv.org/abs/2002.05202); So et al.,
        "Primer", 2021 (https://arxiv.org/abs/2109.08668).
    """

    def __init__(
        self,
        dim: Optional[int] = None,
        dim_out: Optional[int] = None,
        mult: float = 4,
        glu: bool = False,
        glu_mult_bias: bool = False,
        swish: bool = False,
        relu_squared: bool = False,
        post_act_ln: bool = False,
        dropout: float = 0.0,
        no_bias: bool = False,
        zero_init_output: bool = False,
        custom_act: Optional[Callable[[mx.array], mx.array]] = None,
        swiglu: bool = False,
        inner_dim: Optional[int] = None,
        **kwargs: Any,
    ):
        super().__init__()
        _check_options(dim, dim_out, mult, inner_dim, dropout, swish, relu_squared, custom_act, swiglu, glu,
                       glu_mult_bias, kwargs)
        self.dim = dim
        self.dim_out = dim if dim_out is None else dim_out
        self.inner_dim = int(dim * mult) if inner_dim is None else inner_dim
        self.glu = bool(glu or swiglu)

        self.act = _activation(relu_squared, swish or swiglu, custom_act)
        width = 2 * self.inner_dim if self.glu else self.inner_dim
        self.proj_in = nn.Linear(dim, width, bias=not no_bias)
        if glu_mult_bias:
            self.mult_bias = mx.ones((self.inner_dim,))
        if post_act_ln:
            self.norm = nn.LayerNorm(self.inner_dim)
        if dropout > 0:
            self.drop = nn.Dropout(dropout)
        self.proj_out = nn.Linear(self.inner_dim, self.dim_out, bias=not no_bias)
        if zero_init_output:
            self.proj_out.weight = mx.zeros_like(self.proj_out.weight)
            if "bias" in self.proj_out:
                self.proj_out.bias = mx.zeros_like(self.proj_out.bias)

    def __call__(self, x: mx.array) -> mx.array:
        if x.ndim == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"[FeedForward] expected input with last dimension {self.dim}, got shape {tuple(x.shape)}")
        return feedforward(self, x, self.act, self.glu, drop=self.drop if "drop" in self else None)
