"""Attention: the scaled-dot-product core and the multi-head / multi-query / grouped-query blocks."""

import math
from typing import Any, Mapping, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.common import check_positive
from mlx_zeta.kernels import attention as fused_kernels
from mlx_zeta.kernels.dispatch import kernels_active
from mlx_zeta.kernels.positions import PositionBias
from mlx_zeta.nn.feedforward import affine
from mlx_zeta.nn.cache import Cache, KVCache
from mlx_zeta.nn.positional import apply_rotary_pos_emb

__all__ = ["FlashAttention", "Attention", "MultiheadAttention", "MultiQueryAttention", "MultiGroupedQueryAttn", "KVCache",
           "attention_heads"]

Mask = Union[None, str, mx.array]


def _broadcastable(shape: Tuple[int, ...], target: Tuple[int, ...]) -> bool:
    """True when ``shape`` (numpy rules, right-aligned) broadcasts to ``target``."""
    return len(shape) <= len(target) and all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))


def _causal_mask(q_len: int, k_len: int) -> mx.array:
    """(q_len, k_len) bool, True where query i may see key j <= i + k_len - q_len (bottom-right)."""
    return mx.arange(k_len)[None] <= mx.arange(q_len)[:, None] + (k_len - q_len)


CPU_CAUSAL_BLOCK = 64  # query rows per block of causal attention on the CPU (see _causal_blocks)


