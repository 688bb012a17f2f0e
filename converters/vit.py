"""Hugging Face ViT (``ViTForImageClassification``, ``ViTModel``) as an mlx_zeta model.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.nn.vision import VisionEmbedding
from mlx_zeta.structs import Encoder

from .gpt2 import check_architectures
from .pretrained import ACTIVATIONS, activation
from .llama import rename
from .pretrained import BaseModelArgs

MODEL_TYPES = ("vit",)
ARCHITECTURES = ("ViTForImageClassification", "ViTModel")
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


class ViTEmbeddings(VisionEmbedding):
    r"""Hugging Face ViT's embeddings: patches, class token, learned positions.

    .. math::

        h_0 = [\,e_{\text{cls}};\ W \operatorname{vec}(p_1) + b;\ \dots;\ W \operatorname{vec}(p_N) + b\,] + E_{\text{pos}}

    with :math:`p_i` the non-overlapping ``patch_size`` patches row by row (a strided
    convolution, :class:`~mlx_zeta.nn.vision.VisionEmbedding`) and :math:`E_{\text{pos}}` the
    ``position_embeddings`` :math:`(1, N + 1, D)`, added as they are.

    Shape:
        - Input: :math:`(B, H, W, C)` channels-last, :math:`(H, W)` = ``img_size``.
        - Output: :math:`(B, N + 1, D)`, :math:`N = (H / P_h)(W / P_w)`.
    """

    def __init__(self, img_size: Any, patch_size: Any, in_chans: int, embed_dim: int):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         prepend_cls_token=True)
        self.position_embeddings = mx.zeros((1, self.num_patches + 1, embed_dim))

    def __call__(self, x: mx.array) -> mx.array:
        h = super().__call__(x)  # (B, N + 1, D)
        return h + self.position_embeddings.astype(h.dtype)


class PretrainedViT(nn.Module):
    r"""Hugging Face's ViT on mlx_zeta blocks: embeddings, pre-norm encoder, classifier or pooler.

    .. math::

        H = \text{Encoder}(\text{ViTEmbeddings}(x)),\qquad
        \text{logits} = W_c H_{:, 0} + b_c,\qquad \text{pooled} = \phi(W_p H_{:, 0} + b_p)

    (``Encoder`` ends with its final LayerNorm; :math:`\phi` is ``pooler_act``.)

    Args:
        args (ModelArgs): the checkpoint's config (``hidden_size``, ``num_hidden_layers``, ...).

    Call ``(images, return_embeddings=False)``: the logits with a classifier, else (or with
    ``return_embeddings``) the last hidden states. :meth:`pool` gives the pooler output.
    Images are cast to the weights' dtype first, as Hugging Face does.

    Shape:
        - images: :math:`(B, H, W, C)` channels-last.
        - logits: :math:`(B, \text{num\_labels})`; hidden states: :math:`(B, N + 1, D)`;
          pooled: :math:`(B, \text{pooler\_output\_size})`.

    Example:
        >>> model = mlx_zeta.from_pretrained("google/vit-base-patch16-224", dtype="float32")
        >>> model(mx.zeros((1, 224, 224, 3))).shape
        (1, 1000)
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, eps = args.hidden_size, args.layer_norm_eps
        self.embeddings = ViTEmbeddings(args.image_size, args.patch_size, args.num_channels, dim)
        self.encoder = Encoder(
            dim=dim, depth=args.num_hidden_layers, heads=args.num_attention_heads,
            attn_bias=args.qkv_bias, attn_out_bias=True, ff_inner_dim=args.intermediate_size,
            ff_custom_act=ACTIVATIONS[args.hidden_act], norm=lambda d: nn.LayerNorm(d, eps=eps),
        )
        if args.add_pooling_layer:
            self.pooler = nn.Linear(dim, args.pooler_output_size)
            self.pooler_act = ACTIVATIONS[args.pooler_act]
        if args.classifier:
            self.classifier = nn.Linear(dim, args.num_labels)

    def __call__(self, images: mx.array, return_embeddings: bool = False) -> mx.array:
        h = self.encoder(self.embeddings(images.astype(self.embeddings.proj.weight.dtype)))  # (B, N + 1, D)
        if return_embeddings or "classifier" not in self:
            return h
        return self.classifier(h[:, 0])

    def pool(self, hidden: mx.array) -> mx.array:
        """The pooler on the class token of the last hidden states ``(B, N + 1, D)``."""
        if "pooler" not in self:
            raise ValueError("[PretrainedViT] this model has no pooler (ViTForImageClassification, or a config with "
                             "add_pooling_layer false)")
        return self.pooler_act(self.pooler(hidden[:, 0]))


def build(args: ModelArgs) -> PretrainedViT:
    """A :class:`PretrainedViT` with the checkpoint's shapes (weights still random)."""
    return PretrainedViT(args)


_LAYER = r"^(?:encoder\.layer|layers)\.(\d+)\."
_OURS = r"encoder.layers.\1."
_RENAMES = [
    (r"^embeddings\.patch_embeddings\.projection\.", "embeddings.proj."),
    (r"^layernorm\.", "encoder.final_norm."),
    (r"^pooler\.dense\.", "pooler."),
    (_LAYER + r"attention\.attention\.query\.", _OURS + "attn.to_q."),
    (_LAYER + r"attention\.attention\.key\.", _OURS + "attn.to_k."),
    (_LAYER + r"attention\.attention\.value\.", _OURS + "attn.to_v."),
    (_LAYER + r"attention\.([qkv])_proj\.", _OURS + r"attn.to_\2."),
    (_LAYER + r"attention\.(?:output\.dense|o_proj)\.", _OURS + "attn.to_out."),
    (_LAYER + r"(?:intermediate\.dense|mlp\.fc1)\.", _OURS + "ff.proj_in."),
    (_LAYER + r"(?:output\.dense|mlp\.fc2)\.", _OURS + "ff.proj_out."),
    (_LAYER + r"layernorm_before\.", _OURS + "attn_norm."),
    (_LAYER + r"layernorm_after\.", _OURS + "ff_norm."),
]
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
