"""Plain PyTorch Vision Transformer, written from the math, for parity with
mlx_zeta.structs.ViTransformerWrapper.

Stated independently here:
- Images stay channels-last (B, H, W, C). Patch (r, c) of the (H/ph) x (W/pw) grid is
  cut out by slicing, patches are numbered row by row (index r * W/pw + c) and each
  is flattened in (ph, pw, C) order.
- x_i = LN_2(W_e LN_1(p_i) + b_e) + e_i (learned e_i), optional LayerNorm, then the
  TorchAttentionLayers encoder.
- Head: logits = W_o mean_i(h_i) + b_o.

Parameter names mirror the flattened MLX names, so check_parity needs no param_map.
"""

from __future__ import annotations

import torch
from torch import nn

from reference.structs import TorchAttentionLayers


def patches_by_slicing(img: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, N, ph * pw * C), one slice per patch, row-major over the grid."""
    b, h, w, c = img.shape
    out = [img[:, r * ph : (r + 1) * ph, q * pw : (q + 1) * pw, :].reshape(b, ph * pw * c)
           for r in range(h // ph) for q in range(w // pw)]
    return torch.stack(out, dim=1)


class TorchViT(nn.Module):
    def __init__(self, image_size, patch_size, attn_layers: TorchAttentionLayers, dim: int, channels: int = 3,
                 num_classes=None, post_emb_norm: bool = False):
        super().__init__()
        self.image_size, self.patch_size = image_size, patch_size
        num_patches = (image_size[0] // patch_size[0]) * (image_size[1] // patch_size[1])
        patch_dim = channels * patch_size[0] * patch_size[1]
        self.patch_norm = nn.LayerNorm(patch_dim)
        self.patch_to_embedding = nn.Linear(patch_dim, dim)
        self.emb_norm = nn.LayerNorm(dim)
        self.pos_embedding = nn.Parameter(torch.zeros(1, num_patches, dim))
        if post_emb_norm:
            self.post_emb_norm = nn.LayerNorm(dim)
        self.attn_layers = attn_layers
        if num_classes is not None:
            self.mlp_head = nn.Linear(dim, num_classes)

    def forward(self, img: torch.Tensor, return_embeddings: bool = False) -> torch.Tensor:
        x = patches_by_slicing(img, *self.patch_size)
        x = self.emb_norm(self.patch_to_embedding(self.patch_norm(x))) + self.pos_embedding
        if hasattr(self, "post_emb_norm"):
            x = self.post_emb_norm(x)
        h = self.attn_layers(x)
        if return_embeddings or not hasattr(self, "mlp_head"):
            return h
        return self.mlp_head(h.sum(dim=1) / h.shape[1])
