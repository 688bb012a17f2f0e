"""Vision Transformer on channels-last images (x-transformers' ``ViTransformerWrapper``)."""

from typing import Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.common import check_int, check_int_pair
from mlx_zeta.structs.attention_layers import AttentionLayers

__all__ = ["ViTransformerWrapper"]

IntPair = Union[int, Tuple[int, int]]


def patchify(img: mx.array, patch_size: Tuple[int, int]) -> mx.array:
    r"""Cut channels-last images into flattened non-overlapping patches, row by row.

    Shape: :math:`(B, H, W, C) \to (B, (H/p_h)(W/p_w), p_h p_w C)`; each patch is flattened
    in ``(p_h, p_w, C)`` order (einops ``b (h p1) (w p2) c -> b (h w) (p1 p2 c)``).
    """
    b, h, w, c = img.shape
    ph, pw = patch_size
    x = img.reshape(b, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 2, 4, 5)  # (B, Hp, Wp, ph, pw, C)
    return x.reshape(b, (h // ph) * (w // pw), ph * pw * c)


class ViTransformerWrapper(nn.Module):
    r"""Vision Transformer: patch embedding, an encoder stack, mean pooling and a linear head.

    The image is cut into :math:`N = (H / p_h)(W / p_w)` patches :math:`p_i` (row by row,
    each flattened to :math:`p_h p_w C` values in ``(p_h, p_w, C)`` order), embedded as in
    x-transformers,

    .. math::

        x_i = \text{LN}_2\big(W_e\, \text{LN}_1(p_i) + b_e\big) + e_i, \qquad
        h = \text{layers}\big(\text{Drop}(N_e(x))\big),

    with :math:`e_i` a learned position embedding (initialised :math:`\mathcal{N}(0, 1)`)
    and :math:`N_e` the optional ``post_emb_norm`` LayerNorm. With ``num_classes`` the
    patch embeddings are mean-pooled and mapped to logits,

    .. math::

        \text{logits} = W_o\, \tfrac{1}{N} \textstyle\sum_i h_i + b_o.

    There is no class token (x-transformers' current design); the patch projection is
    a ``Linear`` over flattened patches rather than :class:`~mlx_zeta.nn.VisionEmbedding`'s
    convolution because a LayerNorm acts on the raw patch values first.

    Args:
        image_size (int or tuple(int, int)): image height and width (an int: square).
        patch_size (int or tuple(int, int)): patch height and width; must divide ``image_size``.
        attn_layers (AttentionLayers): a bidirectional stack without cross-attention,
            e.g. :class:`~mlx_zeta.structs.Encoder`.
        channels (int): image channels :math:`C`. Default: ``3``.
        num_classes (int, optional): classification head size; ``None`` returns the patch
            embeddings. Default: ``None``.
        post_emb_norm (bool): LayerNorm after adding the position embedding. Default: ``False``.
        emb_dropout (float): dropout on the embeddings in training. Default: ``0.0``.

    Call ``(img, return_embeddings=False)``.

    Shape:
        - img: :math:`(B, H, W, C)` channels-last.
        - output: :math:`(B, \text{num\_classes})`, or :math:`(B, N, \text{dim})` with
          ``return_embeddings`` or without ``num_classes``.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.structs import ViTransformerWrapper, Encoder
        >>> vit = ViTransformerWrapper(image_size=32, patch_size=8, num_classes=10,
        ...                            attn_layers=Encoder(dim=64, depth=2, heads=4))
        >>> vit(mx.random.normal((2, 32, 32, 3))).shape
        (2, 10)

    Reference: Dosovitskiy et al., "An Image is Worth 16x16 Words", https://arxiv.org/abs/2010.11929;
    lucidrains/x-transformers (``ViTransformerWrapper``).
    """

    def __init__(self, image_size: IntPair, patch_size: IntPair, attn_layers: AttentionLayers, channels: int = 3,
                 num_classes: Optional[int] = None, post_emb_norm: bool = False, emb_dropout: float = 0.0):
        super().__init__()
        image_size = check_int_pair("ViTransformerWrapper", "image_size", image_size)
        patch_size = check_int_pair("ViTransformerWrapper", "patch_size", patch_size)
        if image_size[0] % patch_size[0] or image_size[1] % patch_size[1]:
            raise ValueError(f"[ViTransformerWrapper] expected image_size {image_size} to be divisible by "
                             f"patch_size {patch_size} on both axes")
        check_int("ViTransformerWrapper", "channels", channels, 1)
        check_int("ViTransformerWrapper", "num_classes", num_classes, 1, optional=True)
        if not isinstance(attn_layers, AttentionLayers):
            raise ValueError(f"[ViTransformerWrapper] expected attn_layers to be an AttentionLayers (e.g. Encoder), "
                             f"got {type(attn_layers).__name__}")
        if attn_layers.causal or attn_layers.cross_attend:
            raise ValueError(f"[ViTransformerWrapper] expected a bidirectional stack without cross-attention "
                             f"(Encoder), got causal={attn_layers.causal}, cross_attend={attn_layers.cross_attend}")
        if not 0.0 <= emb_dropout < 1.0:
            raise ValueError(f"[ViTransformerWrapper] expected 0 <= emb_dropout < 1, got {emb_dropout}")
        dim = attn_layers.dim
        self.image_size, self.patch_size, self.channels, self.dim = image_size, patch_size, channels, dim
        self.num_patches = (image_size[0] // patch_size[0]) * (image_size[1] // patch_size[1])
        patch_dim = channels * patch_size[0] * patch_size[1]

        self.patch_norm = nn.LayerNorm(patch_dim)
        self.patch_to_embedding = nn.Linear(patch_dim, dim)
        self.emb_norm = nn.LayerNorm(dim)
        self.pos_embedding = mx.random.normal((1, self.num_patches, dim))
        if post_emb_norm:
            self.post_emb_norm = nn.LayerNorm(dim)
        if emb_dropout > 0:
            self.emb_dropout = nn.Dropout(emb_dropout)
        self.attn_layers = attn_layers
        if num_classes is not None:
            self.mlp_head = nn.Linear(dim, num_classes)

    def _extra_repr(self) -> str:
        return (f"image_size={self.image_size}, patch_size={self.patch_size}, channels={self.channels}, "
                f"num_patches={self.num_patches}")

    def __call__(self, img: mx.array, return_embeddings: bool = False) -> mx.array:
        expected = (*self.image_size, self.channels)
        if img.ndim != 4 or tuple(img.shape[1:]) != expected:
            raise ValueError(f"[ViTransformerWrapper] expected channels-last images of shape "
                             f"(batch, {expected[0]}, {expected[1]}, {expected[2]}), got shape {tuple(img.shape)}")
        x = patchify(img, self.patch_size)  # (B, N, ph * pw * C)
        x = self.emb_norm(self.patch_to_embedding(self.patch_norm(x)))  # (B, N, dim)
        x = x + self.pos_embedding.astype(x.dtype)
        if "post_emb_norm" in self:
            x = self.post_emb_norm(x)
        if "emb_dropout" in self:
            x = self.emb_dropout(x)
        h = self.attn_layers(x)  # (B, N, dim)
        if return_embeddings or "mlp_head" not in self:
            return h
        return self.mlp_head(h.mean(axis=1))  # (B, num_classes)
