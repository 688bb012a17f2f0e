r"""The BERT encoder (BERT, MiniLM, sentence-transformers models): :class:`BertEmbeddings`, a post-norm
:class:`~mlx_zeta.structs.Encoder` and an optional pooler, plus :func:`mean_pool` for sentence embeddings.

Reference: Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers for Language
Understanding", https://arxiv.org/abs/1810.04805. Hugging Face checkpoints load through
:mod:`mlx_zeta.converters.bert`.
"""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.structs import Encoder

__all__ = ["BertEmbeddings", "BertEncoder", "mean_pool", "l2_normalize"]


class BertEmbeddings(nn.Module):
    r"""BERT's input embeddings: word, learned absolute position and token type, summed, then LayerNorm.

    .. math::

        e_{b,t} = \operatorname{LN}\big(W_{\text{word}}[x_{b,t}] + W_{\text{type}}[s_{b,t}] + W_{\text{pos}}[t]\big)

    with token types :math:`s = 0` when not given and positions :math:`t = 0, \dots, L-1`.
    Unlike torch's ``nn.Embedding(padding_idx=pad_token_id)``, the padding row is not frozen: it
    gets a gradient when a loss reads the outputs at padded positions (masked losses and mean or
    first-token pooling never do).

    Shape:
        - input_ids, token_type_ids: :math:`(B, L)` integers, :math:`L \le` ``max_positions``.
        - output: :math:`(B, L, \text{dim})`.
    """

    def __init__(self, vocab_size: int, dim: int, max_positions: int, type_vocab_size: int, eps: float):
        super().__init__()
        self.word = nn.Embedding(vocab_size, dim)
        self.position = nn.Embedding(max_positions, dim)
        self.token_type = nn.Embedding(type_vocab_size, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.max_positions = max_positions

    def __call__(self, input_ids: mx.array, token_type_ids: Optional[mx.array] = None) -> mx.array:
        n = input_ids.shape[1]
        if n > self.max_positions:
            raise ValueError(f"[BertEmbeddings] expected at most max_position_embeddings={self.max_positions} "
                             f"tokens, got {n}")
        # lookups only (no .weight reads), so quantized embeddings work too; type 0 when not given
        types = self.token_type(mx.zeros((1, 1), mx.int32) if token_type_ids is None else token_type_ids)
        return self.norm(self.word(input_ids) + types + self.position(mx.arange(n)))


def mean_pool(hidden: mx.array, attention_mask: Optional[mx.array] = None, normalize: bool = True) -> mx.array:
    r"""Mask-weighted mean over tokens, optionally L2-normalised (sentence-transformers' recipe).

    .. math::

        u_b = \frac{\sum_t m_{b,t} h_{b,t}}{\max(\sum_t m_{b,t}, 10^{-9})}, \qquad
        \hat u_b = \frac{u_b}{\max(\lVert u_b \rVert_2, 10^{-12})}

    Computed in float32. Shape: hidden :math:`(B, L, D)`, attention_mask :math:`(B, L)` (nonzero =
    token), output :math:`(B, D)` float32.
    """
    h = hidden.astype(mx.float32)
    if attention_mask is None:
        u = h.mean(axis=1)
    else:
        m = (attention_mask != 0).astype(mx.float32)[..., None]  # (B, L, 1)
        u = (h * m).sum(axis=1) / mx.maximum(m.sum(axis=1), 1e-9)
    return l2_normalize(u) if normalize else u


def l2_normalize(u: mx.array, eps: float = 1e-12) -> mx.array:
    r"""Each row divided by its L2 norm, the norm clamped below at ``eps`` (sentence-transformers'
    ``Normalize``, i.e. ``torch.nn.functional.normalize``): :math:`u / \max(\lVert u \rVert_2, \epsilon)`.

    Shape: :math:`(\dots, D)` -> same; a zero row stays zero.
    """
    return u / mx.maximum(mx.linalg.norm(u, axis=-1, keepdims=True), eps)


class BertEncoder(nn.Module):
    r"""A BERT encoder: :class:`BertEmbeddings`, a post-norm mlx_zeta ``Encoder``, an optional pooler.

    Each of the ``num_hidden_layers`` layers computes, with LayerNorms :math:`N_1, N_2`,

    .. math::

        x \leftarrow N_1\big(x + \operatorname{MHA}(x; m)\big), \qquad
        x \leftarrow N_2\big(x + W_2 \operatorname{GELU}(W_1 x + b_1) + b_2\big),

    where padded keys (:math:`m = 0`) get no attention. Calling the model returns the last hidden
    state only; the pooler (dense + tanh on the first token, present when the checkpoint has one,
    see the module docstring) is :meth:`pool` on that state or :meth:`pooled` from the ids, and
    :meth:`embed` gives sentence embeddings (:func:`mean_pool`).

    Args:
        vocab_size (int): word-embedding rows.
        dim (int): hidden size.
        depth (int): encoder layers.
        heads (int): attention heads (``dim / heads`` features each).
        ff_inner_dim (int): feed-forward width.
        max_positions (int): learned positions. Default: ``512``.
        type_vocab_size (int): token types. Default: ``2``.
        norm_eps (float): LayerNorm epsilon. Default: ``1e-12``.
        activation (callable): feed-forward activation. Default: ``nn.gelu`` (exact).
        pooler (bool): build the dense + tanh pooler. Default: ``True``.

    Shape:
        - input_ids, attention_mask (1/True = token, 0/False = padding), token_type_ids: :math:`(B, L)`.
        - output: :math:`(B, L, \text{hidden\_size})`; :meth:`pooled`, :meth:`embed`: :math:`(B, \text{hidden\_size})`.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.models import BertEncoder
        >>> model = BertEncoder(vocab_size=100, dim=32, depth=2, heads=4, ff_inner_dim=64)
        >>> model.embed(mx.array([[1, 7, 2]])).shape
        (1, 32)
    """

    def __init__(self, vocab_size: int, dim: int, depth: int, heads: int, ff_inner_dim: int,
                 max_positions: int = 512, type_vocab_size: int = 2, norm_eps: float = 1e-12,
                 activation: Callable[[mx.array], mx.array] = nn.gelu, pooler: bool = True):
        super().__init__()
        self.embeddings = BertEmbeddings(vocab_size, dim, max_positions, type_vocab_size, norm_eps)
        self.encoder = Encoder(dim=dim, depth=depth, heads=heads, attn_bias=True, ff_inner_dim=ff_inner_dim,
                               ff_custom_act=activation, pre_norm=False,
                               norm=lambda n: nn.LayerNorm(n, eps=norm_eps))
        if pooler:
            self.pooler = nn.Linear(dim, dim)

    def __call__(self, input_ids: mx.array, attention_mask: Optional[mx.array] = None,
                 token_type_ids: Optional[mx.array] = None) -> mx.array:
        if input_ids.ndim != 2:
            raise ValueError(f"[BertEncoder] expected input_ids of shape (batch, seq), got shape {tuple(input_ids.shape)}")
        mask = None if attention_mask is None else attention_mask.astype(mx.bool_)
        return self.encoder(self.embeddings(input_ids, token_type_ids), mask=mask)

    def pool(self, hidden: mx.array) -> mx.array:
        """The pooler on a last hidden state: :math:`\\tanh(W h_{:,0} + b)`, (B, L, D) -> (B, D)."""
        if "pooler" not in self:
            raise ValueError("[BertEncoder] this model has no pooler (its checkpoint had none); use embed() "
                             "or the hidden states")
        return mx.tanh(self.pooler(hidden[:, 0]))

    def pooled(self, input_ids: mx.array, attention_mask: Optional[mx.array] = None,
               token_type_ids: Optional[mx.array] = None) -> mx.array:
        """Hugging Face's ``pooler_output`` from the ids: ``pool(self(...))``."""
        return self.pool(self(input_ids, attention_mask, token_type_ids))

    def embed(self, input_ids: mx.array, attention_mask: Optional[mx.array] = None, normalize: bool = True,
              token_type_ids: Optional[mx.array] = None) -> mx.array:
        """Sentence embeddings: :func:`mean_pool` of the last hidden state over kept tokens, float32."""
        return mean_pool(self(input_ids, attention_mask, token_type_ids), attention_mask, normalize)
