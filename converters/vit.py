"""Hugging Face ViT checkpoints (``ViTForImageClassification``, ``ViTModel``) onto
:class:`~mlx_zeta.models.vit.PretrainedViT` (re-exported here with ``ViTEmbeddings``).

:class:`PretrainedViT` is Hugging Face's ViT (Dosovitskiy et al., https://arxiv.org/abs/2010.11929)
made of mlx_zeta blocks: :class:`ViTEmbeddings` (a convolutional patch embedding, a class
token and learned position embeddings) followed by a pre-norm
:class:`~mlx_zeta.structs.Encoder` (``nn.LayerNorm(dim, eps=layer_norm_eps)``, biased q/k/v
when ``qkv_bias``, biased output projection, a ``hidden_act`` feed-forward of width
``intermediate_size``) whose final norm is Hugging Face's ``layernorm``; then the
classifier on the class token or, for ``ViTModel``, the optional pooler.
(:mod:`mlx_zeta.structs.vit` is the x-transformers ViT — patch LayerNorm, mean pooling, no
class token — and does not match these checkpoints.)

Images are channels-last, ``(B, H, W, C)`` (MLX's convention; Hugging Face takes
``(B, C, H, W)``: pass ``pixel_values.transpose(0, 2, 3, 1)``), of exactly ``image_size``
(position embeddings are not interpolated).

Which head is built comes from config.json: ``architectures`` naming
``ViTForImageClassification`` gives the classifier (``num_labels = len(id2label)``); otherwise
the ``ViTModel`` trunk with a pooler unless the config says ``"add_pooling_layer": false``
(Hugging Face's default is a pooler; a key to add for checkpoints saved without one).

Weight names (Hugging Face -> mlx_zeta; the ``vit.`` prefix is optional):
``embeddings.patch_embeddings.projection`` -> ``embeddings.proj`` (``(out, in, kh, kw)`` ->
``(out, kh, kw, in)``), ``embeddings.{cls_token, position_embeddings}`` as they are,
``encoder.layer.i.attention.attention.{query,key,value}`` -> ``encoder.layers.i.attn.to_{q,k,v}``,
``...attention.output.dense`` -> ``...attn.to_out``, ``...intermediate.dense`` -> ``...ff.proj_in``,
``...output.dense`` -> ``...ff.proj_out``, ``...layernorm_{before,after}`` -> ``...{attn,ff}_norm``,
``layernorm`` -> ``encoder.final_norm``, ``pooler.dense`` -> ``pooler``, ``classifier`` as it is.
The names transformers >= 5 uses in memory (``layers.i.attention.{q,k,v,o}_proj``,
``layers.i.mlp.fc{1,2}``) are read too. A ``mask_token`` (masked image modelling) is dropped.

Export (:func:`to_hf`, ``save_pretrained(..., format="hf")``) is the exact inverse: the checkpoint
names (:data:`NAMES` read backwards, ``vit.`` prefixed for the classifier), the convolution back to
``(out, in, kh, kw)``, ``architectures`` the class built (:func:`hf_config`); the in-memory names
above are never written. A ``ViTModel`` without a pooler is loaded by transformers as
``ViTModel.from_pretrained(out, config=ViTConfig.from_pretrained(out), add_pooling_layer=False)``
(given a config object, transformers hands the keyword to the constructor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

import mlx.core as mx

from mlx_zeta.models.vit import PretrainedViT, ViTEmbeddings  # noqa: F401  (the model; re-exported)

from .base import ACTIVATIONS, BaseModelArgs, activation, check_architectures, rename_rules, rename

MODEL_TYPES = ("vit",)
ARCHITECTURES = ("ViTForImageClassification", "ViTModel")
TASK = "vision"
WHERE = "vit converter"


@dataclass
class ModelArgs(BaseModelArgs):
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    image_size: Any = 224
    patch_size: Any = 16
    num_channels: int = 3
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True
    pooler_output_size: Optional[int] = None
    pooler_act: str = "tanh"
    architectures: Optional[Sequence[str]] = None
    id2label: Optional[Dict[str, str]] = None
    num_labels: Optional[int] = None
    add_pooling_layer: Optional[bool] = None

    POSITIVE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "num_channels")

    def __post_init__(self):
        activation(self.hidden_act, WHERE, "hidden_act")
        check_architectures(self.architectures, ARCHITECTURES, WHERE)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"[{WHERE}] expected num_attention_heads to divide hidden_size, got hidden_size="
                             f"{self.hidden_size}, num_attention_heads={self.num_attention_heads}")
        if self.classifier:
            self.num_labels = len(self.id2label) if self.id2label else (self.num_labels or 2)
            self.add_pooling_layer = False  # ViTForImageClassification has no pooler
        elif self.add_pooling_layer is None:
            self.add_pooling_layer = True
        if self.add_pooling_layer:
            activation(self.pooler_act, WHERE, "pooler_act")
            self.pooler_output_size = self.pooler_output_size or self.hidden_size

    @property
    def classifier(self) -> bool:
        return "ViTForImageClassification" in (self.architectures or ())


def build(args: ModelArgs) -> PretrainedViT:
    """A :class:`~mlx_zeta.models.vit.PretrainedViT` with the checkpoint's shapes (weights still random)."""
    return PretrainedViT(
        args.image_size, args.patch_size, dim=args.hidden_size, depth=args.num_hidden_layers,
        heads=args.num_attention_heads, ff_inner_dim=args.intermediate_size, num_channels=args.num_channels,
        norm_eps=args.layer_norm_eps, qkv_bias=args.qkv_bias, activation=ACTIVATIONS[args.hidden_act],
        num_labels=args.num_labels if args.classifier else None,
        pooler_dim=args.pooler_output_size if args.add_pooling_layer else None,
        pooler_act=ACTIVATIONS[args.pooler_act] if args.add_pooling_layer else mx.tanh)


