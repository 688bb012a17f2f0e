"""Attention-layer stacks in the x-transformers style: AttentionLayers and its Encoder,
Decoder and CrossAttender presets, built from the mlx_zeta.nn blocks."""

import inspect
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.nn.attention import Attention
from mlx_zeta.nn.feedforward import FeedForward
from mlx_zeta.nn.kv_cache import KVCache, StaticKVCache
from mlx_zeta.nn.norms import RMSNorm, ScaleNorm
from mlx_zeta.nn.positional import AlibiPositionalBias, RelativePositionBias, RotaryEmbedding
from mlx_zeta.structs.cache import RotatingKVCache

__all__ = ["AttentionLayers", "Encoder", "Decoder", "CrossAttender"]

Cache = Union[KVCache, RotatingKVCache, StaticKVCache]

# Extra keywords routed by prefix: ``attn_<name>`` -> Attention(<name>=...), ``ff_<name>`` -> FeedForward.
# The options AttentionLayers sets itself (or that would break the residual stream) are not routable.
_ATTN_EXTRAS = set(inspect.signature(Attention.__init__).parameters) - {
    "self", "dim", "heads", "dim_head", "kv_heads", "causal", "qk_norm", "dropout", "flash"}
_FF_EXTRAS = set(inspect.signature(FeedForward.__init__).parameters) - {
    "self", "dim", "dim_out", "mult", "glu", "swish", "relu_squared", "dropout", "no_bias", "kwargs"}


def _check_int(name: str, value: Any, low: int, owner: str = "AttentionLayers") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"[{owner}] expected {name} to be an int >= {low}, got {value!r}")


class _Layer(nn.Module):
    """One depth step: [self-attention], [cross-attention], feed-forward, each a residual branch."""

    def __init__(self, self_attn: Optional[Attention], cross_attn: Optional[Attention], ff: FeedForward,
                 make_norm, pre_norm: bool):
        super().__init__()
        if self_attn is not None:
            self.attn_norm, self.attn = make_norm(), self_attn
        if cross_attn is not None:
            self.cross_attn_norm, self.cross_attn = make_norm(), cross_attn
        self.ff_norm, self.ff = make_norm(), ff
        self.pre_norm = pre_norm

    def _residual(self, x: mx.array, norm: nn.Module, branch) -> mx.array:
        if self.pre_norm:
            return x + branch(norm(x))
        return norm(x + branch(x))

    def __call__(self, x, self_mask, attn_bias, rotary, context, context_mask, cache):
        if "attn" in self:
            x = self._residual(x, self.attn_norm, lambda h: self.attn(
                h, mask=self_mask, attn_bias=attn_bias, cache=cache, rotary_pos_emb=rotary))
        if "cross_attn" in self:
            x = self._residual(x, self.cross_attn_norm, lambda h: self.cross_attn(h, context=context, mask=context_mask))
        return self._residual(x, self.ff_norm, self.ff)


def _checkpointed(layer: _Layer, stochastic: bool, *args: Any) -> mx.array:
    """``layer(*args, None)`` under ``mx.checkpoint``. The layer's parameters enter as inputs
    (and are put back into the layer inside), so their gradients flow through the recomputation;
    every array argument (attention bias, context, ...) is an input for the same reason. With
    dropout the layer reseeds MLX's global RNG from a seed drawn here, so the recomputation in
    the backward pass draws the same masks as the forward pass."""
    seed = mx.random.randint(0, 2**31 - 1, ()).item() if stochastic else None

    def run(params, *inputs):
        layer.update(params)
        if seed is not None:
            mx.random.seed(seed)
        return layer(*inputs, None)
    return mx.checkpoint(run)(layer.trainable_parameters(), *args)


