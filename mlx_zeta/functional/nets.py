"""Nets as functions ``f(params, x, **hyper)``, each over the same math as its module.

Every net declares its parameters with :func:`~mlx_zeta.functional.validate` under
the names and layouts of the module it mirrors, so :func:`~mlx_zeta.functional.trace`
gives that module's ``parameters()`` tree and the two share weights:

========================================  ==============================================
net                                       module (same parameters, same numbers)
========================================  ==============================================
``linear``                                ``mlx.nn.Linear``
``mlp``                                   :class:`mlx_zeta.nn.FeedForward`
``layer_norm``                            ``mlx.nn.LayerNorm``
``rms_norm``                              :class:`mlx_zeta.nn.RMSNorm`
``conv_1d`` / ``conv_2d``                 ``mlx.nn.Conv1d`` / ``mlx.nn.Conv2d`` (channels-last)
``max_pool``                              ``mlx.nn.MaxPool1d`` / ``mlx.nn.MaxPool2d``
``dropout``                               ``mlx.nn.Dropout`` (with an explicit key)
``multi_head_attention``                  :class:`mlx_zeta.nn.Attention`
``branch_linear``                         a list of ``mlx.nn.Linear``
========================================  ==============================================

The math is shared, not copied: ``mlp`` calls :func:`mlx_zeta.nn.feedforward.feedforward`
(the body of ``FeedForward.__call__``), ``rms_norm`` calls :func:`mlx_zeta.nn.norms.rms_norm`,
``multi_head_attention`` calls :func:`mlx_zeta.nn.attention.attention_heads` and a
:class:`~mlx_zeta.nn.FlashAttention`, ``linear`` calls :func:`mlx_zeta.nn.feedforward.affine`,
and the pooling nets call the ``mlx.nn`` pooling layers. Convolutions and layer norm
are one MLX op each (``mx.conv1d``, ``mx.conv2d``, ``mx.fast.layer_norm``), called
exactly as ``mlx.nn`` calls them.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.common import check_int
from mlx_zeta.functional.core import flexible, ones, uniform, validate, zeros
from mlx_zeta.nn.attention import FlashAttention, attention_heads
from mlx_zeta.nn.feedforward import affine, feedforward
from mlx_zeta.nn.norms import rms_norm as _rms_norm_math

__all__ = [
    "linear", "mlp", "layer_norm", "rms_norm", "conv_1d", "conv_2d", "max_pool", "dropout",
    "multi_head_attention", "multi_head_self_attention", "branch_linear",
]

Params = Any  # a nested dict of arrays, or the recording object of trace/check


def _linear_params(params: Params, dim_in: int, dim_out: int, bias: bool, zero: bool = False) -> Dict[str, mx.array]:
    """``mlx.nn.Linear``'s parameters: weight (out, in) and bias (out,), both U(-1/sqrt(in), 1/sqrt(in))."""
    init = zeros if zero else uniform(1.0 / math.sqrt(dim_in))
    p = {"weight": validate(params["weight"], (dim_out, dim_in), init)}
    if bias:
        p["bias"] = validate(params["bias"], (dim_out,), init)
    return p


@flexible
def linear(params: Params, x: mx.array, dim_out: int, bias: bool = True) -> mx.array:
    r"""Affine map :math:`y = x W^T + b`, as ``mlx.nn.Linear(x.shape[-1], dim_out, bias)``.

    Parameters: ``weight`` :math:`(\text{dim\_out}, \text{dim\_in})`, ``bias`` :math:`(\text{dim\_out},)`.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.functional import trace, linear
        >>> params = trace(linear, mx.random.key(0), mx.zeros((2, 8)), 4)
        >>> linear(params, mx.ones((2, 8)), 4).shape
        (2, 4)
    """
    return affine(_linear_params(params, x.shape[-1], dim_out, bias), x)