# (Hugging Face, ours) name prefixes, "{i}" a layer index: read by sanitize, written by to_hf.
NAMES = [
    ("embeddings.patch_embeddings.projection.", "embeddings.proj."),
    ("layernorm.", "encoder.final_norm."),
    ("pooler.dense.", "pooler."),
    ("encoder.layer.{i}.attention.attention.query.", "encoder.layers.{i}.attn.to_q."),
    ("encoder.layer.{i}.attention.attention.key.", "encoder.layers.{i}.attn.to_k."),
    ("encoder.layer.{i}.attention.attention.value.", "encoder.layers.{i}.attn.to_v."),
    ("encoder.layer.{i}.attention.output.dense.", "encoder.layers.{i}.attn.to_out."),
    ("encoder.layer.{i}.intermediate.dense.", "encoder.layers.{i}.ff.proj_in."),
    ("encoder.layer.{i}.output.dense.", "encoder.layers.{i}.ff.proj_out."),
    ("encoder.layer.{i}.layernorm_before.", "encoder.layers.{i}.attn_norm."),
    ("encoder.layer.{i}.layernorm_after.", "encoder.layers.{i}.ff_norm."),
]
_OURS = r"encoder.layers.\1."
# The names transformers >= 5 uses in memory, read (never written).
_IN_MEMORY = [
    (r"^layers\.(\d+)\.attention\.([qkv])_proj\.", _OURS + r"attn.to_\2."),
    (r"^layers\.(\d+)\.attention\.o_proj\.", _OURS + "attn.to_out."),
    (r"^layers\.(\d+)\.mlp\.fc1\.", _OURS + "ff.proj_in."),
    (r"^layers\.(\d+)\.mlp\.fc2\.", _OURS + "ff.proj_out."),
    (r"^layers\.(\d+)\.layernorm_before\.", _OURS + "attn_norm."),
    (r"^layers\.(\d+)\.layernorm_after\.", _OURS + "ff_norm."),
]
_FROM_HF, _TO_HF = rename_rules(NAMES, {"i": r"\d+"})
_RENAMES = _FROM_HF + _IN_MEMORY
_CONV = "embeddings.patch_embeddings.projection.weight"


def sanitize(weights: Dict[str, mx.array], args: ModelArgs) -> Dict[str, mx.array]:
    """Hugging Face names and layouts to :class:`PretrainedViT`'s: the patch convolution to
    channels-last, ``mask_token`` dropped, pooler weights dropped when the model has none.
    Pure and idempotent (mlx_zeta names pass through).

    Raises:
        ValueError: a ``ViTModel`` config expecting a pooler but no pooler weights (set
            ``"add_pooling_layer": false`` in config.json).
    """
    out: Dict[str, mx.array] = {}
    for name, value in weights.items():
        name = name[len("vit."):] if name.startswith("vit.") else name
        if name == "embeddings.mask_token" or (name.startswith("pooler.") and not args.add_pooling_layer):
            continue
        out[rename(name, _RENAMES)] = value.transpose(0, 2, 3, 1) if name == _CONV else value
    if args.add_pooling_layer and weights and not any(k.startswith("pooler.") for k in out):
        raise ValueError(f"[{WHERE}] the config builds a ViTModel with a pooler but the checkpoint has no "
                         "pooler.dense weights; add \"add_pooling_layer\": false to its config.json")
    return out


def to_hf(weights: Dict[str, mx.array], args: ModelArgs) -> Dict[str, mx.array]:
    """The inverse of :func:`sanitize`: :class:`PretrainedViT`'s names and layouts to the checkpoint
    transformers writes: ``ViTForImageClassification``'s (``vit.`` prefixed, ``classifier`` as it is)
    when the model has a classifier, else ``ViTModel``'s (no prefix); the patch convolution back to
    ``(out, in, kh, kw)`` (row-contiguous). A ``ViTModel`` without a pooler writes none: transformers
    then needs ``add_pooling_layer=False`` (a constructor argument). Pure;
    ``sanitize(to_hf(w, args), args) == w``."""
    prefix, out = ("vit." if args.classifier else ""), {}
    for name, value in weights.items():
        if name.startswith("classifier."):
            out[name] = value
            continue
        hf = rename(name, _TO_HF)
        out[prefix + hf] = mx.contiguous(value.transpose(0, 3, 1, 2)) if hf == _CONV else value
    return out


def hf_config(config: Dict, args: ModelArgs) -> Dict:
    """``config.json`` for :func:`to_hf`'s weights: ``architectures`` the class they are named for,
    ``"add_pooling_layer": false`` kept for a ``ViTModel`` without a pooler."""
    config = {**config, "architectures": ["ViTForImageClassification" if args.classifier else "ViTModel"]}
    if not args.classifier and not args.add_pooling_layer:
        config["add_pooling_layer"] = False
    return config
