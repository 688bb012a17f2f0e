"""Encoder-decoder Transformer (T5-style, x-transformers' ``XTransformer``)."""

from typing import Any, Dict, Optional

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.structs.attention_layers import Decoder, Encoder
from mlx_zeta.structs.autoregressive import AutoregressiveWrapper
from mlx_zeta.structs.decoding import check_token_ids
from mlx_zeta.structs.transformer import Transformer

__all__ = ["XTransformer"]

# Options of the Transformer wrapper (embeddings / head) rather than of the layer stack.
_ENC_WRAPPER_OPTIONS = {"use_abs_pos_emb", "emb_dropout", "post_emb_norm"}
_DEC_WRAPPER_OPTIONS = _ENC_WRAPPER_OPTIONS | {"tie_embedding"}


class _SharedTokenEmbedding(nn.Module):
    """The decoder's stand-in for a token table tied to the encoder's.

    It holds no parameter: it looks up ``owner.token_emb`` at every call, and ``owner``
    is kept outside the module tree, so the parameter tree lists the table once (under
    ``encoder.token_emb``) and the gradients of its encoder and decoder uses add up there.
    """

    def __init__(self, owner: Transformer):
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # not a child: no second copy in the tree

    @property
    def weight(self) -> mx.array:
        return self._owner.token_emb.weight

    def __call__(self, x: mx.array) -> mx.array:
        return self._owner.token_emb(x)

    def as_linear(self, x: mx.array) -> mx.array:
        return self._owner.token_emb.as_linear(x)


def _split(prefix: str, kwargs: Dict[str, Any], wrapper_options: set):
    """Keywords ``<prefix><name>`` as (Transformer options, layer-stack options), by stripped name."""
    picked = {k[len(prefix):]: v for k, v in kwargs.items() if k.startswith(prefix)}
    wrapper = {k: v for k, v in picked.items() if k in wrapper_options}
    layers = {k: v for k, v in picked.items() if k not in wrapper_options}
    return wrapper, layers