def _causal_blocks(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    r"""Bottom-right causal ``mx.fast.scaled_dot_product_attention`` in blocks of
    :data:`CPU_CAUSAL_BLOCK` query rows, each over only the keys it may see: rows
    :math:`[s, e)` attend to keys :math:`[0, e + L_k - L_q)`, causally. The same numbers (a masked
    key adds :math:`e^{-\infty} = 0` to the softmax sum). On MLX's CPU backend SDPA is the
    composed :math:`\text{softmax}(s QK^T) V`, whose elementwise ``exp`` over the
    :math:`L_q \times L_k` scores dominates; a whole-square causal call spends half of it on
    masked scores, the blocks skip all but their diagonal tile's (512 queries: about 0.55x the work)."""
    lq, lk = q.shape[2], k.shape[2]
    outs = []
    for start in range(0, lq, CPU_CAUSAL_BLOCK):
        end = min(lq, start + CPU_CAUSAL_BLOCK)
        seen = end + lk - lq
        outs.append(mx.fast.scaled_dot_product_attention(q[:, :, start:end], k[:, :, :seen], v[:, :, :seen],
                                                         scale=scale, mask="causal"))
    return mx.concatenate(outs, axis=2)


class FlashAttention(nn.Module):
    r"""Scaled dot-product attention on per-head tensors, with grouped key/value heads.

    .. math::

        \text{Attention}(Q, K, V) = \text{softmax}\left(s\, Q K^T + B + M\right) V

    with scale :math:`s` (default :math:`1/\sqrt{d}`), additive bias :math:`B` and
    mask :math:`M` (:math:`0` where attending, :math:`-\infty` elsewhere). Query head
    :math:`h` reads key/value head :math:`\lfloor h / (H / H_{kv}) \rfloor` (GQA; MQA when
    :math:`H_{kv} = 1`); key/value heads are broadcast, never copied.

    ``flash=True`` dispatches to :func:`mlx.core.fast.scaled_dot_product_attention`;
    ``flash=False`` computes the softmax explicitly. Both give the same result. In
    training mode with ``dropout > 0`` the explicit path runs, with inverted dropout
    on the attention probabilities.

    Masks: a boolean mask is True where a query may attend; a floating mask is added
    to the scores. A 2-D mask is a key-padding mask of shape ``(batch, k_len)``; a
    3-D or 4-D mask broadcasts (right-aligned) against ``(batch, heads, q_len, k_len)``.
    ``causal`` is aligned bottom-right: query :math:`i` sees keys
    :math:`j \le i + L_k - L_q`, as after a KV cache prefill.

    Fully masked rows: a query with no key left to attend (every score :math:`-\infty`
    after masking, e.g. ``causal`` with ``q_len > k_len``) outputs zeros, with zero
    gradient, on both paths.

    Args:
        causal (bool): bottom-right causal masking. Default: ``False``.
        dropout (float): dropout on attention probabilities in training. Default: ``0.0``.
        flash (bool): fused kernels where they apply: MLX's ``mx.fast`` SDPA, and our fused
            kernels (:func:`mlx_zeta.kernels.fused_attention`) for position biases and causal masks
            with a mask beside them when the kernel dispatcher has a kernel path live
            (:mod:`mlx_zeta.kernels.dispatch`). ``False``: the explicit softmax. Default: ``True``.
        scale (float, optional): score scale. Default: ``1 / sqrt(dim)``.

    Shape:
        - q: :math:`(B, H, L_q, D)`; k: :math:`(B, H_{kv}, L_k, D)`; v: :math:`(B, H_{kv}, L_k, D_v)`.
        - mask: :math:`(B, L_k)` or broadcastable to :math:`(B, H, L_q, L_k)`.
        - attn_bias: broadcastable to :math:`(B, H, L_q, L_k)`, e.g. ALiBi :math:`(H, L_q, L_k)`; or a
          :class:`~mlx_zeta.kernels.PositionBias` (ALiBi slopes / T5 table and buckets), which the
          fused kernels compute in place where a kernel path is live and which is materialised elsewhere.
        - output: :math:`(B, H, L_q, D_v)`.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.nn import FlashAttention
        >>> attend = FlashAttention(causal=True)
        >>> q = mx.random.normal((2, 4, 6, 8)); k = v = mx.random.normal((2, 2, 10, 8))
        >>> attend(q, k, v).shape
        (2, 4, 6, 8)

    Reference: Dao et al., "FlashAttention", https://arxiv.org/abs/2205.14135;
    Ainslie et al., "GQA", https://arxiv.org/abs/2305.13245.
    """

    def __init__(self, causal: bool = False, dropout: float = 0.0, flash: bool = True, scale: Optional[float] = None):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"[FlashAttention] expected 0 <= dropout < 1, got {dropout}")
        check_positive("FlashAttention", "scale", scale, optional=True)
        self.causal = causal
        self.dropout = dropout
        self.flash = flash
        self.scale = scale

    def __call__(self, q: mx.array, k: mx.array, v: mx.array, mask: Optional[mx.array] = None,
                 attn_bias: Optional[mx.array] = None, causal: Optional[bool] = None) -> mx.array:
        """Attend; ``causal`` (if given) overrides the constructor's setting for this call."""
        return self._forward(q, k, v, mask, attn_bias, causal, need_weights=False)[0]

    def with_weights(self, q: mx.array, k: mx.array, v: mx.array, mask: Optional[mx.array] = None,
                     attn_bias: Optional[mx.array] = None, causal: Optional[bool] = None) -> Tuple[mx.array, mx.array]:
        """Like ``__call__`` but also return the attention probabilities (after dropout),
        shape :math:`(B, H, L_q, L_k)`; always the explicit path."""
        return self._forward(q, k, v, mask, attn_bias, causal, need_weights=True)

    def _forward(self, q, k, v, mask, attn_bias, causal, need_weights):
        self._check_qkv(q, k, v)
        causal = self.causal if causal is None else causal
        drop = self.dropout if self.training else 0.0
        position = attn_bias if isinstance(attn_bias, PositionBias) else None
        fused = not need_weights and drop == 0 and self._fused_applies(q, k, v, mask, attn_bias, causal)
        if position is not None:  # O(L) bias data: computed in the kernel, else materialised here
            attn_bias = None if fused else position.materialize(q.shape[2], k.shape[2])
        mask, keep = self._build_mask(q, k, mask, attn_bias, causal and not fused)
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        if fused:  # causal masking and position biases applied in the kernel: no (q_len, k_len) array
            p = position or PositionBias()
            out, weights = fused_kernels.fused_attention(q, k, v, scale=scale, causal=causal, mask=mask, alibi_slopes=p.alibi_slopes,
                                           t5_table=p.t5_table, t5_buckets=p.t5_buckets), None
        elif need_weights or drop > 0:
            out, weights = self._explicit(q, k, v, scale, mask, drop)
        else:
            out, weights = self._dispatch(q, k, v, scale, mask), None
        if keep is not None:
            out = mx.where(keep, out, 0)
            weights = None if weights is None else mx.where(keep, weights, 0)
        return out, weights

    def _fused_applies(self, q: mx.array, k: mx.array, v: mx.array, mask, attn_bias, causal: bool) -> bool:
        """Route to :func:`mlx_zeta.kernels.fused_attention` where it adds something, when the
        kernel dispatcher has a kernel path live (:func:`~mlx_zeta.kernels.kernels_active`: Metal,
        CUDA, or their CPU emulation) and the kernels take these shapes: a :class:`PositionBias`
        (computed in the kernel), or causal attention with a mask or bias beside it or
        ``q_len > k_len`` (mx.fast needs a combined ``(q_len, k_len)`` mask there)."""
        if not self.flash:
            return False
        adds = isinstance(attn_bias, PositionBias) or (
            causal and (mask is not None or attn_bias is not None or q.shape[2] > k.shape[2]))
        return adds and kernels_active() and fused_kernels.kernel_supports(q, k, v)

    def _dispatch(self, q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Mask) -> mx.array:
        """Everything the fused kernels do not take: MLX's own fused SDPA, or the explicit softmax."""
        if self.flash:
            if isinstance(mask, str) and q.shape[2] > CPU_CAUSAL_BLOCK and mx.default_device() == mx.cpu:
                return _causal_blocks(q, k, v, scale)
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        return self._explicit(q, k, v, scale, mask, 0.0)[0]

    @staticmethod
    def _explicit(q, k, v, scale, mask, dropout):
        """softmax(s QK^T + mask) V without tiling k/v: query heads are grouped per kv head."""
        b, h, lq, d = q.shape
        hk, lk = k.shape[1], k.shape[2]
        g = h // hk
        qg = (q * scale).reshape(b, hk, g, lq, d)
        scores = qg @ k[:, :, None].swapaxes(-1, -2)  # (b, hk, g, lq, lk)
        if isinstance(mask, str):
            mask = _causal_mask(lq, lk)
        if mask is not None:
            m = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
            m = m[:, :, None] if m.shape[1] == 1 else m.reshape(m.shape[0], hk, g, *m.shape[2:])
            scores = mx.where(m, scores, -mx.inf) if m.dtype == mx.bool_ else scores + m
        p = mx.softmax(scores, axis=-1, precise=True)
        if dropout > 0:
            p = p * mx.random.bernoulli(1.0 - dropout, p.shape) / (1.0 - dropout)
        out = (p @ v[:, :, None]).reshape(b, h, lq, v.shape[-1])
        return out, p.reshape(b, h, lq, lk)

    def _check_qkv(self, q, k, v):
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.ndim != 4:
                who = "heads" if name == "q" else "kv_heads"
                raise ValueError(f"[FlashAttention] expected {name} of shape (batch, {who}, seq, dim), got shape {tuple(t.shape)}")
        if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
            raise ValueError(f"[FlashAttention] expected k of shape ({q.shape[0]}, kv_heads, k_len, {q.shape[3]}) "
                             f"to match q {tuple(q.shape)}, got shape {tuple(k.shape)}")
        if v.shape[:3] != k.shape[:3]:
            raise ValueError(f"[FlashAttention] expected v of shape {tuple(k.shape[:3])} + (dim_v,) to match k, "
                             f"got shape {tuple(v.shape)}")
        if q.shape[1] % k.shape[1]:
            raise ValueError(f"[FlashAttention] expected kv_heads to divide heads, got heads={q.shape[1]}, kv_heads={k.shape[1]}")

    @staticmethod
    def _build_mask(q, k, mask, attn_bias, causal) -> Tuple[Mask, Optional[mx.array]]:
        """One mask for both paths, and ``keep`` (rows with an attendable key) or None."""
        b, h, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        target = (b, h, lq, lk)
        if mask is not None:
            if mask.dtype != mx.bool_ and not mx.issubdtype(mask.dtype, mx.floating):
                raise ValueError(f"[FlashAttention] expected a boolean or floating mask, got dtype {mask.dtype}")
            if mask.ndim == 2:
                if mask.shape[0] not in (1, b) or mask.shape[1] != lk:
                    raise ValueError(f"[FlashAttention] expected a key-padding mask of shape ({b}, {lk}) (batch, k_len), "
                                     f"got shape {tuple(mask.shape)}")
                mask = mask[:, None, None, :]
            elif mask.ndim not in (3, 4) or not _broadcastable(mask.shape, target):
                raise ValueError(f"[FlashAttention] expected mask of shape ({b}, {lk}) or broadcastable to {target}, "
                                 f"got shape {tuple(mask.shape)}")
        if attn_bias is not None and (attn_bias.ndim < 2 or not _broadcastable(attn_bias.shape, target)
                                      or not mx.issubdtype(attn_bias.dtype, mx.floating)):
            raise ValueError(f"[FlashAttention] expected a floating attn_bias broadcastable to {target}, "
                             f"got shape {tuple(attn_bias.shape)} and dtype {attn_bias.dtype}")
        if causal:
            if mask is None and attn_bias is None and lq <= lk:  # one query at the end sees every key: no mask
                return ("causal" if lq > 1 else None), None
            c = _causal_mask(lq, lk)
            if mask is None:
                mask = c
            else:
                mask = mask & c if mask.dtype == mx.bool_ else mx.where(c, mask, -mx.inf)
        if attn_bias is not None:
            if mask is None:
                mask = attn_bias
            else:
                mask = mx.where(mask, attn_bias, -mx.inf) if mask.dtype == mx.bool_ else mask + attn_bias
        if mask is None:
            return None, None
        if mask.dtype == mx.bool_:
            keep = mask.any(axis=-1, keepdims=True)
            return mask | ~keep, keep
        mask = mask.astype(q.dtype)
        keep = (mask > -mx.inf).any(axis=-1, keepdims=True)
        return mx.where(keep, mask, 0), keep