@flexible
def branch_linear(params: Params, x: mx.array, num_branches: int, dim_out: Optional[int] = None,
                  bias: bool = True) -> List[mx.array]:
    r"""``num_branches`` independent linear maps of the same input, returned as a list.

    ``params`` is a list of ``linear`` parameters, as a module's list of
    ``mlx.nn.Linear`` (e.g. ``self.heads = [nn.Linear(d, o) for _ in range(n)]``).
    ``dim_out`` defaults to the input's last dimension.
    """
    check_int("branch_linear", "num_branches", num_branches, 1, says="num_branches must be >= 1")
    dim_out = x.shape[-1] if dim_out is None else dim_out
    return [linear(params[i], x, dim_out, bias) for i in range(num_branches)]


@flexible
def mlp(params: Params, x: mx.array, dim_out: Optional[int] = None, mult: float = 4, glu: bool = False,
        activation: Callable[[mx.array], mx.array] = nn.gelu, glu_mult_bias: bool = False,
        post_act_ln: bool = False, bias: bool = True, zero_init_output: bool = False) -> mx.array:
    r"""Feed-forward block, as :class:`mlx_zeta.nn.FeedForward` with the same options.

    ``FeedForward(dim, dim_out, mult, glu=glu, glu_mult_bias=..., post_act_ln=...,
    no_bias=not bias, zero_init_output=...)`` with activation ``activation``
    (``nn.gelu`` is FeedForward's default, ``nn.silu`` its ``swish``/``swiglu``). Dropout
    is left to :func:`dropout`, which needs a key.

    Parameters: ``proj_in`` (``linear``, width :math:`h` or :math:`2h` with ``glu``),
    ``mult_bias`` :math:`(h,)`, ``norm`` (``layer_norm``), ``proj_out``, with
    :math:`h = \lfloor \text{dim} \cdot \text{mult} \rfloor`.
    """
    dim = x.shape[-1]
    inner = int(dim * mult)
    if inner < 1:
        raise ValueError(f"[mlp] mult must give a hidden width int(dim * mult) >= 1, got mult={mult!r} with dim={dim}")
    if glu_mult_bias and not glu:
        raise ValueError("[mlp] glu_mult_bias=True needs glu=True")
    p: Dict[str, Any] = {"proj_in": _linear_params(params["proj_in"], dim, 2 * inner if glu else inner, bias)}
    if glu_mult_bias:
        p["mult_bias"] = validate(params["mult_bias"], (inner,), ones)
    if post_act_ln:
        p["norm"] = {"weight": validate(params["norm"]["weight"], (inner,), ones),
                     "bias": validate(params["norm"]["bias"], (inner,), zeros)}
    p["proj_out"] = _linear_params(params["proj_out"], inner, dim if dim_out is None else dim_out, bias,
                                   zero=zero_init_output)
    return feedforward(p, x, activation, glu)


@flexible
def layer_norm(params: Params, x: mx.array, eps: float = 1e-5, affine: bool = True, bias: bool = True) -> mx.array:
    r"""Layer normalisation over the last axis, as ``mlx.nn.LayerNorm(x.shape[-1], eps, affine, bias)``.

    Parameters (with ``affine``): ``weight`` (ones) and ``bias`` (zeros), shape :math:`(d,)`.
    """
    d = x.shape[-1]
    weight = validate(params["weight"], (d,), ones) if affine else None
    b = validate(params["bias"], (d,), zeros) if affine and bias else None
    return mx.fast.layer_norm(x, weight, b, eps)


@flexible
def rms_norm(params: Params, x: mx.array, eps: float = 1e-12) -> mx.array:
    r"""RMS normalisation with a learned gain, as :class:`~mlx_zeta.nn.RMSNorm` ``(x.shape[-1], eps)``.

    .. math:: y = \frac{x}{\max(\lVert x \rVert_2, \epsilon)} \sqrt{d} \odot \gamma

    Parameters: ``gamma`` :math:`(d,)`, ones.
    """
    return _rms_norm_math(x, validate(params["gamma"], (x.shape[-1],), ones), eps)


