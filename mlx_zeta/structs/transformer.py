"""Token Transformer: embeddings, an AttentionLayers stack and the logits head
(x-transformers' ``TransformerWrapper``)."""

from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.common import check_int
from mlx_zeta.nn.cache import Cache
from mlx_zeta.nn.positional import AbsolutePositionalEmbedding
from mlx_zeta.structs.attention_layers import AttentionLayers
from mlx_zeta.structs.decoding import describe

__all__ = ["Transformer"]


class Transformer(nn.Module):
    r"""Token embedding, positions, an :class:`AttentionLayers` stack and a logits head.

    .. math::

        h = \text{Drop}\big(\text{concat}(P,\ N_e(E[x] + e_{\text{pos}}))\big) W_e,\qquad
        \text{logits} = \text{layers}(h)\, W_o \ \ (\text{or } E^T \text{ when tied})

    with :math:`E` the token embedding, :math:`e_{\text{pos}}` the learned absolute
    position embedding (:class:`~mlx_zeta.nn.AbsolutePositionalEmbedding`, scaled by
    :math:`d^{-1/2}`), :math:`N_e` the optional post-embedding LayerNorm, :math:`P` the
    optional ``prepend_embeds``, and :math:`W_e` a projection present only when
    ``emb_dim != dim``. As in x-transformers, the absolute embedding is skipped when
    the stack has rotary or T5 relative positions.

    Positions: the tokens of ``x`` sit after the ``prepend_embeds`` and after the cached
    positions, i.e. token :math:`t` has absolute position ``offset + p + t`` (x-transformers
    numbers tokens from 0 after a prefix; counting the prefix keeps cached decoding
    equal to recomputation).

    Args:
        num_tokens (int): vocabulary size.
        max_seq_len (int): positions of the absolute embedding (and the usual context length).
        attn_layers (AttentionLayers): the stack (e.g. :class:`Decoder`).
        emb_dim (int, optional): embedding size. Default: ``attn_layers.dim``.
        tie_embedding (bool): logits through ``token_emb.as_linear`` (needs ``emb_dim == dim``). Default: ``False``.
        use_abs_pos_emb (bool): learned absolute positions. Default: ``True``.
        emb_dropout (float): dropout on the embeddings in training. Default: ``0.0``.
        post_emb_norm (bool): LayerNorm after the token + position embedding. Default: ``False``.
        logits_dim (int, optional): output size. Default: ``num_tokens``.

    Call ``(x, mask=None, cache=None, return_embeddings=False, prepend_embeds=None,
    context=None, context_mask=None, positions=None, last_only=False)``. ``last_only``: the output
    of the last position alone, :math:`(B, 1, \cdot)` (a prefill before decoding needs no other
    logits; skips the head's :math:`(L - 1) \cdot \text{dim} \cdot V` multiply-adds). ``mask`` (True = keep) covers the tokens of ``x``
    (prepended positions are kept; with a cache, cached positions too) or, with a cache,
    every position so far (``offset + seq``, e.g. a left-padded batch); ``cache`` is the
    list from :meth:`make_cache`. ``positions`` :math:`(B, L)` integer replaces ``offset + p + t``
    in the absolute embedding only, e.g. each row's own positions in a left-padded batch (its first
    real token at 0); relative schemes (rotary, ALiBi, T5) see only position differences, which a
    shift common to a row leaves unchanged.

    Shape:
        - x: :math:`(B, L)` integer tokens; prepend_embeds: :math:`(B, P, \text{emb\_dim})`.
        - output: :math:`(B, P + L, \text{logits\_dim})`, or :math:`(B, P + L, \text{dim})` with
          ``return_embeddings``; :math:`P + L` becomes 1 with ``last_only``.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.structs import Transformer, Decoder
        >>> model = Transformer(num_tokens=256, max_seq_len=128,
        ...                     attn_layers=Decoder(dim=64, depth=2, heads=4, position="rotary"))
        >>> model(mx.zeros((2, 10), dtype=mx.int32)).shape
        (2, 10, 256)

    Reference: lucidrains/x-transformers (``TransformerWrapper``); Press & Wolf, "Using the
    Output Embedding to Improve Language Models", https://arxiv.org/abs/1608.05859 (tying).
    """

    def __init__(self, num_tokens: int, max_seq_len: int, attn_layers: AttentionLayers, emb_dim: Optional[int] = None,
                 tie_embedding: bool = False, use_abs_pos_emb: bool = True, emb_dropout: float = 0.0,
                 post_emb_norm: bool = False, logits_dim: Optional[int] = None):
        super().__init__()
        check_int("Transformer", "num_tokens", num_tokens, 1)
        check_int("Transformer", "max_seq_len", max_seq_len, 1)
        if not isinstance(attn_layers, AttentionLayers):
            raise ValueError(f"[Transformer] expected attn_layers to be an AttentionLayers, got {type(attn_layers).__name__}")
        if not 0.0 <= emb_dropout < 1.0:
            raise ValueError(f"[Transformer] expected 0 <= emb_dropout < 1, got {emb_dropout}")
        dim = attn_layers.dim
        emb_dim = dim if emb_dim is None else emb_dim
        out_dim = num_tokens if logits_dim is None else logits_dim
        if tie_embedding and (emb_dim != dim or out_dim != num_tokens):
            raise ValueError(f"[Transformer] expected emb_dim == dim and logits_dim == num_tokens with tie_embedding, "
                             f"got emb_dim={emb_dim}, dim={dim}, logits_dim={out_dim}, num_tokens={num_tokens}")
        self.num_tokens, self.max_seq_len, self.dim, self.emb_dim = num_tokens, max_seq_len, dim, emb_dim
        self.token_emb = nn.Embedding(num_tokens, emb_dim)
        if use_abs_pos_emb and not attn_layers.disable_abs_pos_emb:
            self.pos_emb = AbsolutePositionalEmbedding(emb_dim, max_seq_len)
        if post_emb_norm:
            self.post_emb_norm = nn.LayerNorm(emb_dim)
        if emb_dropout > 0:
            self.emb_dropout = nn.Dropout(emb_dropout)
        if emb_dim != dim:
            self.project_emb = nn.Linear(emb_dim, dim)
        self.attn_layers = attn_layers
        if not tie_embedding:
            self.to_logits = nn.Linear(dim, out_dim, bias=False)

    def make_cache(self, capacity: Optional[int] = None) -> List[Cache]:
        """The attention stack's caches (see :meth:`AttentionLayers.make_cache`; ``capacity`` gives
        static caches whose position is an array)."""
        return self.attn_layers.make_cache(capacity)

    def __call__(self, x: mx.array, mask: Optional[mx.array] = None, cache: Optional[List[Cache]] = None,
                 return_embeddings: bool = False, prepend_embeds: Optional[mx.array] = None,
                 context: Optional[mx.array] = None, context_mask: Optional[mx.array] = None,
                 positions: Optional[mx.array] = None, last_only: bool = False) -> mx.array:
        if x.ndim != 2 or not mx.issubdtype(x.dtype, mx.integer):
            raise ValueError(f"[Transformer] expected integer tokens of shape (batch, seq), got shape {tuple(x.shape)} "
                             f"and dtype {x.dtype}")
        b, n = x.shape
        p = 0
        if prepend_embeds is not None:
            if prepend_embeds.ndim != 3 or prepend_embeds.shape[0] != b or prepend_embeds.shape[2] != self.emb_dim:
                raise ValueError(f"[Transformer] expected prepend_embeds of shape ({b}, prefix_len, {self.emb_dim}), "
                                 f"got shape {tuple(prepend_embeds.shape)}")
            p = prepend_embeds.shape[1]
        offset = cache[0].offset if cache else 0
        static = bool(cache) and cache[0].static  # the position is a traced array (no host sync to check it)
        if mask is not None and static:
            cache[0].key_mask(mask, n, b, "Transformer")  # a cache that masks by position refuses a mask
        if mask is not None and (mask.ndim != 2 or mask.shape[0] != b or mask.shape[1] not in (n, offset + n)):
            raise ValueError(f"[Transformer] expected mask of shape ({b}, {n}) over the tokens or ({b}, {offset + n}) "
                             f"over every position so far, got shape {tuple(mask.shape)}")
        if positions is not None and (not isinstance(positions, mx.array) or positions.shape != (b, n)
                                      or not mx.issubdtype(positions.dtype, mx.integer)):
            raise ValueError(f"[Transformer] expected integer positions of shape ({b}, {n}), got {describe(positions)}")
        h = self.token_emb(x)  # (b, n, emb_dim)
        if "pos_emb" in self:
            if not static and offset + p + n > self.max_seq_len:
                raise ValueError(f"[Transformer] expected at most max_seq_len={self.max_seq_len} positions with absolute "
                                 f"position embedding, got {offset + p + n} (cached {offset}, prefix {p}, tokens {n})")
            pos = offset + p + mx.arange(n) if positions is None else positions  # (n,) or (b, n)
            h = h + self.pos_emb(x, pos=pos).astype(h.dtype)
        if "post_emb_norm" in self:
            h = self.post_emb_norm(h)
        if prepend_embeds is not None:
            h = mx.concatenate([prepend_embeds.astype(h.dtype), h], axis=1)  # (b, p + n, emb_dim)
            if mask is not None:
                mask = mx.concatenate([mx.ones((b, p), mx.bool_), mask], axis=1)
        if "emb_dropout" in self:
            h = self.emb_dropout(h)
        if "project_emb" in self:
            h = self.project_emb(h)
        h = self.attn_layers(h, mask=mask, context=context, context_mask=context_mask, cache=cache)
        if last_only:
            h = h[:, -1:]
        if return_embeddings:
            return h
        return self.to_logits(h) if "to_logits" in self else self.token_emb.as_linear(h)