class AttentionLayers(nn.Module):
    r"""A stack of residual attention and feed-forward blocks (x-transformers' ``AttentionLayers``).

    Each of the ``depth`` layers is self-attention (unless ``only_cross``), then
    cross-attention to ``context`` (with ``cross_attend``), then a feed-forward block.
    Every block :math:`f` is a residual branch with its own norm :math:`N`:

    .. math::

        \text{pre-norm: } x \leftarrow x + f(N(x)), \qquad
        \text{post-norm: } x \leftarrow N(x + f(x)),

    and with ``pre_norm`` a final norm closes the stack. Norms are ``mlx.nn.LayerNorm``
    (weight and bias, as torch's), :class:`~mlx_zeta.nn.RMSNorm` or
    :class:`~mlx_zeta.nn.ScaleNorm`.

    Positions (self-attention only, shared by all layers): rotary angles on the first
    ``rotary_emb_dim`` features of each query/key head (optionally xPos), an ALiBi bias
    :math:`-m_h|i - j|`, or one T5 relative position bias table for the whole stack (as
    in T5). With ``sliding_window`` :math:`w` query :math:`i` sees keys
    :math:`i - w < j \le i` (causal) or :math:`|i - j| < w`.

    Keywords ``attn_<name>`` and ``ff_<name>`` beyond the listed ones are routed to
    :class:`~mlx_zeta.nn.Attention` (``attn_bias``) and :class:`~mlx_zeta.nn.FeedForward`
    (``ff_swiglu``, ``ff_post_act_ln``, ``ff_glu_mult_bias``, ``ff_zero_init_output``,
    ``ff_custom_act``); any other keyword raises ``ValueError``.

    Args:
        dim (int): model dimension. depth (int): number of layers.
        heads (int): attention heads. Default: ``8``.
        causal (bool): causal self-attention. Default: ``False``.
        cross_attend (bool): add cross-attention after each self-attention. Default: ``False``.
        only_cross (bool): cross-attention only, no self-attention (needs ``cross_attend``). Default: ``False``.
        attn_dim_head (int, optional): per-head dimension. Default: ``dim // heads``.
        attn_kv_heads (int, optional): key/value heads (GQA, MQA with 1). Default: ``heads``.
        attn_qk_norm (bool): RMSNorm on query and key heads. Default: ``False``.
        attn_dropout (float): attention-probability dropout in training. Default: ``0.0``.
        attn_flash (bool): fused attention kernel where it applies. Default: ``True``.
        ff_mult (float): feed-forward width multiplier. Default: ``4``.
        ff_glu, ff_swish, ff_relu_squared (bool): GLU gate, SiLU, ReLU² (see FeedForward). Default: ``False``.
        ff_dropout (float): feed-forward hidden dropout in training. Default: ``0.0``.
        ff_no_bias (bool): no biases in the feed-forward projections. Default: ``False``.
        rotary_pos_emb (bool): rotary position embedding. Default: ``False``.
        rotary_emb_dim (int, optional): rotated features per head. Default: ``attn_dim_head // 2``.
        rotary_xpos (bool): xPos scaling (needs ``rotary_pos_emb`` and ``causal``). Default: ``False``.
        rotary_xpos_scale_base (float): xPos :math:`\gamma`. Default: ``512``.
        rotary_base (float): rotary frequency base. Default: ``10000``.
        rotary_interpolation_factor (float): position interpolation factor. Default: ``1.0``.
        rotary_inv_freq (array, optional): the ``rotary_emb_dim // 2`` rotary frequencies given
            directly (see :class:`~mlx_zeta.nn.RotaryEmbedding`). Default: ``None``.
        alibi_pos_bias (bool): ALiBi bias. Default: ``False``.
        alibi_num_heads (int, optional): heads with an ALiBi bias, the first ones (the rest get none,
            e.g. to rely on rotary positions). Default: every head.
        rel_pos_bias (bool): T5 relative position bias. Default: ``False``.
        rel_pos_num_buckets (int): T5 buckets. Default: ``32``.
        rel_pos_max_distance (int): T5 max distance. Default: ``128``.
        use_rmsnorm (bool): RMSNorm instead of LayerNorm. Default: ``False``.
        use_scalenorm (bool): ScaleNorm instead of LayerNorm. Default: ``False``.
        norm_factory (callable, optional): ``dim -> nn.Module`` making every norm of the stack
            (e.g. ``lambda d: nn.RMSNorm(d, eps=1e-6)`` or ``lambda d: nn.LayerNorm(d, eps=1e-12)``
            to match a checkpoint); excludes ``use_rmsnorm``/``use_scalenorm``. Default: ``None``.
        pre_norm (bool): pre-norm (else post-norm) residuals. Default: ``True``.
        sliding_window (int, optional): local attention window :math:`w`. Default: ``None``.
        checkpoint (bool): gradient checkpointing: in training without a cache, each layer's
            activations are recomputed in the backward pass (``mx.checkpoint``) instead of kept,
            trading compute for memory (dropout masks are redrawn identically). Default: ``False``.

    Call ``(x, mask=None, context=None, context_mask=None, cache=None)``. ``mask`` is
    a boolean key-padding mask (True = keep) over the positions of ``x`` or, with a
    cache, over every position seen so far (length ``offset + seq``); ``cache`` is the
    list from :meth:`make_cache`, updated in place, and positions start at its offset.
    xPos uses a fixed centre 0: scores depend on :math:`i - j` only, so the centre
    cancels, and a fixed one keeps cached keys valid.

    Shape:
        - x: :math:`(B, L, \text{dim})`; mask: :math:`(B, L)`; context: :math:`(B, L_c, \text{dim})`;
          context_mask: :math:`(B, L_c)`.
        - output: :math:`(B, L, \text{dim})`.

    Example:
        >>> layers = AttentionLayers(dim=64, depth=2, heads=4, causal=True, rotary_pos_emb=True, ff_swiglu=True)
        >>> layers(mx.random.normal((2, 10, 64))).shape
        (2, 10, 64)

    Reference: lucidrains/x-transformers; Su et al. (RoPE) https://arxiv.org/abs/2104.09864;
    Press et al. (ALiBi) https://arxiv.org/abs/2108.12409; Raffel et al. (T5)
    https://arxiv.org/abs/1910.10683; Beltagy et al. (sliding window) https://arxiv.org/abs/2004.05150.
    """

    def __init__(self, dim: int, depth: int, heads: int = 8, causal: bool = False, cross_attend: bool = False,
                 only_cross: bool = False, attn_dim_head: Optional[int] = None, attn_kv_heads: Optional[int] = None,
                 attn_qk_norm: bool = False, attn_dropout: float = 0.0, attn_flash: bool = True, ff_mult: float = 4,
                 ff_glu: bool = False, ff_swish: bool = False, ff_relu_squared: bool = False, ff_dropout: float = 0.0,
                 ff_no_bias: bool = False, rotary_pos_emb: bool = False, rotary_emb_dim: Optional[int] = None,
                 rotary_xpos: bool = False, rotary_xpos_scale_base: float = 512, rotary_base: float = 10000,
                 rotary_interpolation_factor: float = 1.0, rotary_inv_freq: Optional[mx.array] = None,
                 alibi_pos_bias: bool = False,
                 alibi_num_heads: Optional[int] = None, rel_pos_bias: bool = False,
                 rel_pos_num_buckets: int = 32, rel_pos_max_distance: int = 128, use_rmsnorm: bool = False,
                 use_scalenorm: bool = False, pre_norm: bool = True, sliding_window: Optional[int] = None,
                 checkpoint: bool = False, norm_factory: Optional[Callable[[int], nn.Module]] = None,
                 **kwargs: Any):
        super().__init__()
        name = type(self).__name__
        attn_extra, ff_extra = self._route(kwargs)
        _check_int("dim", dim, 1, name)
        _check_int("depth", depth, 1, name)
        _check_int("heads", heads, 1, name)
        if sliding_window is not None:
            _check_int("sliding_window", sliding_window, 1, name)
        if only_cross and not cross_attend:
            raise ValueError(f"[{name}] expected cross_attend=True with only_cross=True (use CrossAttender), got cross_attend=False")
        if use_rmsnorm + use_scalenorm + (norm_factory is not None) > 1:
            raise ValueError(f"[{name}] expected at most one of use_rmsnorm, use_scalenorm, norm_factory, got "
                             f"use_rmsnorm={use_rmsnorm}, use_scalenorm={use_scalenorm}, "
                             f"norm_factory={'set' if norm_factory is not None else None}")
        if norm_factory is not None and not callable(norm_factory):
            raise ValueError(f"[{name}] expected norm_factory to be callable (dim -> nn.Module), "
                             f"got {type(norm_factory).__name__}")
        if alibi_pos_bias and rel_pos_bias:
            raise ValueError(f"[{name}] expected at most one of alibi_pos_bias, rel_pos_bias, got both")
        if rotary_xpos and not (rotary_pos_emb and causal):
            raise ValueError(f"[{name}] expected rotary_pos_emb=True and causal=True with rotary_xpos "
                             f"(xPos is not bidirectional), got rotary_pos_emb={rotary_pos_emb}, causal={causal}")
        if only_cross and (rotary_pos_emb or alibi_pos_bias or rel_pos_bias or sliding_window is not None):
            raise ValueError(f"[{name}] expected no self-attention position options with only_cross=True "
                             "(rotary_pos_emb, alibi_pos_bias, rel_pos_bias, sliding_window apply to self-attention)")
        dim_head = attn_dim_head if attn_dim_head is not None else dim // heads
        self.dim, self.depth, self.heads, self.causal = dim, depth, heads, causal
        self.pre_norm, self.sliding_window, self.rotary_xpos = pre_norm, sliding_window, rotary_xpos
        self.cross_attend, self.only_cross = cross_attend, only_cross
        self.checkpoint, self._stochastic = checkpoint, attn_dropout > 0 or ff_dropout > 0
        self.has_self_attn = not only_cross
        # x-transformers: relative positions make the absolute embedding redundant (read by Transformer).
        self.disable_abs_pos_emb = rotary_pos_emb or rel_pos_bias

        if rotary_pos_emb:
            rotary_emb_dim = dim_head // 2 if rotary_emb_dim is None else rotary_emb_dim
            if rotary_emb_dim > dim_head or rotary_emb_dim < 2 or rotary_emb_dim % 2:
                raise ValueError(f"[{name}] expected an even rotary_emb_dim in [2, dim_head={dim_head}], got {rotary_emb_dim}")
            self.rotary = RotaryEmbedding(rotary_emb_dim, use_xpos=rotary_xpos, scale_base=rotary_xpos_scale_base,
                                          interpolation_factor=rotary_interpolation_factor, base=rotary_base,
                                          inv_freq=rotary_inv_freq)
        if rotary_inv_freq is not None and not rotary_pos_emb:
            raise ValueError(f"[{name}] expected rotary_pos_emb=True with rotary_inv_freq, got rotary_pos_emb=False")
        if alibi_num_heads is not None and not alibi_pos_bias:
            raise ValueError(f"[{name}] expected alibi_pos_bias=True with alibi_num_heads, got alibi_pos_bias=False")
        if alibi_pos_bias:
            alibi_num_heads = heads if alibi_num_heads is None else alibi_num_heads
            if isinstance(alibi_num_heads, bool) or not isinstance(alibi_num_heads, int) or not 1 <= alibi_num_heads <= heads:
                raise ValueError(f"[{name}] expected 1 <= alibi_num_heads <= heads={heads}, got {alibi_num_heads!r}")
            self.alibi = AlibiPositionalBias(heads=alibi_num_heads, total_heads=heads)
        if rel_pos_bias:
            self.rel_pos = RelativePositionBias(bidirectional=not causal, num_buckets=rel_pos_num_buckets,
                                                max_distance=rel_pos_max_distance, num_heads=heads)

        def attention(is_causal: bool) -> Attention:
            return Attention(dim, heads=heads, dim_head=attn_dim_head, kv_heads=attn_kv_heads, causal=is_causal,
                             qk_norm=attn_qk_norm, dropout=attn_dropout, flash=attn_flash, **attn_extra)

        def make_norm() -> nn.Module:
            if norm_factory is not None:
                return norm_factory(dim)
            return RMSNorm(dim) if use_rmsnorm else ScaleNorm(dim) if use_scalenorm else nn.LayerNorm(dim)

        self.layers = [
            _Layer(None if only_cross else attention(causal), attention(False) if cross_attend else None,
                   FeedForward(dim, mult=ff_mult, glu=ff_glu, swish=ff_swish, relu_squared=ff_relu_squared,
                               dropout=ff_dropout, no_bias=ff_no_bias, **ff_extra),
                   make_norm, pre_norm)
            for _ in range(depth)
        ]
        if pre_norm:
            self.final_norm = make_norm()

    @staticmethod
    def _route(kwargs: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        attn = {k[5:]: v for k, v in kwargs.items() if k.startswith("attn_") and k[5:] in _ATTN_EXTRAS}
        ff = {k[3:]: v for k, v in kwargs.items() if k.startswith("ff_") and k[3:] in _FF_EXTRAS}
        unknown = sorted(set(kwargs) - {"attn_" + k for k in attn} - {"ff_" + k for k in ff})
        if unknown:
            routable = sorted(["attn_" + k for k in _ATTN_EXTRAS] + ["ff_" + k for k in _FF_EXTRAS])
            raise ValueError(f"[AttentionLayers] unknown option(s) {unknown}; besides the named arguments, "
                             f"accepted: {routable}")
        return attn, ff

    def make_cache(self, capacity: Optional[int] = None) -> List[Cache]:
        """One cache per self-attention layer: ``RotatingKVCache(sliding_window)`` or ``KVCache``;
        with ``capacity``, a :class:`~mlx_zeta.nn.StaticKVCache` of that many positions (static
        shapes for ``mx.compile`` and exports; causal stacks with rotary or absolute positions)."""
        if not self.has_self_attn:
            return []
        if capacity is not None:
            if not self.causal or "alibi" in self or "rel_pos" in self or self.sliding_window is not None:
                raise ValueError(f"[{type(self).__name__}] a static cache (capacity=) needs a causal stack without "
                                 "ALiBi, T5 relative positions or a sliding window")
            return [StaticKVCache(capacity) for _ in range(self.depth)]
        if self.sliding_window is not None:
            return [RotatingKVCache(max_size=self.sliding_window) for _ in range(self.depth)]
        return [KVCache() for _ in range(self.depth)]

    def __call__(self, x: mx.array, mask: Optional[mx.array] = None, context: Optional[mx.array] = None,
                 context_mask: Optional[mx.array] = None, cache: Optional[List[Cache]] = None) -> mx.array:
        name = type(self).__name__
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"[{name}] expected x of shape (batch, seq, {self.dim}), got shape {tuple(x.shape)}")
        if self.cross_attend and context is None:
            raise ValueError(f"[{name}] expected context (batch, context_len, {self.dim}) with cross_attend=True, got None")
        if not self.cross_attend and (context is not None or context_mask is not None):
            raise ValueError(f"[{name}] expected no context/context_mask without cross_attend=True, got one")
        if cache is not None and len(cache) != (self.depth if self.has_self_attn else 0):
            raise ValueError(f"[{name}] expected a cache list of {self.depth if self.has_self_attn else 0} entries "
                             f"(make_cache()), got {len(cache)}")
        b, n, _ = x.shape
        self_mask = attn_bias = rotary = None
        if self.has_self_attn:
            offset = cache[0].offset if cache else 0
            if cache and isinstance(cache[0], StaticKVCache):  # positions as arrays, keys = the whole buffer
                if mask is not None:
                    raise ValueError(f"[{name}] expected no mask with a StaticKVCache (it masks by position)")
                self_mask = cache[0].keep_mask(n)[None, None]  # (1, 1, n, capacity)
                k_len = cache[0].capacity
            else:
                kept = (cache[0].size if isinstance(cache[0], RotatingKVCache) else cache[0].offset) if cache else 0
                k_len = kept + n
                self_mask = self._self_mask(mask, b, n, offset, k_len)
            # position biases travel as O(L) data; FlashAttention fuses or materialises them
            if "alibi" in self:
                attn_bias = self.alibi.position_bias()
            elif "rel_pos" in self:
                attn_bias = self.rel_pos.position_bias(n, k_len, step=k_len - n)
            if "rotary" in self:
                rotary = self.rotary(n, offset=offset, center=0 if self.rotary_xpos else None)
        elif mask is not None:
            raise ValueError(f"[{name}] expected no mask with only_cross=True (use context_mask), got one")
        if self.checkpoint and self.training and cache is None:
            for layer in self.layers:
                x = _checkpointed(layer, self._stochastic, x, self_mask, attn_bias, rotary, context, context_mask)
        else:
            for i, layer in enumerate(self.layers):
                x = layer(x, self_mask, attn_bias, rotary, context, context_mask, cache[i] if cache else None)
        return self.final_norm(x) if self.pre_norm else x

    def _self_mask(self, mask: Optional[mx.array], b: int, n: int, offset: int, k_len: int) -> Optional[mx.array]:
        """Key padding and sliding window as one boolean mask over the k_len keys, or None."""
        if mask is not None:
            if mask.dtype != mx.bool_ or mask.ndim != 2 or mask.shape[0] not in (1, b) or mask.shape[1] not in (n, offset + n):
                raise ValueError(f"[{type(self).__name__}] expected a boolean mask of shape ({b}, {n}) or "
                                 f"({b}, {offset + n}) (all positions so far), got shape {tuple(mask.shape)} "
                                 f"and dtype {mask.dtype}")
            if mask.shape[1] == n and k_len > n:  # cached positions count as kept
                mask = mx.concatenate([mx.ones((mask.shape[0], k_len - n), mx.bool_), mask], axis=1)
            mask = mask[:, -k_len:]  # (b, k_len)
        if self.sliding_window is None:
            return mask
        dist = (mx.arange(n)[:, None] + (k_len - n)) - mx.arange(k_len)[None]  # query minus key position
        window = (dist >= 0) & (dist < self.sliding_window) if self.causal else mx.abs(dist) < self.sliding_window
        window = window[None, None]  # (1, 1, n, k_len)
        return window if mask is None else window & mask[:, None, None, :]