def _pair(v: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


@flexible
def conv_1d(params: Params, x: mx.array, dim_out: int, kernel_size: int, stride: int = 1, padding: int = 0,
            dilation: int = 1, groups: int = 1, bias: bool = True) -> mx.array:
    r"""1-D convolution on channels-last input, as ``mlx.nn.Conv1d(x.shape[-1], dim_out, kernel_size, ...)``.

    Shape: :math:`(N, L, C_{in}) \to (N, L_{out}, C_{out})`. Parameters: ``weight``
    :math:`(C_{out}, K, C_{in}/\text{groups})`, U(-s, s) with :math:`s = (K C_{in}/\text{groups})^{-1/2}`,
    and ``bias`` :math:`(C_{out},)`, zeros.
    """
    c_in = x.shape[-1]
    if c_in % groups:
        raise ValueError(f"[conv_1d] groups={groups} must divide the input channels {c_in}")
    scale = math.sqrt(1.0 / (c_in // groups * kernel_size))
    weight = validate(params["weight"], (dim_out, kernel_size, c_in // groups), uniform(scale))
    y = mx.conv1d(x, weight, stride, padding, dilation, groups)
    if bias:
        y = y + validate(params["bias"], (dim_out,), zeros)
    return y


@flexible
def conv_2d(params: Params, x: mx.array, dim_out: int, kernel_size: Union[int, Tuple[int, int]],
            stride: Union[int, Tuple[int, int]] = 1, padding: Union[int, Tuple[int, int]] = 0,
            dilation: Union[int, Tuple[int, int]] = 1, groups: int = 1, bias: bool = True) -> mx.array:
    r"""2-D convolution on channels-last input, as ``mlx.nn.Conv2d(x.shape[-1], dim_out, kernel_size, ...)``.

    Shape: :math:`(N, H, W, C_{in}) \to (N, H_{out}, W_{out}, C_{out})`. Parameters: ``weight``
    :math:`(C_{out}, K_h, K_w, C_{in}/\text{groups})`, U(-s, s) with
    :math:`s = (K_h K_w C_{in}/\text{groups})^{-1/2}`, and ``bias`` :math:`(C_{out},)`, zeros.
    """
    c_in = x.shape[-1]
    if c_in % groups:
        raise ValueError(f"[conv_2d] groups={groups} must divide the input channels {c_in}")
    kh, kw = _pair(kernel_size)
    scale = math.sqrt(1.0 / (c_in // groups * kh * kw))
    weight = validate(params["weight"], (dim_out, kh, kw, c_in // groups), uniform(scale))
    y = mx.conv2d(x, weight, _pair(stride), _pair(padding), _pair(dilation), groups)
    if bias:
        y = y + validate(params["bias"], (dim_out,), zeros)
    return y


@functools.lru_cache(maxsize=64)
def _pool(ndim: int, kernel_size: Any, stride: Any, padding: Any) -> nn.Module:
    cls = nn.MaxPool1d if ndim == 3 else nn.MaxPool2d
    return cls(kernel_size, stride, padding)


@flexible
def max_pool(x: mx.array, kernel_size: Union[int, Tuple[int, int]], stride: Optional[Union[int, Tuple[int, int]]] = None,
             padding: Union[int, Tuple[int, int]] = 0) -> mx.array:
    r"""Max pooling on channels-last input: ``mlx.nn.MaxPool1d`` for :math:`(N, L, C)`,
    ``mlx.nn.MaxPool2d`` for :math:`(N, H, W, C)`. ``stride`` defaults to ``kernel_size``.
    No parameters, so no ``params`` argument."""
    if x.ndim not in (3, 4):
        raise ValueError(f"[max_pool] expected (N, L, C) or (N, H, W, C) input, got shape {tuple(x.shape)}")
    freeze = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731  (hashable for the cache)
    return _pool(x.ndim, freeze(kernel_size), freeze(stride), freeze(padding))(x)


@flexible
def dropout(key: mx.array, x: mx.array, rate: float, training: bool = True) -> mx.array:
    r"""Inverted dropout with an explicit key: ``mlx.nn.Dropout(rate)``'s formula
    :math:`(m \odot x) / (1 - p)`, :math:`m \sim \text{Bernoulli}(1 - p)`, drawn from ``key``.
    The identity when ``rate == 0`` or ``training`` is False."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"[dropout] rate must be in [0, 1), got {rate!r}")
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = mx.random.bernoulli(keep, x.shape, key=key)
    return (mask * x) * (1 / keep)


@functools.lru_cache(maxsize=16)
def _attend(causal: bool, flash: bool) -> FlashAttention:
    return FlashAttention(causal=causal, flash=flash)


@flexible
def multi_head_attention(params: Params, x: mx.array, context: Optional[mx.array] = None, heads: int = 8,
                         dim_head: Optional[int] = None, kv_heads: Optional[int] = None, causal: bool = False,
                         qk_norm: bool = False, bias: bool = False, mask: Optional[mx.array] = None,
                         attn_bias: Optional[mx.array] = None, flash: bool = True) -> mx.array:
    r"""Multi-head (grouped-query) attention, as :class:`~mlx_zeta.nn.Attention` ``(x.shape[-1], heads, ...)``.

    Self-attention when ``context`` is None, else cross-attention to ``context``
    :math:`(B, L_c, \text{dim})`. ``mask``/``attn_bias`` as in :class:`~mlx_zeta.nn.FlashAttention`.

    Parameters: ``to_q`` :math:`(H d, \text{dim})`, ``to_k``/``to_v`` :math:`(H_{kv} d, \text{dim})`,
    ``to_out`` :math:`(\text{dim}, H d)` (``linear``; biases with ``bias``), and with
    ``qk_norm`` ``q_norm``/``k_norm`` (``weight`` :math:`(d,)`, ones, as ``mlx.nn.RMSNorm``).
    """
    dim = x.shape[-1]
    if dim_head is None:
        if dim % heads:
            raise ValueError(f"[multi_head_attention] expected heads to divide dim when dim_head is None, "
                             f"got dim={dim}, heads={heads}")
        dim_head = dim // heads
    kv_heads = heads if kv_heads is None else kv_heads
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"[multi_head_attention] expected kv_heads to divide heads, got heads={heads}, kv_heads={kv_heads}")
    c = x if context is None else context
    p: Dict[str, Any] = {}
    for name, width in (("to_q", heads), ("to_k", kv_heads), ("to_v", kv_heads)):
        p[name] = _linear_params(params[name], dim, width * dim_head, bias)
    p["to_out"] = _linear_params(params["to_out"], heads * dim_head, dim, bias)
    if qk_norm:
        for name in ("q_norm", "k_norm"):
            p[name] = {"weight": validate(params[name]["weight"], (dim_head,), ones)}
    q, k, v = affine(p["to_q"], x), affine(p["to_k"], c), affine(p["to_v"], c)
    return attention_heads(p, q, k, v, heads=heads, kv_heads=kv_heads, dim_head=dim_head,
                           attend=_attend(causal, flash), mask=mask, attn_bias=attn_bias)


@flexible
def multi_head_self_attention(params: Params, x: mx.array, heads: int = 8, dim_head: Optional[int] = None,
                              kv_heads: Optional[int] = None, causal: bool = False, qk_norm: bool = False,
                              bias: bool = False, mask: Optional[mx.array] = None, flash: bool = True) -> mx.array:
    """:func:`multi_head_attention` of ``x`` on itself (see there for the parameters)."""
    return multi_head_attention(params, x, None, heads=heads, dim_head=dim_head, kv_heads=kv_heads, causal=causal,
                                qk_norm=qk_norm, bias=bias, mask=mask, flash=flash)
