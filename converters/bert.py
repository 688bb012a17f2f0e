"""BERT-family checkpoints (BERT, MiniLM, sentence-transformers models) onto
:class:`~mlx_zeta.models.bert.BertEncoder` (re-exported here with ``BertEmbeddings`` and ``mean_pool``).

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

Export (:func:`to_hf`, ``save_pretrained(..., format="hf")``) is the exact inverse for
``BertModel`` (the renaming table :data:`NAMES` read backwards; ``architectures`` becomes
``["BertModel"]``, :func:`hf_config`); dropped task heads are not recreated. A model without a
pooler is loaded by transformers as ``BertModel.from_pretrained(out, config=BertConfig.from_pretrained(out),
add_pooling_layer=False)`` (given a config object, transformers hands the keyword to the constructor
instead of absorbing it into the config, whose ``add_pooling_layer`` key is ours).

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

from mlx_zeta.models.bert import BertEmbeddings, BertEncoder, mean_pool  # noqa: F401  (the model; re-exported)

from .base import ACTIVATIONS, TransformerArgs, activation, rename_rules
from .base import rename as apply_rules

MODEL_TYPES = ("bert",)
TASK = "encoder"

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

    POSITIVE = TransformerArgs.POSITIVE + ("max_position_embeddings", "type_vocab_size")

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


def build(args: ModelArgs) -> BertEncoder:
    """A :class:`~mlx_zeta.models.bert.BertEncoder` with the checkpoint's shapes (weights still random)."""
    return BertEncoder(vocab_size=args.vocab_size, dim=args.hidden_size, depth=args.num_hidden_layers,
                       heads=args.num_attention_heads, ff_inner_dim=args.intermediate_size,
                       max_positions=args.max_position_embeddings, type_vocab_size=args.type_vocab_size,
                       norm_eps=args.layer_norm_eps, activation=ACTIVATIONS[args.hidden_act], pooler=args.has_pooler)


# (Hugging Face, ours) name prefixes, "{i}" a layer index: read by sanitize, written by to_hf.
NAMES = [
    ("embeddings.word_embeddings.", "embeddings.word."),
    ("embeddings.position_embeddings.", "embeddings.position."),
    ("embeddings.token_type_embeddings.", "embeddings.token_type."),
    ("embeddings.LayerNorm.", "embeddings.norm."),
    ("encoder.layer.{i}.attention.self.query.", "encoder.layers.{i}.attn.to_q."),
    ("encoder.layer.{i}.attention.self.key.", "encoder.layers.{i}.attn.to_k."),
    ("encoder.layer.{i}.attention.self.value.", "encoder.layers.{i}.attn.to_v."),
    ("encoder.layer.{i}.attention.output.dense.", "encoder.layers.{i}.attn.to_out."),
    ("encoder.layer.{i}.attention.output.LayerNorm.", "encoder.layers.{i}.attn_norm."),
    ("encoder.layer.{i}.intermediate.dense.", "encoder.layers.{i}.ff.proj_in."),
    ("encoder.layer.{i}.output.dense.", "encoder.layers.{i}.ff.proj_out."),
    ("encoder.layer.{i}.output.LayerNorm.", "encoder.layers.{i}.ff_norm."),
    ("pooler.dense.", "pooler."),
]
_RENAMES, _TO_HF = rename_rules(NAMES, {"i": r"\d+"})
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


def to_hf(weights: Dict[str, mx.array], args: ModelArgs) -> Dict[str, mx.array]:
    """The inverse of :func:`sanitize`: :class:`BertEncoder`'s names to ``BertModel``'s (no ``bert.``
    prefix; the layouts are the same). A model without a pooler writes none: transformers'
    ``BertModel`` then needs ``add_pooling_layer=False`` (a constructor argument; see the module docstring).
    Pure; ``sanitize(to_hf(w, args), args) == w``."""
    return {apply_rules(name, _TO_HF): value for name, value in weights.items()}


def hf_config(config: Dict, args: ModelArgs) -> Dict:
    """``config.json`` for :func:`to_hf`'s weights: ``architectures`` ``["BertModel"]`` (task heads were
    dropped on load), and ``"add_pooling_layer": false`` kept for a model without a pooler (which
    ``BertModel`` alone would otherwise imply when it is read back here)."""
    config = {**config, "architectures": ["BertModel"]}
    if not args.has_pooler:
        config["add_pooling_layer"] = False
    return config
