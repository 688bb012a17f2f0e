"""Vision embeddings: images to sequences of patch tokens (ViT / BEiT)."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.common import check_int, check_int_pair

__all__ = ["VisionEmbedding"]

IntPair = Union[int, Tuple[int, int]]
_PAIR = "{} must be a positive int or a pair (h, w) of positive ints"


class VisionEmbedding(nn.Module):
    r"""Image to patch embedding, with optional BEiT mask token and ViT class token.

    The image is cut into non-overlapping ``patch_size`` patches; each patch
    :math:`p_i` (flattened to :math:`P_h P_w C` values) is projected linearly,
    implemented as a convolution whose kernel and stride are the patch size:

    .. math::

        x_i = W \operatorname{vec}(p_i) + b, \qquad i = 1, \dots, N,
        \quad N = \frac{H}{P_h} \frac{W}{P_w}.

    Patches are numbered row by row. With ``contain_mask_token`` the patches
    marked by ``masked_position`` (:math:`m_i \in \{0, 1\}`) are replaced by a
    learned token :math:`e_{[M]}` (BEiT's masked image modelling):

    .. math::

        x_i \leftarrow (1 - m_i)\, x_i + m_i\, e_{[M]},

    and with ``prepend_cls_token`` a learned :math:`e_{[CLS]}` is put in front
    of the sequence. Both tokens start from a normal distribution of standard
    deviation 0.02 truncated at two standard deviations.

    Args:
        img_size (int or tuple(int, int)): Image height and width; an int
            means a square image. Default: ``224``.
        patch_size (int or tuple(int, int)): Patch height and width; must
            divide ``img_size``. Default: ``16``.
        in_chans (int): Number of image channels. Default: ``3``.
        embed_dim (int): Dimension of each patch token. Default: ``768``.
        contain_mask_token (bool): Create the learnable ``mask_token`` used
            with ``masked_position``. Default: ``False``.
        prepend_cls_token (bool): Create a learnable ``cls_token`` and put it
            first in every sequence. Default: ``False``.

    Shape:
        - Input: ``x`` :math:`(B, H, W, C_{in})` channels-last, and
          optionally ``masked_position`` :math:`(B, N)` (bool or 0/1).
        - Output: :math:`(B, N, D)`, or :math:`(B, N + 1, D)` with the class
          token, where :math:`D` is ``embed_dim``.

    Example:
        >>> import mlx_zeta
        >>> import mlx.core as mx
        >>> from mlx_zeta.nn.vision import VisionEmbedding
        >>> emb = VisionEmbedding(img_size=224, patch_size=16, in_chans=3, embed_dim=768,
        ...                       contain_mask_token=True, prepend_cls_token=True)
        >>> emb(mx.random.uniform(shape=(1, 224, 224, 3))).shape
        (1, 197, 768)

    References:
        Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021,
        https://arxiv.org/abs/2010.11929; Bao et al., "BEiT: BERT Pre-Training
        of Image Transformers", ICLR 2022, https://arxiv.org/abs/2106.08254.
    """

    def __init__(
        self,
        img_size: IntPair = 224,
        patch_size: IntPair = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        contain_mask_token: bool = False,
        prepend_cls_token: bool = False,
    ):
        super().__init__()
        img_size = check_int_pair("VisionEmbedding", "img_size", img_size, says=_PAIR.format("img_size"))
        patch_size = check_int_pair("VisionEmbedding", "patch_size", patch_size, says=_PAIR.format("patch_size"))
        if img_size[0] % patch_size[0] or img_size[1] % patch_size[1]:
            raise ValueError(
                f"[VisionEmbedding] img_size {img_size} must be divisible by patch_size {patch_size} on both axes"
            )
        for name, value in (("in_chans", in_chans), ("embed_dim", embed_dim)):
            check_int("VisionEmbedding", name, value, 1, says=f"{name} must be a positive int")

        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.patch_shape = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])
        self.num_patches = self.patch_shape[0] * self.patch_shape[1]

        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        if contain_mask_token:
            self.mask_token = 0.02 * mx.random.truncated_normal(-2.0, 2.0, (1, 1, embed_dim))
        if prepend_cls_token:
            self.cls_token = 0.02 * mx.random.truncated_normal(-2.0, 2.0, (1, 1, embed_dim))

    def _extra_repr(self) -> str:
        return (
            f"img_size={self.img_size}, patch_size={self.patch_size}, in_chans={self.in_chans}, "
            f"embed_dim={self.embed_dim}, contain_mask_token={'mask_token' in self}, "
            f"prepend_cls_token={'cls_token' in self}"
        )

    def num_position_embeddings(self) -> int:
        """Length of the output sequence: ``num_patches``, plus one with the class token."""
        return self.num_patches + (1 if "cls_token" in self else 0)

    def __call__(self, x: mx.array, masked_position: Optional[mx.array] = None, **kwargs) -> mx.array:
        if kwargs:
            raise ValueError(
                f"[VisionEmbedding] unknown keyword argument(s) {sorted(kwargs)}; accepted: masked_position"
            )
        expected = (*self.img_size, self.in_chans)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"[VisionEmbedding] expected images of shape (batch, {expected[0]}, {expected[1]}, {expected[2]}), "
                f"got {tuple(x.shape)}"
            )
        batch = x.shape[0]
        x = self.proj(x).reshape(batch, self.num_patches, self.embed_dim)  # (B, N, D), patches row by row

        if masked_position is not None:
            if "mask_token" not in self:
                raise ValueError(
                    "[VisionEmbedding] masked_position was given but the module has no mask_token; "
                    "build it with contain_mask_token=True"
                )
            if tuple(masked_position.shape) != (batch, self.num_patches):
                raise ValueError(
                    f"[VisionEmbedding] expected masked_position of shape (batch, num_patches) = "
                    f"({batch}, {self.num_patches}), got {tuple(masked_position.shape)}"
                )
            w = masked_position[..., None].astype(x.dtype)  # (B, N, 1)
            x = x * (1 - w) + self.mask_token.astype(x.dtype) * w

        if "cls_token" in self:
            cls = mx.broadcast_to(self.cls_token.astype(x.dtype), (batch, 1, self.embed_dim))
            x = mx.concatenate([cls, x], axis=1)
        return x
