"""Positional encodings and attention biases: rotary (with xPos), ALiBi, T5 relative
position buckets, learned absolute and scaled sinusoidal embeddings."""

from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.common import check_int
from mlx_zeta.kernels.positions import PositionBias, relative_position_bucket, t5_relative_buckets

__all__ = [
    "RotaryEmbedding", "rotate_half", "apply_rotary_pos_emb", "AlibiPositionalBias",
    "RelativePositionBias", "AbsolutePositionalEmbedding", "ScaledSinusoidalEmbedding", "PositionBias",
]


class RotaryEmbedding(nn.Module):
    r"""Rotary position embedding (RoPE) angles, optionally with the xPos scale.

    For position :math:`p` and frequency :math:`\theta_i = b^{-2i/d}` the angle is
    :math:`p\,\theta_i / \lambda` (:math:`\lambda` the interpolation factor), laid out
    in the rotate-half order: the :math:`d/2` angles, then the same angles again.
    With ``use_xpos`` each frequency also gets the length-extrapolation scale

    .. math::

        \zeta_i = \frac{2i + 0.4 d}{1.4 d}, \qquad
        s_{p,i} = \zeta_i^{(p - c)/\gamma}

    where :math:`\gamma` is ``scale_base`` and :math:`c` a centre. Queries are
    multiplied by :math:`s` and keys by :math:`s^{-1}`, so the score between
    positions :math:`m, n` carries :math:`\zeta_i^{(m-n)/\gamma}` and still depends
    on :math:`m - n` only::

        q = apply_rotary_pos_emb(q, freqs, scale)
        k = apply_rotary_pos_emb(k, freqs, scale ** -1)

    Args:
        dim (int): Number of rotated features per head; must be even.
        use_xpos (bool): Also return the xPos scale. Default: ``False``.
        scale_base (float): xPos :math:`\gamma`. Default: ``512``.
        interpolation_factor (float): Position interpolation :math:`\lambda \ge 1`
            (positions are divided by it). Default: ``1.0``.
        base (float): Frequency base :math:`b`. Default: ``10000``.
        base_rescale_factor (float): NTK-aware rescale, the base becomes
            :math:`b \cdot r^{d/(d-2)}`. Default: ``1.0``.
        inv_freq (array, optional): The :math:`d/2` frequencies :math:`\theta_i` given
            directly (e.g. Llama 3's rescaled ones); replaces ``base`` and
            ``base_rescale_factor``. Default: ``None``.

    Call:
        ``rotary(seq_len, offset=0, center=None)`` returns ``(freqs, scale)`` for
        positions ``offset .. offset + seq_len - 1`` (``offset`` an int or an int32 scalar array). ``scale`` is ``1.0`` without
        xPos. The xPos centre :math:`c` defaults to ``(offset + seq_len) // 2``, the
        middle of the whole sequence so far (zeta's ``seq_len // 2`` at
        ``offset=0``), so the last ``seq_len`` rows of a full call are reproduced.
        For KV-cached decoding pass one fixed ``center`` at every step so that cached
        keys and new queries share it.

    Shape:
        - freqs: :math:`(L, d)`, float32.
        - scale: :math:`(L, d)`, float32, or the float ``1.0``.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.nn import RotaryEmbedding, apply_rotary_pos_emb
        >>> rotary = RotaryEmbedding(dim=32, use_xpos=True)
        >>> freqs, scale = rotary(16)
        >>> q = apply_rotary_pos_emb(mx.random.normal((2, 4, 16, 32)), freqs, scale)

    References:
        Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding",
        2021. Sun et al., "A Length-Extrapolatable Transformer", 2022 (xPos).
    """

    def __init__(
        self,
        dim: int,
        use_xpos: bool = False,
        scale_base: float = 512,
        interpolation_factor: float = 1.0,
        base: float = 10000,
        base_rescale_factor: float = 1.0,
        inv_freq: Optional[mx.array] = None,
    ):
        super().__init__()
        check_int("RotaryEmbedding", "dim", dim, 2)
        if dim % 2:
            raise ValueError(f"[RotaryEmbedding] expected an even dim, got {dim}")
        if interpolation_factor < 1:
            raise ValueError(f"[RotaryEmbedding] expected interpolation_factor >= 1, got {interpolation_factor}")
        if base <= 0 or base_rescale_factor <= 0 or scale_base <= 0:
            raise ValueError(
                f"[RotaryEmbedding] expected positive base, base_rescale_factor and scale_base, "
                f"got {base}, {base_rescale_factor}, {scale_base}"
            )
        if base_rescale_factor != 1.0:
            if dim == 2:
                raise ValueError("[RotaryEmbedding] base_rescale_factor needs dim > 2, got dim 2")
            base = base * base_rescale_factor ** (dim / (dim - 2))
        self.dim = dim
        self.use_xpos = use_xpos
        self.scale_base = scale_base
        self.interpolation_factor = interpolation_factor
        self.base = base
        even = mx.arange(0, dim, 2, dtype=mx.float32)
        if inv_freq is not None:
            inv_freq = mx.array(inv_freq, dtype=mx.float32)
            if inv_freq.shape != (dim // 2,):
                raise ValueError(f"[RotaryEmbedding] expected inv_freq of shape ({dim // 2},), got {tuple(inv_freq.shape)}")
        self._inv_freq = 1.0 / (base ** (even / dim)) if inv_freq is None else inv_freq  # (d/2,)
        if use_xpos:
            self._xpos_zeta = (even + 0.4 * dim) / (1.4 * dim)  # (d/2,)

    def __call__(
        self, seq_len: int, offset: int = 0, center: Optional[int] = None
    ) -> Tuple[mx.array, Union[mx.array, float]]:
        check_int("RotaryEmbedding", "seq_len", seq_len, 1)
        if isinstance(offset, mx.array):  # a traced position (StaticKVCache): same graph every step
            pos = offset.astype(mx.float32) + mx.arange(seq_len, dtype=mx.float32)  # (L,)
        else:
            check_int("RotaryEmbedding", "offset", offset, 0)
            pos = mx.arange(offset, offset + seq_len, dtype=mx.float32)  # (L,)
        angles = (pos / self.interpolation_factor)[:, None] * self._inv_freq  # (L, d/2)
        freqs = mx.concatenate([angles, angles], axis=-1)
        if not self.use_xpos:
            return freqs, 1.0
        if center is None:
            center = (offset + seq_len) // 2
        power = (pos - center) / self.scale_base  # (L,)
        scale = self._xpos_zeta ** power[:, None]  # (L, d/2)
        return freqs, mx.concatenate([scale, scale], axis=-1)


def rotate_half(x: mx.array) -> mx.array:
    r"""Rotate feature pairs :math:`(x_i, x_{i+d/2})` by 90 degrees: ``[-x2, x1]``."""
    if x.shape[-1] % 2:
        raise ValueError(f"[rotate_half] expected an even last dim, got {x.shape[-1]}")
    x1, x2 = mx.split(x, 2, axis=-1)
    return mx.concatenate([-x2, x1], axis=-1)


def apply_rotary_pos_emb(t: mx.array, freqs: mx.array, scale: Union[mx.array, float] = 1.0) -> mx.array:
    r"""Rotate ``t`` by the angles ``freqs`` (half-rotation convention).

    .. math::

        \mathrm{out} = \big(t \cos\phi + \mathrm{rotate\_half}(t) \sin\phi\big)\, s

    Only the first ``freqs.shape[-1]`` features are rotated; the rest pass through
    (partial rotary). When ``t`` is shorter than ``freqs`` along the sequence, the
    last rows of ``freqs`` (and of an array ``scale``) are used, so queries of a
    decoding step align with the end of the keys. Pass ``scale ** -1`` for xPos keys.
    The result has ``t``'s dtype.

    Args:
        t (array): Queries or keys, :math:`(..., L, D)`.
        freqs (array): Angles from :class:`RotaryEmbedding`, :math:`(L', d)`,
            :math:`L' \ge L`, :math:`d \le D`, :math:`d` even.
        scale (array or float): xPos scale :math:`(L', d)` or a float. Default: ``1.0``.
    """
    if t.ndim < 2:
        raise ValueError(f"[apply_rotary_pos_emb] expected t of rank >= 2 (..., seq, dim), got shape {t.shape}")
    if freqs.ndim != 2:
        raise ValueError(f"[apply_rotary_pos_emb] expected freqs of shape (seq, dim), got {freqs.shape}")
    seq_len, rot_dim = t.shape[-2], freqs.shape[-1]
    if rot_dim % 2 or rot_dim > t.shape[-1]:
        raise ValueError(
            f"[apply_rotary_pos_emb] expected an even freqs dim <= t's last dim {t.shape[-1]}, got {rot_dim}"
        )
    if freqs.shape[0] < seq_len:
        raise ValueError(f"[apply_rotary_pos_emb] freqs cover {freqs.shape[0]} positions, t has {seq_len}")
    freqs = freqs[-seq_len:]
    if isinstance(scale, mx.array):
        if scale.ndim >= 2 and (scale.shape[-1] != rot_dim or scale.shape[-2] < seq_len):
            raise ValueError(f"[apply_rotary_pos_emb] expected scale (>= {seq_len}, {rot_dim}), got {scale.shape}")
        scale = (scale[..., -seq_len:, :] if scale.ndim >= 2 else scale).astype(t.dtype)
    rot, rest = t[..., :rot_dim], t[..., rot_dim:]
    cos, sin = mx.cos(freqs).astype(t.dtype), mx.sin(freqs).astype(t.dtype)
    out = rot * cos + rotate_half(rot) * sin
    if not (isinstance(scale, float) and scale == 1.0):  # xPos; a plain rotation skips the multiply by 1
        out = out * scale
    return mx.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


class AlibiPositionalBias(nn.Module):
    r"""ALiBi: a fixed linear attention bias per head.

    .. math::

        B_{h, i, j} = -m_h\, |j - (i + J - I)|

    for :math:`I` queries and :math:`J` keys: the queries are the *last* :math:`I`
    positions of the keys (bottom-right alignment, as in KV-cached decoding). For
    :math:`n` a power of two the slopes are :math:`m_h = 2^{-8h/n}`, :math:`h=1..n`;
    otherwise the :math:`p = 2^{\lfloor\log_2 n\rfloor}` slopes for :math:`p` heads
    followed by every other slope of :math:`2p` heads, the first :math:`n - p`.
    Heads beyond ``heads`` (up to ``total_heads``) get a zero bias.

    Args:
        heads (int): Heads that get an ALiBi bias.
        total_heads (int, optional): All heads of the attention; defaults to ``heads``.
        num_heads (int, optional): zeta's name for ``total_heads``.

    Shape:
        - Output: :math:`(\text{total\_heads}, I, J)`, float32; add it to the scores.

    Example:
        >>> from mlx_zeta.nn import AlibiPositionalBias
        >>> alibi = AlibiPositionalBias(heads=4, total_heads=8)
        >>> alibi(3, 5).shape
        (8, 3, 5)

    Reference:
        Press et al., "Train Short, Test Long: Attention with Linear Biases Enables
        Input Length Extrapolation", 2021.
    """

    def __init__(self, heads: int, total_heads: Optional[int] = None, num_heads: Optional[int] = None):
        super().__init__()
        check_int("AlibiPositionalBias", "heads", heads, 1)
        if total_heads is not None and num_heads is not None and total_heads != num_heads:
            raise ValueError(f"[AlibiPositionalBias] total_heads {total_heads} and num_heads {num_heads} disagree")
        total = total_heads if total_heads is not None else num_heads if num_heads is not None else heads
        check_int("AlibiPositionalBias", "total_heads", total, heads)
        self.heads = heads
        self.total_heads = total
        self._slopes = mx.array(self._get_slopes(heads), dtype=mx.float32)

    @staticmethod
    def _get_slopes(heads: int) -> List[float]:
        """The paper's slopes for ``heads`` heads (Python floats)."""

        def power_of_two(n: int) -> List[float]:
            return [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]

        if heads & (heads - 1) == 0:
            return power_of_two(heads)
        closest = 2 ** int(math.floor(math.log2(heads)))
        return power_of_two(closest) + power_of_two(2 * closest)[0::2][: heads - closest]

    def __call__(self, i: int, j: int) -> mx.array:
        check_int("AlibiPositionalBias", "i", i, 1)
        check_int("AlibiPositionalBias", "j", j, 1)
        q_pos = mx.arange(j - i, j)[:, None]  # (I, 1)
        k_pos = mx.arange(j)[None, :]  # (1, J)
        dist = mx.abs(k_pos - q_pos).astype(mx.float32)  # (I, J)
        bias = -self._slopes[:, None, None] * dist  # (heads, I, J)
        pad = self.total_heads - self.heads
        if pad:
            bias = mx.concatenate([bias, mx.zeros((pad, i, j), dtype=bias.dtype)], axis=0)
        return bias

    def position_bias(self) -> PositionBias:
        """The same bias as :math:`O(H)` data: :class:`~mlx_zeta.kernels.PositionBias` with the
        slopes of the ``heads`` ALiBi heads and zeros for the other ``total_heads - heads``;
        ``position_bias().materialize(i, j)`` equals ``self(i, j)``."""
        pad = self.total_heads - self.heads
        slopes = mx.concatenate([self._slopes, mx.zeros((pad,))]) if pad else self._slopes
        return PositionBias(alibi_slopes=slopes)


class RelativePositionBias(nn.Module):
    r"""T5's learned relative position bias over log-spaced buckets.

    The key-minus-query offset :math:`r = j - i` is bucketed: with ``bidirectional``
    half the buckets hold :math:`r > 0`; inside a half of :math:`N` buckets, distances
    :math:`n < N/2` get their own bucket and larger ones

    .. math::

        N/2 + \Big\lfloor \frac{\ln(n / (N/2))}{\ln(D / (N/2))} (N - N/2) \Big\rfloor,

    capped at :math:`N - 1` (:math:`D` is ``max_distance``). Unidirectional uses
    :math:`n = \max(-r, 0)` and all buckets. Each bucket has a learned bias per head
    (``relative_attention_bias``, an ``nn.Embedding(num_buckets, num_heads)``).

    Args:
        bidirectional (bool): Encoder-style (both directions). Default: ``True``.
        num_buckets (int): Number of buckets :math:`N`. Default: ``32``.
        max_distance (int): Distance :math:`D` at which the last bucket starts. Default: ``128``.
        num_heads (int): Number of heads. Default: ``1``.

    Call:
        ``bias(batch_size, qlen, klen, step=None)``; ``step`` is the absolute position
        of the first query (KV-cached decoding), default 0.

    Shape:
        - Output: :math:`(\text{batch\_size}, \text{num\_heads}, \text{qlen}, \text{klen})`.

    Example:
        >>> from mlx_zeta.nn import RelativePositionBias
        >>> bias = RelativePositionBias(num_buckets=32, max_distance=128, num_heads=8)
        >>> bias(2, 10, 10).shape
        (2, 8, 10, 10)

    Reference:
        Raffel et al., "Exploring the Limits of Transfer Learning with a Unified
        Text-to-Text Transformer", 2019 (T5).
    """

    def __init__(self, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128, num_heads: int = 1):
        super().__init__()
        check_int("RelativePositionBias", "num_buckets", num_buckets, 2 if not bidirectional else 4)
        check_int("RelativePositionBias", "num_heads", num_heads, 1)
        half = num_buckets // 2 if bidirectional else num_buckets
        if max_distance <= half // 2:
            raise ValueError(
                f"[RelativePositionBias] expected max_distance > {half // 2} (the exact buckets), got {max_distance}"
            )
        self.bidirectional = bool(bidirectional)
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.num_heads = num_heads
        self.relative_attention_bias = nn.Embedding(num_buckets, num_heads)

    def compute_bias(self, qlen: int, klen: int, step: Optional[int] = None) -> mx.array:
        """Bias of shape (1, num_heads, qlen, klen)."""
        check_int("RelativePositionBias", "qlen", qlen, 1)
        check_int("RelativePositionBias", "klen", klen, 1)
        step = 0 if step is None else step
        check_int("RelativePositionBias", "step", step, 0)
        context = mx.arange(step, step + qlen)[:, None]
        memory = mx.arange(klen)[None, :]
        rel = memory - context  # (qlen, klen)
        buckets = relative_position_bucket(rel, self.bidirectional, self.num_buckets, self.max_distance)
        values = self.relative_attention_bias(buckets)  # (qlen, klen, heads)
        return values.transpose(2, 0, 1)[None]

    def position_bias(self, qlen: int, klen: int, step: Optional[int] = None) -> PositionBias:
        """The same bias as :math:`O(L)` data: :class:`~mlx_zeta.kernels.PositionBias` with this
        layer's table and the buckets of the ``qlen + klen - 1`` offsets;
        ``position_bias(qlen, klen, step).materialize(qlen, klen)`` equals ``compute_bias(...)[0]``."""
        step = 0 if step is None else step
        buckets = t5_relative_buckets(qlen, klen, bidirectional=self.bidirectional, num_buckets=self.num_buckets,
                                      max_distance=self.max_distance, step=step)
        return PositionBias(t5_table=self.relative_attention_bias.weight, t5_buckets=buckets)

    def __call__(self, batch_size: int, qlen: int, klen: int, step: Optional[int] = None) -> mx.array:
        check_int("RelativePositionBias", "batch_size", batch_size, 1)
        bias = self.compute_bias(qlen, klen, step)
        return mx.broadcast_to(bias, (batch_size, self.num_heads, qlen, klen))


def _seq_len_of(owner: str, x: mx.array) -> int:
    if x.ndim not in (2, 3):
        raise ValueError(f"[{owner}] expected x of shape (batch, seq) or (batch, seq, dim), got {x.shape}")
    return x.shape[1]


class AbsolutePositionalEmbedding(nn.Module):
    r"""Learned absolute position embedding.

    .. math::

        e_p = d^{-1/2} E_p \quad\text{or, with l2norm\_embed,}\quad e_p = E_p / \lVert E_p \rVert_2

    Args:
        dim (int): Embedding size :math:`d`.
        max_seq_len (int): Number of positions.
        l2norm_embed (bool): L2-normalise instead of scaling. Default: ``False``.

    Call:
        ``pos_emb(x, pos=None)``: ``x`` is token ids :math:`(B, L)` or embeddings
        :math:`(B, L, D)`, only its length :math:`L` is used; ``pos`` optional integer
        positions (default ``0..L-1``), which must be ``< max_seq_len``.

    Shape:
        - Output: :math:`(L, d)`, or ``pos.shape + (d,)``.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.nn import AbsolutePositionalEmbedding
        >>> pos_emb = AbsolutePositionalEmbedding(dim=64, max_seq_len=128)
        >>> pos_emb(mx.zeros((2, 10), dtype=mx.int32)).shape
        (10, 64)

    Reference:
        Vaswani et al., "Attention Is All You Need", 2017; l2norm from Wang et al.,
        "Transformers without Tears", 2019 (via x-transformers).
    """

    def __init__(self, dim: int, max_seq_len: int, l2norm_embed: bool = False):
        super().__init__()
        check_int("AbsolutePositionalEmbedding", "dim", dim, 1)
        check_int("AbsolutePositionalEmbedding", "max_seq_len", max_seq_len, 1)
        self.scale = 1.0 if l2norm_embed else dim**-0.5
        self.max_seq_len = max_seq_len
        self.l2norm_embed = l2norm_embed
        self.emb = nn.Embedding(max_seq_len, dim)

    def __call__(self, x: mx.array, pos: Optional[mx.array] = None) -> mx.array:
        seq_len = _seq_len_of("AbsolutePositionalEmbedding", x)
        if seq_len > self.max_seq_len:
            msg = f"expected seq_len <= max_seq_len {self.max_seq_len}, got {seq_len}"
            raise ValueError(f"[AbsolutePositionalEmbedding] {msg}")
        if pos is None:
            pos = mx.arange(seq_len)
        elif not mx.issubdtype(pos.dtype, mx.integer):
            raise ValueError(f"[AbsolutePositionalEmbedding] expected integer pos, got {pos.dtype}")
        pos_emb = self.emb(pos) * self.scale
        if self.l2norm_embed:
            norm = mx.sqrt(mx.sum(pos_emb.astype(mx.float32) ** 2, axis=-1, keepdims=True))
            pos_emb = pos_emb / mx.maximum(norm, 1e-12).astype(pos_emb.dtype)
        return pos_emb


class ScaledSinusoidalEmbedding(nn.Module):
    r"""Fixed sinusoidal position embedding times one learned scalar.

    .. math::

        e_p = g\,[\sin(p\,\omega_0), \dots, \sin(p\,\omega_{d/2-1}),
                  \cos(p\,\omega_0), \dots, \cos(p\,\omega_{d/2-1})],
        \qquad \omega_k = \theta^{-2k/d}

    with :math:`g` (``scale``) initialised to :math:`d^{-1/2}`.

    Args:
        dim (int): Embedding size :math:`d`; must be even.
        theta (float): Frequency base :math:`\theta`. Default: ``10000``.

    Call:
        ``emb(x, pos=None, seq_start_pos=None)``: ``x`` is :math:`(B, L)` or
        :math:`(B, L, D)` (only :math:`L` is used); ``pos`` optional positions (default
        ``0..L-1``); ``seq_start_pos`` optional :math:`(B,)` start of each sequence,
        subtracted from the positions (left padding).

    Shape:
        - Output: :math:`(L, d)`, ``pos.shape + (d,)``, or :math:`(B, L, d)` with
          ``seq_start_pos``; in ``scale``'s dtype.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.nn import ScaledSinusoidalEmbedding
        >>> emb = ScaledSinusoidalEmbedding(dim=64)
        >>> emb(mx.zeros((2, 10, 64))).shape
        (10, 64)

    Reference:
        Vaswani et al., "Attention Is All You Need", 2017; the learned scale from
        Hua et al., "Transformer Quality in Linear Time", 2022.
    """

    def __init__(self, dim: int, theta: float = 10000):
        super().__init__()
        check_int("ScaledSinusoidalEmbedding", "dim", dim, 2)
        if dim % 2:
            raise ValueError(f"[ScaledSinusoidalEmbedding] expected an even dim, got {dim}")
        if theta <= 0:
            raise ValueError(f"[ScaledSinusoidalEmbedding] expected a positive theta, got {theta}")
        self.dim = dim
        self.theta = theta
        self.scale = mx.array([dim**-0.5])
        half = dim // 2
        self._inv_freq = theta ** -(mx.arange(half, dtype=mx.float32) / half)  # (d/2,)

    def __call__(
        self, x: mx.array, pos: Optional[mx.array] = None, seq_start_pos: Optional[mx.array] = None
    ) -> mx.array:
        seq_len = _seq_len_of("ScaledSinusoidalEmbedding", x)
        if pos is None:
            pos = mx.arange(seq_len)
        pos = pos.astype(mx.float32)
        if seq_start_pos is not None:
            if seq_start_pos.ndim != 1 or seq_start_pos.shape[0] != x.shape[0]:
                raise ValueError(
                    f"[ScaledSinusoidalEmbedding] expected seq_start_pos of shape ({x.shape[0]},), "
                    f"got {seq_start_pos.shape}"
                )
            pos = pos - seq_start_pos.astype(mx.float32)[:, None]
        angles = pos[..., None] * self._inv_freq  # (..., L, d/2)
        emb = mx.concatenate([mx.sin(angles), mx.cos(angles)], axis=-1)
        return emb.astype(self.scale.dtype) * self.scale
