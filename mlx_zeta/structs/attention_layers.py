"""Attention-layer stacks in the x-transformers style: AttentionLayers and its Encoder,
Decoder and CrossAttender presets, built from the mlx_zeta.nn blocks."""

import inspect
from functools import partial
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.common import check_int
from mlx_zeta.kernels.dispatch import kernels_active
from mlx_zeta.kernels.positions import PositionBias
from mlx_zeta.nn.attention import Attention
from mlx_zeta.nn.cache import Cache, KVCache, RotatingKVCache, StaticKVCache
from mlx_zeta.nn.feedforward import FeedForward
from mlx_zeta.structs.layer_options import (LEGACY_NORM_KEYS, LEGACY_POSITION_KEYS, NormFactory, Position, Rotary,
                                            T5Bias, resolve_norm, resolve_position)

__all__ = ["AttentionLayers", "Encoder", "Decoder", "CrossAttender"]

# Extra keywords routed by prefix: ``attn_<name>`` -> Attention(<name>=...), ``ff_<name>`` -> FeedForward.
# The options AttentionLayers sets itself (or that would break the residual stream) are not routable.
_ATTN_EXTRAS = set(inspect.signature(Attention.__init__).parameters) - {
    "self", "dim", "heads", "dim_head", "kv_heads", "causal", "qk_norm", "dropout", "flash"}
_FF_EXTRAS = set(inspect.signature(FeedForward.__init__).parameters) - {
    "self", "dim", "dim_out", "mult", "glu", "swish", "relu_squared", "dropout", "no_bias", "kwargs"}


