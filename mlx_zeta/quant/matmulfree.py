"""The layers of the MatMul-free language model (Zhu et al., 2024): the MLGRU token mixer, the GLU
channel mixer and their residual block, all projections ternary (BitLinear); plus the parallel scan
of elementwise linear recurrences that MLGRU and BitLRU share. The LM itself is
:class:`mlx_zeta.models.matmulfree.MatMulFreeLM`."""

from typing import Callable, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.common import check_sizes
from mlx_zeta.quant.bitlinear import BitLinear

__all__ = ["linear_scan", "complex_linear_scan", "linear_recurrence_loop", "glu_hidden_dim", "MLGRU", "MLGRUCache",
           "GLUChannelMixer", "MatMulFreeBlock"]

Pair = Tuple[mx.array, mx.array]


def _compute_dtype(x: mx.array) -> mx.Dtype:
    """float32 for half-precision inputs (the scan accumulates), the input's dtype otherwise."""
    return mx.float32 if x.dtype in (mx.float16, mx.bfloat16) else x.dtype


def _shift(x: mx.array, k: int, fill: float) -> mx.array:
    """``x`` moved ``k`` steps later along axis 1, the first ``k`` steps set to ``fill``."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (k, 0)
    return mx.pad(x[:, :-k], pad, constant_values=fill)


def _scan(a: Sequence[mx.array], b: Sequence[mx.array], mul: Callable) -> Tuple[List[mx.array], List[mx.array]]:
    r"""Hillis-Steele inclusive scan of the affine maps :math:`h \mapsto a_t h + b_t` along axis 1.

    After step :math:`j` (offset :math:`k = 2^j`) element :math:`t` holds the composition of
    the maps :math:`\max(0, t - 2k + 1) .. t`; the identity :math:`(1, 0)` pads the start.
    Composing :math:`(a_1, b_1)` then :math:`(a_2, b_2)` gives :math:`(a_2 a_1, a_2 b_1 + b_2)`.
    Products of gates only shrink toward 0 (they are never divided by), so nothing overflows.
    Returns (cumulative products :math:`A_t`, :math:`B_t`) with :math:`h_t = A_t h_0 + B_t`.
    """
    a, b = list(a), list(b)
    length, k = b[0].shape[1], 1
    while k < length:
        a_prev = [_shift(x, k, 1.0 if i == 0 else 0.0) for i, x in enumerate(a)]
        b_prev = [_shift(x, k, 0.0) for x in b]
        b = [u + v for u, v in zip(mul(a, b_prev), b)]
        a = mul(a, a_prev)
        k *= 2
    return a, b


def _real_mul(x: Sequence[mx.array], y: Sequence[mx.array]) -> List[mx.array]:
    return [x[0] * y[0]]


def _complex_mul(x: Sequence[mx.array], y: Sequence[mx.array]) -> List[mx.array]:
    return [x[0] * y[0] - x[1] * y[1], x[0] * y[1] + x[1] * y[0]]


def linear_scan(a: mx.array, b: mx.array, h0: Optional[mx.array] = None) -> mx.array:
    r"""All states of the elementwise linear recurrence :math:`h_t = a_t \odot h_{t-1} + b_t`.

    A parallel (Hillis-Steele) prefix scan over the sequence axis: :math:`\lceil\log_2 L\rceil`
    steps of :math:`O(L)` elementwise work, differentiable with ordinary MLX ops. It forms
    only products of the gates (no division by cumulative products, no logarithms), so gates
    at 0 or 1 and long sequences are safe; half-precision inputs are scanned in float32 and
    the result cast back. :func:`linear_recurrence_loop` is the sequential definition.

    Args:
        a (array): gates, shape :math:`(B, L, *)` (or broadcastable to ``b``).
        b (array): inputs, shape :math:`(B, L, *)`.
        h0 (array, optional): state before the first step, shape :math:`(B, *)`. Default: zeros.

    Returns:
        array: :math:`h_1, \dots, h_L`, shape :math:`(B, L, *)`, in ``b``'s dtype.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.quant import linear_scan
        >>> linear_scan(mx.full((1, 3, 1), 0.5), mx.ones((1, 3, 1)))[0, :, 0]
        array([1, 1.5, 1.75], dtype=float32)
    """
    out_dtype, dtype = b.dtype, _compute_dtype(b)
    a, b = mx.broadcast_to(a, b.shape).astype(dtype), b.astype(dtype)
    (cum_a,), (h,) = _scan([a], [b], _real_mul)
    if h0 is not None:
        h = h + cum_a * mx.expand_dims(h0.astype(dtype), 1)
    return h.astype(out_dtype)


def complex_linear_scan(a: Pair, b: Pair, h0: Optional[Pair] = None) -> Pair:
    r""":func:`linear_scan` for complex numbers held as (real, imaginary) pairs of real arrays.

    :math:`h_t = a_t h_{t-1} + b_t` with complex products
    :math:`(a_r + i a_i)(h_r + i h_i) = (a_r h_r - a_i h_i) + i (a_r h_i + a_i h_r)`.
    ``a`` broadcasts to ``b`` (e.g. a time-constant diagonal :math:`\Lambda` of shape
    :math:`(1, 1, N)`). Returns ``(h_real, h_imag)``, each :math:`(B, L, *)` in ``b``'s dtype.
    """
    out_dtype, dtype = b[0].dtype, _compute_dtype(b[0])
    b = [x.astype(dtype) for x in b]
    a = [mx.broadcast_to(x, b[0].shape).astype(dtype) for x in a]
    cum_a, h = _scan(a, b, _complex_mul)
    if h0 is not None:
        start = [mx.expand_dims(x.astype(dtype), 1) for x in h0]
        h = [u + v for u, v in zip(h, _complex_mul(cum_a, start))]
    return h[0].astype(out_dtype), h[1].astype(out_dtype)


def linear_recurrence_loop(a: mx.array, b: mx.array, h0: Optional[mx.array] = None) -> mx.array:
    r"""Sequential :math:`h_t = a_t \odot h_{t-1} + b_t`, one step per position (the reference
    for :func:`linear_scan`; also what recurrent decoding does one token at a time)."""
    a = mx.broadcast_to(a, b.shape)
    h = mx.zeros(b[:, 0].shape, b.dtype) if h0 is None else h0
    out = []
    for t in range(b.shape[1]):
        h = a[:, t] * h + b[:, t]
        out.append(h)
    return mx.stack(out, axis=1)


class MLGRUCache:
    r"""Decoding state of one :class:`MLGRU` layer: the hidden state ``h`` of shape
    :math:`(B, \text{hidden\_dim})` after the last position seen (``None`` before the first
    call) and ``offset``, the number of positions seen. The layer updates it in place."""

    def __init__(self):
        self.h: Optional[mx.array] = None
        self.offset = 0

    def reset(self) -> None:
        """Forget the state (the next call starts a new sequence)."""
        self.h, self.offset = None, 0

    @property
    def state(self) -> Optional[mx.array]:
        return self.h


class MLGRU(nn.Module):
    r"""MatMul-free linear gated recurrent unit, the token mixer of the MatMul-free LM.

    .. math::

        f_t = \sigma(x_t W_f + b_f),\quad c_t = \tau(x_t W_c + b_c),\quad
        h_t = f_t \odot h_{t-1} + (1 - f_t) \odot c_t,

        g_t = \sigma(x_t W_g + b_g),\quad o_t' = g_t \odot h_t,\quad o_t = o_t' W_o + b_o

    with :math:`\sigma` the sigmoid, :math:`\tau` = SiLU (section 3.3.1 of the paper) and
    :math:`h_0 = 0`. Every :math:`W` is a :class:`~mlx_zeta.quant.BitLinear`, whose RMSNorm
    on its input is the only norm: in the paper the norm before :math:`W_o` is BitLinear's own
    (its reference code instead norms :math:`h` and gates it with :math:`\text{swish}(g)`; the
    per-layer forget-gate lower bound of HGRN is not part of MLGRU and is left out). The gates
    depend only on :math:`x_t`, so over a whole sequence the recurrence is one
    :func:`linear_scan` (:math:`a_t = f_t`, :math:`b_t = (1 - f_t) c_t`); with a
    :class:`MLGRUCache` it continues from the cached :math:`h`, so decoding one token at a time
    is the step :math:`h \leftarrow f h + (1 - f) c`. The recurrence is elementwise, so the
    paper's heads change nothing here.

    Args:
        dim (int): input size.
        hidden_dim (int, optional): state size. Default: ``dim``.
        dim_out (int, optional): output size. Default: ``dim``.
        bias (bool): biases on the four projections. Default: ``False`` (the reference code has none).
        activation (callable): :math:`\tau`. Default: ``nn.silu``.

    Call ``(x, cache=None, mask=None)``: ``mask`` (True = keep), :math:`(B, L)`, turns a
    masked position into the identity step (:math:`h_t = h_{t-1}`), e.g. left padding.

    Shape:
        - x: :math:`(B, L, \text{dim})`. Output: :math:`(B, L, \text{dim\_out})`.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.quant import MLGRU
        >>> layer = MLGRU(64)
        >>> layer(mx.random.normal((2, 10, 64))).shape
        (2, 10, 64)

    Reference: Zhu et al., "Scalable MatMul-free Language Modeling", https://arxiv.org/abs/2406.02528.
    """

    def __init__(self, dim: int, hidden_dim: Optional[int] = None, dim_out: Optional[int] = None,
                 bias: bool = False, activation: Callable[[mx.array], mx.array] = nn.silu):
        super().__init__()
        check_sizes(type(self).__name__, dim=dim, hidden_dim=hidden_dim, dim_out=dim_out)
        if not callable(activation):
            raise ValueError(f"[{type(self).__name__}] expected activation to be callable, "
                             f"got {type(activation).__name__}")
        hidden_dim, dim_out = hidden_dim or dim, dim_out or dim
        self.dim, self.hidden_dim, self.dim_out = dim, hidden_dim, dim_out
        self.activation = activation
        self.f_proj = BitLinear(dim, hidden_dim, bias=bias)
        self.c_proj = BitLinear(dim, hidden_dim, bias=bias)
        self.g_proj = BitLinear(dim, hidden_dim, bias=bias)
        self.o_proj = BitLinear(hidden_dim, dim_out, bias=bias)

    def gates(self, x: mx.array) -> Tuple[mx.array, mx.array, mx.array]:
        """``(f, (1 - f) * c, g)`` for every position, each :math:`(B, L, \\text{hidden\\_dim})`."""
        f = mx.sigmoid(self.f_proj(x))
        return f, (1 - f) * self.activation(self.c_proj(x)), mx.sigmoid(self.g_proj(x))

    def __call__(self, x: mx.array, cache: Optional[MLGRUCache] = None, mask: Optional[mx.array] = None) -> mx.array:
        name = type(self).__name__
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"[{name}] expected input of shape (batch, seq, {self.dim}), got {tuple(x.shape)}")
        f, inp, g = self.gates(x)
        if mask is not None:
            if mask.shape != x.shape[:2]:
                raise ValueError(f"[{name}] expected mask of shape {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
            keep = mask[..., None]
            f, inp = mx.where(keep, f, 1.0), mx.where(keep, inp, 0.0)
        h0 = None if cache is None else cache.h
        if h0 is not None and h0.shape != (x.shape[0], self.hidden_dim):
            raise ValueError(f"[{name}] expected a cached state of shape ({x.shape[0]}, {self.hidden_dim}), "
                             f"got {tuple(h0.shape)}")
        if x.shape[1] == 1 and h0 is not None:  # recurrent decoding step
            h = (f[:, 0] * h0 + inp[:, 0])[:, None].astype(x.dtype)
        else:
            h = linear_scan(f, inp, h0).astype(x.dtype)  # (B, L, hidden_dim)
        if cache is not None:
            cache.h, cache.offset = h[:, -1], cache.offset + x.shape[1]
        return self.o_proj(g * h)


class GLUChannelMixer(nn.Module):
    r"""Gated linear unit channel mixer with ternary projections (section 3.3.2 of the paper).

    .. math::

        g = x W_g,\quad u = x W_u,\quad p = \tau(g) \odot u,\quad d = p W_d

    with :math:`\tau` = SiLU (swish) by default; :math:`W_g, W_u, W_d` are separate
    :class:`~mlx_zeta.quant.BitLinear` layers, each with its own absmean scale and input
    RMSNorm (the reference code fuses :math:`W_g, W_u` into one matrix sharing one scale).

    Args:
        dim (int): input size.
        hidden_dim (int): width of :math:`g, u`.
        dim_out (int, optional): output size. Default: ``dim``.
        activation (callable): :math:`\tau`. Default: ``nn.silu``.
        bias (bool): biases on the projections. Default: ``False``.

    Shape:
        - Input: :math:`(*, \text{dim})`. Output: :math:`(*, \text{dim\_out})`.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.quant import GLUChannelMixer
        >>> GLUChannelMixer(64, 128)(mx.random.normal((2, 10, 64))).shape
        (2, 10, 64)

    Reference: Zhu et al., https://arxiv.org/abs/2406.02528; Shazeer, "GLU Variants Improve
    Transformer", https://arxiv.org/abs/2002.05202.
    """

    def __init__(self, dim: int, hidden_dim: int, dim_out: Optional[int] = None,
                 activation: Callable[[mx.array], mx.array] = nn.silu, bias: bool = False):
        super().__init__()
        check_sizes(type(self).__name__, dim=dim, hidden_dim=hidden_dim, dim_out=dim_out)
        if not callable(activation):
            raise ValueError(f"[{type(self).__name__}] expected activation to be callable, "
                             f"got {type(activation).__name__}")
        self.dim, self.hidden_dim, self.dim_out = dim, hidden_dim, dim_out or dim
        self.activation = activation
        self.gate_proj = BitLinear(dim, hidden_dim, bias=bias)
        self.up_proj = BitLinear(dim, hidden_dim, bias=bias)
        self.down_proj = BitLinear(hidden_dim, self.dim_out, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        if x.shape[-1] != self.dim:
            raise ValueError(f"[{type(self).__name__}] expected input of shape (..., {self.dim}), got {tuple(x.shape)}")
        return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x))


def glu_hidden_dim(dim: int, ratio: float = 4.0, multiple_of: int = 8) -> int:
    """The GLU width :math:`\\frac{2}{3}\\,\\text{ratio}\\cdot\\text{dim}` rounded up to ``multiple_of``
    (the parameter count of a plain MLP of width ratio * dim)."""
    width = int(dim * ratio * 2 / 3)
    return max(multiple_of, -(-width // multiple_of) * multiple_of)


class MatMulFreeBlock(nn.Module):
    r"""One layer of the MatMul-free LM: two pre-norm residual branches,

    .. math:: x \leftarrow x + \text{MLGRU}(\text{RMSNorm}(x)),\qquad x \leftarrow x + \text{GLU}(\text{RMSNorm}(x)).

    Args:
        dim (int): model width.
        hidden_dim (int, optional): MLGRU state size. Default: ``dim``.
        ff_hidden_dim (int, optional): GLU width. Default: :func:`glu_hidden_dim` ``(dim)``.
        norm_eps (float): RMSNorm epsilon. Default: ``1e-6``.

    Call ``(x, cache=None, mask=None)`` with an :class:`MLGRUCache` for this layer.

    Shape:
        - x: :math:`(B, L, \text{dim})`. Output: same.
    """

    def __init__(self, dim: int, hidden_dim: Optional[int] = None, ff_hidden_dim: Optional[int] = None,
                 norm_eps: float = 1e-6):
        super().__init__()
        check_sizes("MatMulFreeBlock", dim=dim, ff_hidden_dim=ff_hidden_dim)
        self.attn_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.mixer = MLGRU(dim, hidden_dim)
        self.ff_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.ff = GLUChannelMixer(dim, ff_hidden_dim or glu_hidden_dim(dim))

    def __call__(self, x: mx.array, cache: Optional[MLGRUCache] = None, mask: Optional[mx.array] = None) -> mx.array:
        x = x + self.mixer(self.attn_norm(x), cache=cache, mask=mask)
        return x + self.ff(self.ff_norm(x))