class XTransformer(nn.Module):
    r"""Encoder-decoder Transformer: a bidirectional encoder over ``src`` and a causal
    decoder over ``tgt`` that cross-attends to the encoding in every layer (T5's layout).

    .. math::

        c = \text{Enc}(\text{src}), \qquad
        \mathcal{L} = -\frac{1}{|T|} \sum_{t \in T} \log p_\theta\big(y_{t+1} \mid y_{\le t}, c\big),

    where :math:`T` are the target positions whose next token is not ``ignore_index``
    (the decoder's :class:`~mlx_zeta.structs.AutoregressiveWrapper` loss, with ``context=c``
    and ``context_mask=mask``).

    ``encoder`` is a :class:`Transformer` over an :class:`Encoder` (only its embeddings are
    used, so it is built with ``tie_embedding=True`` and has no logits head); ``decoder`` is
    an :class:`~mlx_zeta.structs.AutoregressiveWrapper` around a :class:`Transformer` over a
    :class:`Decoder` with ``cross_attend=True``. Further keywords are routed by prefix:
    ``enc_<name>`` to the encoder and ``dec_<name>`` to the decoder, where ``use_abs_pos_emb``,
    ``emb_dropout``, ``post_emb_norm`` (and for the decoder ``tie_embedding``, tying its
    logits to its input table) go to the :class:`Transformer` and everything else to the
    layer stack, e.g. ``enc_rel_pos_bias=True, dec_rel_pos_bias=True`` for T5's relative
    position bias, ``dec_rotary_pos_emb=True``, ``enc_ff_glu=True``, ``dec_attn_kv_heads=2``.

    Generation encodes ``src`` once; the decoder's self-attention keys/values are cached,
    while its cross-attention keys/values of the encoding are recomputed at every step
    (the cache covers self-attention only; an :math:`O(L_{src})` projection per step).

    Args:
        dim (int): model dimension of encoder and decoder.
        enc_num_tokens, dec_num_tokens (int): source and target vocabulary sizes.
        enc_depth, dec_depth (int): layers. enc_heads, dec_heads (int): attention heads.
        enc_max_seq_len, dec_max_seq_len (int): source and target context lengths.
        tie_token_emb (bool): one token table for encoder and decoder, as in T5 (needs
            ``enc_num_tokens == dec_num_tokens``). Default: ``False``.
        ignore_index (int): target value left out of the loss. Default: ``-100``.
        pad_value (int): padding value for generation. Default: ``0``.

    Calls:
        - ``model(src, tgt, mask=None)`` -> scalar loss; ``mask`` (True = keep) pads ``src``.
        - ``model.encode(src, mask=None)`` -> :math:`(B, L_{src}, \text{dim})`.
        - ``model.generate(src, start_tokens, seq_len, mask=None, **sampling)`` ->
          :math:`(B, \text{seq\_len})` new tokens (``temperature``, ``top_k``, ``top_p``,
          ``min_p``, ``eos_token``, ``cache``, ``key``: see ``AutoregressiveWrapper.generate``).

    Shape:
        - src: :math:`(B, L_{src})`, mask: :math:`(B, L_{src})`, tgt: :math:`(B, L_{tgt})` integer tokens.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.structs import XTransformer
        >>> model = XTransformer(dim=64, enc_num_tokens=100, enc_depth=2, enc_heads=4, enc_max_seq_len=32,
        ...                      dec_num_tokens=100, dec_depth=2, dec_heads=4, dec_max_seq_len=32,
        ...                      tie_token_emb=True, enc_rel_pos_bias=True, dec_rel_pos_bias=True)
        >>> src, tgt = mx.random.randint(0, 100, (2, 16)), mx.random.randint(0, 100, (2, 12))
        >>> model(src, tgt).shape, model.generate(src, tgt[:, :1], 8, top_k=1).shape
        ((), (2, 8))

    Reference: Vaswani et al., https://arxiv.org/abs/1706.03762; Raffel et al. (T5),
    https://arxiv.org/abs/1910.10683; lucidrains/x-transformers (``XTransformer``).
    """

    def __init__(self, dim: int, enc_num_tokens: int, enc_depth: int, enc_heads: int, enc_max_seq_len: int,
                 dec_num_tokens: int, dec_depth: int, dec_heads: int, dec_max_seq_len: int, tie_token_emb: bool = False,
                 ignore_index: int = -100, pad_value: int = 0, **kwargs: Any):
        super().__init__()
        unknown = sorted(k for k in kwargs if not k.startswith(("enc_", "dec_")))
        if unknown:
            raise ValueError(f"[XTransformer] unknown option(s) {unknown}; encoder options take the prefix enc_ "
                             "and decoder options dec_ (e.g. enc_rel_pos_bias=True)")
        fixed = sorted(k for k in kwargs if k in ("enc_dim", "dec_dim", "enc_causal", "dec_causal", "dec_cross_attend"))
        if fixed:
            raise ValueError(f"[XTransformer] {fixed} are set by XTransformer (dim is shared, the encoder is "
                             "bidirectional, the decoder causal and cross-attending)")
        if tie_token_emb and enc_num_tokens != dec_num_tokens:
            raise ValueError(f"[XTransformer] expected enc_num_tokens == dec_num_tokens with tie_token_emb, got "
                             f"enc_num_tokens={enc_num_tokens}, dec_num_tokens={dec_num_tokens}")
        enc_wrapper, enc_layers = _split("enc_", kwargs, _ENC_WRAPPER_OPTIONS)
        dec_wrapper, dec_layers = _split("dec_", kwargs, _DEC_WRAPPER_OPTIONS)
        try:
            encoder_layers = Encoder(dim=dim, depth=enc_depth, heads=enc_heads, **enc_layers)
        except ValueError as error:
            raise ValueError(f"[XTransformer] in the enc_ options: {error}") from error
        try:
            decoder_layers = Decoder(dim=dim, depth=dec_depth, heads=dec_heads, cross_attend=True, **dec_layers)
        except ValueError as error:
            raise ValueError(f"[XTransformer] in the dec_ options: {error}") from error

        # tie_embedding=True: the encoder creates no logits head (it only returns embeddings).
        self.encoder = Transformer(num_tokens=enc_num_tokens, max_seq_len=enc_max_seq_len, attn_layers=encoder_layers,
                                   tie_embedding=True, **enc_wrapper)
        decoder = Transformer(num_tokens=dec_num_tokens, max_seq_len=dec_max_seq_len, attn_layers=decoder_layers,
                              **dec_wrapper)
        if tie_token_emb:
            decoder.token_emb = _SharedTokenEmbedding(self.encoder)
        self.tie_token_emb = tie_token_emb
        self.decoder = AutoregressiveWrapper(decoder, ignore_index=ignore_index, pad_value=pad_value)

    def encode(self, src: mx.array, mask: Optional[mx.array] = None) -> mx.array:
        """The encoder's output embeddings, shape ``(batch, src_len, dim)``."""
        return self.encoder(src, mask=mask, return_embeddings=True)

    def __call__(self, src: mx.array, tgt: mx.array, mask: Optional[mx.array] = None) -> mx.array:
        """Next-token cross-entropy of ``tgt`` given ``src`` (a scalar)."""
        context = self.encode(src, mask=mask)
        return self.decoder(tgt, context=context, context_mask=mask)

    def generate(self, src: mx.array, start_tokens: mx.array, seq_len: int, mask: Optional[mx.array] = None,
                 **sampling: Any) -> mx.array:
        """``seq_len`` new target tokens after ``start_tokens``, conditioned on ``src``. Both must be
        token ids of their vocabulary (:func:`~mlx_zeta.structs.decoding.check_token_ids`)."""
        check_token_ids("XTransformer", "src", src, self.encoder.num_tokens)
        check_token_ids("XTransformer", "start_tokens", start_tokens, self.decoder.net.num_tokens)
        context = self.encode(src, mask=mask)
        return self.decoder.generate(start_tokens, seq_len, context=context, context_mask=mask, **sampling)