class Encoder(AttentionLayers):
    r""":class:`AttentionLayers` with bidirectional self-attention (``causal=False``).

    Example:
        >>> Encoder(dim=64, depth=2, heads=4, rel_pos_bias=True)(mx.random.normal((2, 10, 64))).shape
        (2, 10, 64)
    """

    def __init__(self, **kwargs: Any):
        if "causal" in kwargs:
            raise ValueError(f"[Encoder] causal is fixed to False, got causal={kwargs['causal']!r}")
        super().__init__(causal=False, **kwargs)


class Decoder(AttentionLayers):
    r""":class:`AttentionLayers` with causal self-attention (``causal=True``).

    Example:
        >>> Decoder(dim=64, depth=2, heads=4, rotary_pos_emb=True)(mx.random.normal((2, 10, 64))).shape
        (2, 10, 64)
    """

    def __init__(self, **kwargs: Any):
        if "causal" in kwargs:
            raise ValueError(f"[Decoder] causal is fixed to True, got causal={kwargs['causal']!r}")
        super().__init__(causal=True, **kwargs)


class CrossAttender(AttentionLayers):
    r""":class:`AttentionLayers` with cross-attention and feed-forward only (``cross_attend=only_cross=True``).

    Example:
        >>> ca = CrossAttender(dim=64, depth=2, heads=4)
        >>> ca(mx.random.normal((2, 10, 64)), context=mx.random.normal((2, 7, 64))).shape
        (2, 10, 64)
    """

    def __init__(self, **kwargs: Any):
        for fixed in ("cross_attend", "only_cross"):
            if fixed in kwargs:
                raise ValueError(f"[CrossAttender] {fixed} is fixed to True, got {fixed}={kwargs[fixed]!r}")
        super().__init__(cross_attend=True, only_cross=True, **kwargs)
