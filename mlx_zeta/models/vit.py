r"""Hugging Face's ViT (``ViTForImageClassification``, ``ViTModel``) on mlx_zeta blocks.

:class:`PretrainedViT` (Dosovitskiy et al., https://arxiv.org/abs/2010.11929) is
:class:`ViTEmbeddings` (a convolutional patch embedding, a class token and learned position
embeddings) followed by a pre-norm :class:`~mlx_zeta.structs.Encoder` whose final norm is
Hugging Face's ``layernorm``; then the classifier on the class token or the optional pooler.
(:mod:`mlx_zeta.structs.vit` is the x-transformers ViT and does not match these checkpoints.)
Checkpoints load through :mod:`mlx_zeta.converters.vit`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.nn.vision import VisionEmbedding
from mlx_zeta.structs import Encoder

__all__ = ["ViTEmbeddings", "PretrainedViT"]


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
        image_size (int or tuple of int): input height and width.
        patch_size (int or tuple of int): patch size.
        dim (int): hidden size.
        depth (int): encoder layers.
        heads (int): attention heads.
        ff_inner_dim (int): feed-forward width.
        num_channels (int): image channels. Default: ``3``.
        norm_eps (float): LayerNorm epsilon. Default: ``1e-12``.
        qkv_bias (bool): biases on the query/key/value projections. Default: ``True``.
        activation (callable): feed-forward activation. Default: ``nn.gelu`` (exact).
        num_labels (int, optional): build the classifier with this many classes. Default: ``None``.
        pooler_dim (int, optional): build the pooler with this output width. Default: ``None``.
        pooler_act (callable): the pooler's activation :math:`\phi`. Default: ``mx.tanh``.

    Call ``(images, return_embeddings=False)``: the logits with a classifier, else (or with
    ``return_embeddings``) the last hidden states. :meth:`pool` gives the pooler output.
    Images are cast to the weights' dtype first, as Hugging Face does.

    Shape:
        - images: :math:`(B, H, W, C)` channels-last.
        - logits: :math:`(B, \text{num\_labels})`; hidden states: :math:`(B, N + 1, D)`;
          pooled: :math:`(B, \text{pooler\_output\_size})`.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.models import PretrainedViT
        >>> model = PretrainedViT(32, 8, dim=64, depth=2, heads=4, ff_inner_dim=128, num_labels=10)
        >>> model(mx.zeros((1, 32, 32, 3))).shape
        (1, 10)
    """

    def __init__(self, image_size: Any, patch_size: Any, dim: int, depth: int, heads: int, ff_inner_dim: int, *,
                 num_channels: int = 3, norm_eps: float = 1e-12, qkv_bias: bool = True,
                 activation: Callable[[mx.array], mx.array] = nn.gelu, num_labels: Optional[int] = None,
                 pooler_dim: Optional[int] = None, pooler_act: Callable[[mx.array], mx.array] = mx.tanh):
        super().__init__()
        self.embeddings = ViTEmbeddings(image_size, patch_size, num_channels, dim)
        self.encoder = Encoder(
            dim=dim, depth=depth, heads=heads, attn_bias=qkv_bias, attn_out_bias=True, ff_inner_dim=ff_inner_dim,
            ff_custom_act=activation, norm=lambda d: nn.LayerNorm(d, eps=norm_eps),
        )
        if pooler_dim is not None:
            self.pooler = nn.Linear(dim, pooler_dim)
            self.pooler_act = pooler_act
        if num_labels is not None:
            self.classifier = nn.Linear(dim, num_labels)

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