def _and_cache_mask(mask: Optional[mx.array], implied: mx.array) -> mx.array:
    """The caller's mask (key padding, broadcastable boolean or additive) restricted to the
    keys a cache's ``(n, k_len)`` boolean mask lets each query see; (B or 1, H or 1, n, k_len)."""
    implied = implied[None, None]
    if mask is None:
        return implied
    if mask.ndim == 2:
        mask = mask[:, None, None, :]
    return mask & implied if mask.dtype == mx.bool_ else mx.where(implied, mask, -mx.inf)


def attention_heads(p: Mapping, q: mx.array, k: mx.array, v: mx.array, *, heads: int, kv_heads: int, dim_head: int,
                    attend: "FlashAttention", mask: Optional[mx.array] = None, attn_bias: Optional[mx.array] = None,
                    cache: Optional[Cache] = None,
                    rotary_pos_emb: Optional[Tuple[mx.array, Union[mx.array, float]]] = None,
                    qk_norm_eps: float = 1e-5) -> mx.array:
    """:class:`Attention`'s math from projected ``q`` (B, L, H*D), ``k``, ``v`` (B, L_k, H_kv*D)
    to the output projection ``p["to_out"]``; ``p`` is the block itself or a dict of its
    parameters (then ``q_norm``/``k_norm`` get ``mlx.nn.RMSNorm``'s math with ``qk_norm_eps``).
    Shared by the block and :func:`mlx_zeta.functional.multi_head_attention`."""
    b, n = q.shape[0], q.shape[1]
    q = q.reshape(b, n, heads, dim_head).transpose(0, 2, 1, 3)
    k = k.reshape(b, -1, kv_heads, dim_head).transpose(0, 2, 1, 3)
    v = v.reshape(b, -1, kv_heads, dim_head).transpose(0, 2, 1, 3)
    if "q_norm" in p:
        q, k = (norm(t) if isinstance(norm, nn.Module) else mx.fast.rms_norm(t, norm["weight"], qk_norm_eps)
                for norm, t in ((p["q_norm"], q), (p["k_norm"], k)))
    if rotary_pos_emb is not None:
        freqs, scale = rotary_pos_emb
        q = apply_rotary_pos_emb(q, freqs, scale)
        k = apply_rotary_pos_emb(k, freqs, scale**-1)
    causal = None  # the block's own (bottom-right aligned) causal masking
    if cache is not None:
        implied = cache.make_mask(n, causal=attend.causal)  # asked before the update moves the offset
        k, v = cache.update_and_fetch(k, v)
        if isinstance(implied, mx.array):  # the cache masks by position: its mask replaces the alignment
            mask, causal = _and_cache_mask(mask, implied), False
    out = attend(q, k, v, mask=mask, attn_bias=attn_bias, causal=causal)  # (b, heads, n, dim_head)
    return affine(p["to_out"], out.transpose(0, 2, 1, 3).reshape(b, n, -1))