def _pop(kwargs: Dict[str, Any], keys: Iterable[str]) -> Dict[str, Any]:
    """Remove and return the entries of ``kwargs`` named in ``keys``."""
    return {k: kwargs.pop(k) for k in keys if k in kwargs}


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
    Every block :math:`f` is a residual branch with its own norm :math:`N` (made by ``norm``):

    .. math::

        \text{pre-norm: } x \leftarrow x + f(N(x)), \qquad
        \text{post-norm: } x \leftarrow N(x + f(x)),

    and with ``pre_norm`` a final norm closes the stack.

    Positions (self-attention only, shared by all layers), chosen by ``position``: rotary
    angles on the first features of each query/key head (optionally xPos), an ALiBi bias
    :math:`-m_h|i - j|`, or one T5 relative position bias table for the whole stack (as in
    T5); rotary may be combined with ALiBi. With ``sliding_window`` :math:`w` query
    :math:`i` sees keys :math:`i - w < j \le i` (causal) or :math:`|i - j| < w`.

    Args:
        dim (int): model dimension.
        depth (int): number of layers.
        heads (int): attention heads. Default: ``8``.
        causal (bool): causal self-attention. Default: ``False``.
        cross_attend (bool): add cross-attention after each self-attention. Default: ``False``.
        only_cross (bool): cross-attention only, no self-attention (needs ``cross_attend``). Default: ``False``.
        checkpoint (bool): gradient checkpointing: in training without a cache, each layer's
            activations are recomputed in the backward pass (``mx.checkpoint``) instead of kept,
            trading compute for memory (dropout masks are redrawn identically). Default: ``False``.
        norm (Callable, optional): ``dim -> nn.Module`` making every norm of the stack,
            e.g. ``nn.RMSNorm`` or ``lambda d: nn.LayerNorm(d, eps=1e-12)`` to match a checkpoint.
            Default: ``mlx.nn.LayerNorm`` (weight and bias, as torch's).
        pre_norm (bool): pre-norm (else post-norm) residuals. Default: ``True``.
        position (optional): ``"rotary"``, ``"alibi"``, ``"t5"``, a
            :class:`~mlx_zeta.structs.Rotary` / :class:`~mlx_zeta.structs.Alibi` /
            :class:`~mlx_zeta.structs.T5Bias` with its options, or a tuple of them. Default: ``None``.
        sliding_window (int, optional): local attention window :math:`w`. Default: ``None``.
        attn_dim_head (int, optional): attention blocks (:class:`~mlx_zeta.nn.Attention`): per-head
            dimension. Default: ``dim // heads``.
        attn_kv_heads (int, optional): key/value heads (GQA, MQA with 1). Default: ``heads``.
        attn_qk_norm (bool): RMSNorm on query and key heads. Default: ``False``.
        attn_dropout (float): attention-probability dropout in training. Default: ``0.0``.
        attn_flash (bool): fused attention kernel where it applies. Default: ``True``.
        ff_mult (float): feed-forward blocks (:class:`~mlx_zeta.nn.FeedForward`): width multiplier.
            Default: ``4``.
        ff_glu (bool): GLU gate. Default: ``False``.
        ff_swish (bool): SiLU. Default: ``False``.
        ff_relu_squared (bool): ReLU². Default: ``False``.
        ff_dropout (float): hidden dropout in training. Default: ``0.0``.
        ff_no_bias (bool): no biases in the projections. Default: ``False``.
        **kwargs: routed by prefix, and the zeta / x-transformers aliases (below).

    Routed by prefix: ``attn_<name>`` and ``ff_<name>`` beyond the listed ones go to the
    blocks (``attn_bias``, ``attn_out_bias``, ``attn_scale``, ``attn_qk_norm_eps``;
    ``ff_swiglu``, ``ff_post_act_ln``, ``ff_glu_mult_bias``, ``ff_zero_init_output``,
    ``ff_custom_act``); any other keyword raises ``ValueError``.

    zeta / x-transformers aliases, still accepted: ``use_rmsnorm`` (``norm=RMSNorm``),
    ``use_scalenorm`` (``norm=ScaleNorm``), ``norm_factory`` (deprecated, same as ``norm``);
    ``rotary_pos_emb`` with ``rotary_emb_dim``, ``rotary_xpos``, ``rotary_xpos_scale_base``,
    ``rotary_base``, ``rotary_interpolation_factor``, ``rotary_inv_freq`` (a ``Rotary``);
    ``alibi_pos_bias`` with ``alibi_num_heads`` (an ``Alibi``); ``rel_pos_bias`` with
    ``rel_pos_num_buckets``, ``rel_pos_max_distance`` (a ``T5Bias``).

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
        >>> import mlx.core as mx
        >>> import mlx.nn as nn
        >>> from mlx_zeta.structs import AttentionLayers
        >>> layers = AttentionLayers(dim=64, depth=2, heads=4, causal=True, position="rotary", norm=nn.RMSNorm)
        >>> layers(mx.random.normal((2, 10, 64))).shape
        (2, 10, 64)

    Reference: lucidrains/x-transformers; Su et al. (RoPE) https://arxiv.org/abs/2104.09864;
    Press et al. (ALiBi) https://arxiv.org/abs/2108.12409; Raffel et al. (T5)
    https://arxiv.org/abs/1910.10683; Beltagy et al. (sliding window) https://arxiv.org/abs/2004.05150.
    """

    def __init__(self, dim: int, depth: int, heads: int = 8, causal: bool = False, cross_attend: bool = False,
                 only_cross: bool = False, norm: Optional[NormFactory] = None, pre_norm: bool = True,
                 position: Position = None, sliding_window: Optional[int] = None,
                 attn_dim_head: Optional[int] = None, attn_kv_heads: Optional[int] = None, attn_qk_norm: bool = False,
                 attn_dropout: float = 0.0, attn_flash: bool = True, ff_mult: float = 4, ff_glu: bool = False,
                 ff_swish: bool = False, ff_relu_squared: bool = False, ff_dropout: float = 0.0,
                 ff_no_bias: bool = False, checkpoint: bool = False, **kwargs: Any):
        super().__init__()
        name = type(self).__name__
        make_norm = resolve_norm(norm, name, **_pop(kwargs, LEGACY_NORM_KEYS))
        positions = resolve_position(position, _pop(kwargs, LEGACY_POSITION_KEYS), causal, name)
        attn_extra, ff_extra = self._route(kwargs)
        self._check_structure(name, dim, depth, heads, cross_attend, only_cross, sliding_window, positions)
        self.dim, self.depth, self.heads, self.causal = dim, depth, heads, causal
        self.pre_norm, self.sliding_window = pre_norm, sliding_window
        self.cross_attend, self.only_cross, self.has_self_attn = cross_attend, only_cross, not only_cross
        self.checkpoint, self._stochastic = checkpoint, attn_dropout > 0 or ff_dropout > 0
        self.rotary_xpos = any(isinstance(p, Rotary) and p.xpos for p in positions)
        # x-transformers: relative positions make the absolute embedding redundant (read by Transformer).
        self.disable_abs_pos_emb = any(isinstance(p, (Rotary, T5Bias)) for p in positions)
        dim_head = attn_dim_head if attn_dim_head is not None else dim // heads
        for scheme in positions:
            setattr(self, scheme.attr, scheme.build(name, heads, dim_head, causal))

        attention = partial(Attention, dim, heads=heads, dim_head=attn_dim_head, kv_heads=attn_kv_heads,
                            qk_norm=attn_qk_norm, dropout=attn_dropout, flash=attn_flash, **attn_extra)
        feed_forward = partial(FeedForward, dim, mult=ff_mult, glu=ff_glu, swish=ff_swish, relu_squared=ff_relu_squared,
                               dropout=ff_dropout, no_bias=ff_no_bias, **ff_extra)
        self.layers = [_Layer(None if only_cross else attention(causal=causal),
                              attention(causal=False) if cross_attend else None,
                              feed_forward(), lambda: make_norm(dim), pre_norm)
                       for _ in range(depth)]
        if pre_norm:
            self.final_norm = make_norm(dim)

    @staticmethod
    def _check_structure(name: str, dim: int, depth: int, heads: int, cross_attend: bool, only_cross: bool,
                         sliding_window: Optional[int], positions: Tuple[Any, ...]) -> None:
        for what, value in (("dim", dim), ("depth", depth), ("heads", heads)):
            check_int(name, what, value, 1)
        check_int(name, "sliding_window", sliding_window, 1, optional=True, says="expected sliding_window to be an int >= 1")
        if only_cross and not cross_attend:
            raise ValueError(f"[{name}] expected cross_attend=True with only_cross=True (use CrossAttender), got cross_attend=False")
        if only_cross and (positions or sliding_window is not None):
            raise ValueError(f"[{name}] expected no self-attention position options with only_cross=True "
                             "(rotary_pos_emb, alibi_pos_bias, rel_pos_bias, sliding_window apply to self-attention)")

    @staticmethod
    def _route(kwargs: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        attn = {k[5:]: v for k, v in kwargs.items() if k.startswith("attn_") and k[5:] in _ATTN_EXTRAS}
        ff = {k[3:]: v for k, v in kwargs.items() if k.startswith("ff_") and k[3:] in _FF_EXTRAS}
        unknown = sorted(set(kwargs) - {"attn_" + k for k in attn} - {"ff_" + k for k in ff})
        if unknown:
            routable = sorted(["attn_" + k for k in _ATTN_EXTRAS] + ["ff_" + k for k in _FF_EXTRAS])
            raise ValueError(f"[AttentionLayers] unknown option(s) {unknown}; besides the named arguments, "
                             f"accepted: {routable}; zeta / x-transformers aliases: "
                             f"{sorted(LEGACY_NORM_KEYS + LEGACY_POSITION_KEYS)}")
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
            lead = cache[0] if cache else KVCache()  # an empty cache describes a fresh sequence
            offset, k_len = lead.offset, lead.key_length(n)
            self_mask = self._self_mask(lead, mask, b, n)
            attn_bias = self._position_bias(n, k_len)
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

    def _position_bias(self, n: int, k_len: int) -> Union[None, PositionBias, mx.array]:
        """The stack's ALiBi or T5 bias for ``n`` queries over ``k_len`` keys: O(L) data
        (:class:`~mlx_zeta.kernels.PositionBias`) that the fused kernels compute in place when the
        dispatcher has a kernel path live, else materialised here once for every layer (H, n, k_len)."""
        if "alibi" in self:
            data = self.alibi.position_bias()
        elif "rel_pos" in self:
            data = self.rel_pos.position_bias(n, k_len, step=k_len - n)
        else:
            return None
        return data if kernels_active() else data.materialize(n, k_len)

    def _self_mask(self, lead: Cache, mask: Optional[mx.array], b: int, n: int) -> Optional[mx.array]:
        """Key padding and sliding window as one boolean mask over the keys ``lead`` returns, or
        None; causal masking is the attention's, as the cache implies (see ``Cache.make_mask``)."""
        keys = lead.key_mask(mask, n, b, type(self).__name__)  # (b, k_len) or None
        if self.sliding_window is None:
            return keys
        window = lead.make_mask(n, causal=self.causal, window=self.sliding_window)[None, None]  # (1, 1, n, k_len)
        return window if keys is None else window & keys[:, None, None, :]


class Encoder(AttentionLayers):
    r""":class:`AttentionLayers` with bidirectional self-attention (``causal=False``).

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.structs import Encoder
        >>> Encoder(dim=64, depth=2, heads=4, position="t5")(mx.random.normal((2, 10, 64))).shape
        (2, 10, 64)
    """

    def __init__(self, **kwargs: Any):
        if "causal" in kwargs:
            raise ValueError(f"[Encoder] causal is fixed to False, got causal={kwargs['causal']!r}")
        super().__init__(causal=False, **kwargs)


class Decoder(AttentionLayers):
    r""":class:`AttentionLayers` with causal self-attention (``causal=True``).

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.structs import Decoder
        >>> Decoder(dim=64, depth=2, heads=4, position="rotary")(mx.random.normal((2, 10, 64))).shape
        (2, 10, 64)
    """

    def __init__(self, **kwargs: Any):
        if "causal" in kwargs:
            raise ValueError(f"[Decoder] causal is fixed to True, got causal={kwargs['causal']!r}")
        super().__init__(causal=True, **kwargs)


class CrossAttender(AttentionLayers):
    r""":class:`AttentionLayers` with cross-attention and feed-forward only (``cross_attend=only_cross=True``).

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.structs import CrossAttender
        >>> ca = CrossAttender(dim=64, depth=2, heads=4)
        >>> ca(mx.random.normal((2, 10, 64)), context=mx.random.normal((2, 7, 64))).shape
        (2, 10, 64)
    """

    def __init__(self, **kwargs: Any):
        for fixed in ("cross_attend", "only_cross"):
            if fixed in kwargs:
                raise ValueError(f"[CrossAttender] {fixed} is fixed to True, got {fixed}={kwargs[fixed]!r}")
        super().__init__(cross_attend=True, only_cross=True, **kwargs)