class Attention(nn.Module):
    r"""Multi-head attention with optional grouped / multi-query key-value heads.

    .. math::

        Q = x W_q,\ K = c W_k,\ V = c W_v,\quad
        \text{out} = \text{concat}_h\big(\text{softmax}(Q_h K_{g(h)}^T / \sqrt{d} + B + M) V_{g(h)}\big) W_o

    with :math:`c = x` (self-attention) or ``context`` (cross-attention). With
    ``qk_norm`` every query and key head is RMS-normalized over the head dimension
    before the scores.

    Incremental decoding: pass a cache (:class:`KVCache`, :class:`~mlx_zeta.nn.RotatingKVCache`,
    :class:`~mlx_zeta.nn.StaticKVCache`); the new keys/values are stored in it in place and
    the queries attend to the keys it returns, masked as its
    :meth:`~mlx_zeta.nn.cache.Cache.make_mask` says (with ``causal``, bottom-right aligned
    or by position, so token-by-token decoding equals a full causal forward).

    Rotary positions: ``rotary_pos_emb=(freqs, scale)`` from
    :class:`~mlx_zeta.nn.RotaryEmbedding` for the new positions rotates the query
    and key heads (after ``qk_norm``, before the cache update, so cached keys stay
    rotated); keys get the xPos scale :math:`s^{-1}`. Self-attention only.

    Args:
        dim (int): model (input and output) dimension.
        heads (int): query heads. Default: ``8``.
        dim_head (int, optional): per-head dimension. Default: ``dim // heads``.
        kv_heads (int, optional): key/value heads, must divide ``heads``. Default: ``heads``.
        causal (bool): causal masking. Default: ``False``.
        qk_norm (bool): RMSNorm on query and key heads. Default: ``False``.
        bias (bool): biases on the projections. Default: ``False``.
        dropout (float): attention-probability dropout in training. Default: ``0.0``.
        flash (bool): fused ``mx.fast`` kernel where possible. Default: ``True``.
        out_bias (bool, optional): bias on the output projection alone (e.g. Qwen2: biases on
            q/k/v, none on the output). Default: ``bias``.
        scale (float, optional): score scale :math:`s` in place of :math:`1/\sqrt{d}` (T5 uses 1).
            Default: ``None``.
        qk_norm_eps (float): epsilon of the ``qk_norm`` RMSNorms,
            :math:`x / \sqrt{\overline{x^2} + \epsilon} \odot \gamma`. Default: ``1e-5``.

    Shape:
        - x: :math:`(B, L, \text{dim})`; context: :math:`(B, L_c, \text{dim})`.
        - mask, attn_bias: as in :class:`FlashAttention`, with :math:`L_k` the key length
          (cached positions included).
        - rotary_pos_emb: ``freqs`` :math:`(L, d)` (:math:`d \le` ``dim_head``) and ``scale``
          :math:`(L, d)` or a float.
        - output: :math:`(B, L, \text{dim})`.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.nn import Attention
        >>> attn = Attention(dim=64, heads=8, kv_heads=2, causal=True)
        >>> attn(mx.random.normal((2, 10, 64))).shape
        (2, 10, 64)

    Reference: Vaswani et al., "Attention Is All You Need", https://arxiv.org/abs/1706.03762.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: Optional[int] = None, kv_heads: Optional[int] = None,
                 causal: bool = False, qk_norm: bool = False, bias: bool = False, dropout: float = 0.0, flash: bool = True,
                 out_bias: Optional[bool] = None, scale: Optional[float] = None, qk_norm_eps: float = 1e-5):
        super().__init__()
        name = type(self).__name__
        if dim < 1 or heads < 1:
            raise ValueError(f"[{name}] expected dim >= 1 and heads >= 1, got dim={dim}, heads={heads}")
        if dim_head is None:
            if dim % heads:
                raise ValueError(f"[{name}] expected heads to divide dim when dim_head is None, got dim={dim}, heads={heads}")
            dim_head = dim // heads
        kv_heads = heads if kv_heads is None else kv_heads
        if kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"[{name}] expected kv_heads to divide heads, got heads={heads}, kv_heads={kv_heads}")
        self.dim, self.heads, self.dim_head, self.kv_heads = dim, heads, dim_head, kv_heads
        self.to_q = nn.Linear(dim, heads * dim_head, bias=bias)
        self.to_k = nn.Linear(dim, kv_heads * dim_head, bias=bias)
        self.to_v = nn.Linear(dim, kv_heads * dim_head, bias=bias)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=bias if out_bias is None else out_bias)
        if qk_norm:
            self.q_norm = nn.RMSNorm(dim_head, eps=qk_norm_eps)
            self.k_norm = nn.RMSNorm(dim_head, eps=qk_norm_eps)
        self.qk_norm = qk_norm
        self.attend = FlashAttention(causal=causal, dropout=dropout, flash=flash, scale=scale)

    def __call__(self, x: mx.array, context: Optional[mx.array] = None, mask: Optional[mx.array] = None,
                 attn_bias: Optional[mx.array] = None, cache: Optional[Cache] = None,
                 rotary_pos_emb: Optional[Tuple[mx.array, Union[mx.array, float]]] = None) -> mx.array:
        name = type(self).__name__
        for what, t in (("x", x), ("context", context)):
            if t is not None and (t.ndim != 3 or t.shape[-1] != self.dim):
                raise ValueError(f"[{name}] expected {what} of shape (batch, seq, {self.dim}), got shape {tuple(t.shape)}")
        if context is not None and context.shape[0] != x.shape[0]:
            raise ValueError(f"[{name}] expected context batch {x.shape[0]}, got shape {tuple(context.shape)}")
        if context is not None and cache is not None:
            raise ValueError(f"[{name}] expected cache only for self-attention (context=None), got both")
        if rotary_pos_emb is not None and (context is not None or not isinstance(rotary_pos_emb, tuple)
                                           or len(rotary_pos_emb) != 2):
            raise ValueError(f"[{name}] expected rotary_pos_emb=(freqs, scale) for self-attention (context=None), "
                             f"got {type(rotary_pos_emb).__name__} with context={'set' if context is not None else None}")
        q, k, v = self._project(x, x if context is None else context)
        return attention_heads(self, q, k, v, heads=self.heads, kv_heads=self.kv_heads, dim_head=self.dim_head,
                               attend=self.attend, mask=mask, attn_bias=attn_bias, cache=cache,
                               rotary_pos_emb=rotary_pos_emb)

    def _project(self, x: mx.array, c: mx.array) -> Tuple[mx.array, mx.array, mx.array]:
        return self.to_q(x), self.to_k(c), self.to_v(c)


MultiheadAttention = Attention


def _reject(name: str, kwargs: dict, hint: str) -> None:
    if kwargs:
        raise ValueError(f"[{name}] unknown keyword argument(s) {sorted(kwargs)}; {hint}")


def _one_of(owner: str, name: str, value: Optional[int], zeta_name: str, zeta_value: Optional[int]) -> int:
    """A keyword that zeta spells another way (``dim`` / ``d_model``): exactly one of the two must be given."""
    if (value is None) == (zeta_value is None):
        given = "both" if value is not None else "neither"
        raise ValueError(f"[{owner}] expected one of {name}= or {zeta_name}= (zeta's spelling), got {given}")
    return value if value is not None else zeta_value


class MultiQueryAttention(Attention):
    r"""Multi-query self-attention: every query head shares one key/value head.

    :class:`Attention` with ``kv_heads=1`` and zeta's (MPT's) options: scores
    :math:`\text{softmax\_scale}\cdot Q K^T`, projections clipped to
    :math:`[-\text{clip\_qkv}, \text{clip\_qkv}]`, and ``qk_ln`` normalizing queries and
    keys (RMSNorm over the head dimension). Unlike zeta, it returns the output only
    (not ``(output, attn_weights, past_key_value)``), is causal by the constructor's
    ``causal`` rather than per call, and caches through a :class:`KVCache`.

    Args:
        dim (int): model dimension; also taken as ``d_model=`` (zeta's name before September 2024).
        heads (int): query heads, must divide ``dim``. Default: ``8``.
        clip_qkv (float, optional): clamp q, k, v to this magnitude. Default: ``None``.
        qk_ln (bool): normalize query and key heads. Default: ``False``.
        softmax_scale (float, optional): score scale. Default: ``1 / sqrt(dim / heads)``.
        attn_pdrop (float): attention-probability dropout in training. Default: ``0.0``.
        causal (bool): causal masking (zeta's call default). Default: ``True``.
        bias (bool): projection biases (zeta's ``nn.Linear`` default). Default: ``True``.
        flash (bool): fused kernel where possible. Default: ``True``.

    Shape:
        - x: :math:`(B, L, \text{dim})`; output: same. ``mask``/``attn_bias``/``cache`` as in :class:`Attention`.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.nn import MultiQueryAttention
        >>> mqa = MultiQueryAttention(dim=64, heads=8)
        >>> mqa(mx.random.normal((2, 10, 64))).shape
        (2, 10, 64)

    Reference: Shazeer, "Fast Transformer Decoding: One Write-Head is All You Need",
    https://arxiv.org/abs/1911.02150.
    """

    def __init__(self, dim: Optional[int] = None, heads: int = 8, clip_qkv: Optional[float] = None,
                 qk_ln: bool = False, softmax_scale: Optional[float] = None, attn_pdrop: float = 0.0,
                 causal: bool = True, bias: bool = True, flash: bool = True, d_model: Optional[int] = None,
                 **kwargs: Any):
        _reject("MultiQueryAttention", kwargs, "zeta's attn_impl/norm_type/fc_type/verbose/device have no MLX meaning")
        d_model = _one_of("MultiQueryAttention", "dim", dim, "d_model", d_model)
        if d_model % max(heads, 1):
            raise ValueError(f"[MultiQueryAttention] expected heads to divide dim, got dim={d_model}, heads={heads}")
        check_positive("MultiQueryAttention", "clip_qkv", clip_qkv, optional=True)
        super().__init__(dim=d_model, heads=heads, kv_heads=1, causal=causal, qk_norm=qk_ln, bias=bias,
                         dropout=attn_pdrop, flash=flash)
        self.clip_qkv = clip_qkv
        if softmax_scale is not None:
            self.attend = FlashAttention(causal=causal, dropout=attn_pdrop, flash=flash, scale=softmax_scale)

    def _project(self, x: mx.array, c: mx.array) -> Tuple[mx.array, mx.array, mx.array]:
        q, k, v = super()._project(x, c)
        if self.clip_qkv is not None:
            q, k, v = (mx.clip(t, -self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        return q, k, v


class MultiGroupedQueryAttn(nn.Module):
    r"""Grouped-query attention with MAGNETO's sub-LayerNorm before the output projection.

    .. math::

        \text{out} = \text{LN}\Big(\text{concat}_h\,\text{softmax}\big(Q_h K_{g(h)}^T/\sqrt{d_h} + M\big)
        V_{g(h)}\Big) W_o,\quad g(h) = \lfloor h\, H_{kv} / H \rfloor

    Keeps zeta's arguments and call, with its bugs fixed: the scale is
    :math:`1/\sqrt{d_h}` (zeta divides by :math:`\sqrt{d_h}` twice), each query head
    attends with its own group's key/value head (zeta sums the scores of a group,
    which makes its output and ``out_proj`` ``kv_dim`` wide), ``attn_mask`` works, and
    dropout acts only in training. Weights use Xavier-normal initialization with gain
    ``gamma_init`` on ``v_proj`` and ``out_proj`` and zero biases, as in zeta.

    Args:
        dim (int): model dimension.
        heads (int): query heads, must divide ``dim``; also taken as ``query_heads=`` (zeta's name).
        kv_heads (int): key/value heads, must divide ``heads``.
        dropout (float): attention-probability dropout in training. Default: ``0.0``.
        bias (bool): projection biases. Default: ``True``.
        layer_norm (bool): LayerNorm before ``out_proj``. Default: ``True``.
        layer_norm_eps (float): its epsilon. Default: ``1e-5``.
        gamma_init (float): Xavier gain of ``v_proj`` and ``out_proj``. Default: ``1.0``.
        linear_groups (int): only ``1`` (plain projections) is supported. Default: ``1``.

    Call ``(query, key, value, need_weights=False, is_causal=False, average_attn_weights=False, attn_mask=None)``
    returns ``(output, weights)``: ``weights`` is ``None`` unless ``need_weights``, then the
    attention probabilities :math:`(B, H, L_q, L_k)`, or their mean over heads
    :math:`(B, L_q, L_k)` with ``average_attn_weights`` (as ``torch.nn.MultiheadAttention``).

    Shape:
        - query: :math:`(B, L_q, \text{dim})`; key, value: :math:`(B, L_k, \text{dim})`.
        - attn_mask (bool True = attend, or additive): :math:`(B, L_k)`, :math:`(B, L_q, L_k)`
          or :math:`(B, H, L_q, L_k)`.
        - output: :math:`(B, L_q, \text{dim})`.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.nn import MultiGroupedQueryAttn
        >>> gqa = MultiGroupedQueryAttn(dim=64, heads=8, kv_heads=2)
        >>> x = mx.random.normal((2, 10, 64))
        >>> out, w = gqa(x, x, x, need_weights=True)
        >>> out.shape, w.shape
        ((2, 10, 64), (2, 8, 10, 10))

    Reference: Ainslie et al., "GQA", https://arxiv.org/abs/2305.13245; Wang et al.,
    "Foundation Transformers (MAGNETO)", https://arxiv.org/abs/2210.06423.
    """

    def __init__(self, dim: int, heads: Optional[int] = None, kv_heads: Optional[int] = None, dropout: float = 0.0,
                 bias: bool = True, layer_norm: bool = True, layer_norm_eps: float = 1e-5, gamma_init: float = 1.0,
                 linear_groups: int = 1, query_heads: Optional[int] = None, **kwargs: Any):
        super().__init__()
        _reject("MultiGroupedQueryAttn", kwargs, "device/dtype do not apply on MLX (use .set_dtype())")
        heads = _one_of("MultiGroupedQueryAttn", "heads", heads, "query_heads", query_heads)
        if kv_heads is None:
            raise ValueError("[MultiGroupedQueryAttn] expected kv_heads (key/value heads dividing heads), got none")
        if heads < 1 or kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"[MultiGroupedQueryAttn] expected kv_heads to divide heads, got heads={heads}, kv_heads={kv_heads}")
        if dim % heads:
            raise ValueError(f"[MultiGroupedQueryAttn] expected heads to divide dim, got dim={dim}, heads={heads}")
        if linear_groups != 1:
            raise ValueError(f"[MultiGroupedQueryAttn] expected linear_groups=1 (grouped projections are not supported), "
                             f"got {linear_groups}")
        self.dim, self.heads, self.kv_heads, self.head_dim = dim, heads, kv_heads, dim // heads
        kv_dim = kv_heads * self.head_dim
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, kv_dim, bias=bias)
        self.v_proj = nn.Linear(dim, kv_dim, bias=bias)
        if layer_norm:
            self.norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.layer_norm = layer_norm
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        for proj, gain in ((self.q_proj, 1.0), (self.k_proj, 1.0), (self.v_proj, gamma_init), (self.out_proj, gamma_init)):
            proj.weight = nn.init.glorot_normal()(proj.weight, gain=gain)
            if bias:
                proj.bias = mx.zeros_like(proj.bias)
        self.attend = FlashAttention(dropout=dropout)

    def __call__(self, query: mx.array, key: mx.array, value: mx.array, need_weights: bool = False,
                 is_causal: bool = False, average_attn_weights: bool = False,
                 attn_mask: Optional[mx.array] = None) -> Tuple[mx.array, Optional[mx.array]]:
        for what, t in (("query", query), ("key", key), ("value", value)):
            if t.ndim != 3 or t.shape[-1] != self.dim:
                raise ValueError(f"[MultiGroupedQueryAttn] expected {what} of shape (batch, seq, {self.dim}), "
                                 f"got shape {tuple(t.shape)}")
        if key.shape[:2] != value.shape[:2] or key.shape[0] != query.shape[0]:
            raise ValueError(f"[MultiGroupedQueryAttn] expected key and value of shape ({query.shape[0]}, k_len, {self.dim}), "
                             f"got {tuple(key.shape)} and {tuple(value.shape)}")
        b, n, s = query.shape[0], query.shape[1], key.shape[1]
        if attn_mask is not None and attn_mask.ndim == 3:
            if attn_mask.shape[0] not in (1, b) or attn_mask.shape[1:] != (n, s):
                raise ValueError(f"[MultiGroupedQueryAttn] expected a 3-D attn_mask of shape ({b}, {n}, {s}), "
                                 f"got shape {tuple(attn_mask.shape)}")
            attn_mask = attn_mask[:, None]
        q = self.q_proj(query).reshape(b, n, self.heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(key).reshape(b, s, self.kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(value).reshape(b, s, self.kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        if need_weights:
            x, weights = self.attend.with_weights(q, k, v, mask=attn_mask, causal=is_causal)
            if average_attn_weights:
                weights = weights.mean(axis=1)
        else:
            x, weights = self.attend(q, k, v, mask=attn_mask, causal=is_causal), None
        x = x.transpose(0, 2, 1, 3).reshape(b, n, self.dim)
        if self.layer_norm:
            x = self.norm(x)
        return self.out_proj(x), weights
