"""Plain PyTorch references for mlx_zeta.nn.vision and mlx_zeta.nn.unet, from the papers.

Images are NCHW here (torch's convention); the tests transpose from MLX's NHWC.
Parameter names equal the MLX modules', so the parity maps only carry layouts:
conv weights MLX (O, kh, kw, I) -> torch (O, I, kh, kw); transposed-conv weights
MLX (O, kh, kw, I) -> torch (I, O, kh, kw).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def conv_layout(w: np.ndarray) -> np.ndarray:
    """MLX conv weight (O, kh, kw, I) -> torch Conv2d (O, I, kh, kw)."""
    return w.transpose(0, 3, 1, 2)


def conv_transpose_layout(w: np.ndarray) -> np.ndarray:
    """MLX ConvTranspose2d weight (O, kh, kw, I) -> torch ConvTranspose2d (I, O, kh, kw)."""
    return w.transpose(3, 0, 1, 2)


def nhwc(fn):
    """torch_call wrapper: NHWC input -> module on NCHW -> NHWC output."""
    return lambda m, x, *rest: fn(m, x.permute(0, 3, 1, 2), *rest).permute(0, 2, 3, 1)


# ----------------------------------------------------------------------------- ViT / BEiT


class VisionEmbeddingRef(nn.Module):
    """ViT patch embedding written as patchify + linear map (no convolution), BEiT masking, CLS."""

    def __init__(self, img_size: Tuple[int, int], patch_size: Tuple[int, int], in_chans: int, embed_dim: int,
                 mask_token: bool, cls_token: bool):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(torch.zeros(embed_dim, in_chans, *patch_size))
        self.proj.bias = nn.Parameter(torch.zeros(embed_dim))
        if mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))

    def forward(self, x: torch.Tensor, masked_position: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, c, h, w = x.shape
        ph, pw = self.patch_size
        # (B, C, Hp, ph, Wp, pw) -> (B, Hp, Wp, C, ph, pw) -> (B, N, C*ph*pw): patch i row by row
        patches = x.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * ph * pw)
        tokens = patches @ self.proj.weight.reshape(self.proj.weight.shape[0], -1).T + self.proj.bias
        if masked_position is not None:
            m = masked_position.to(tokens.dtype).unsqueeze(-1)
            tokens = tokens * (1 - m) + self.mask_token * m
        if hasattr(self, "cls_token"):
            tokens = torch.cat([self.cls_token.expand(b, 1, -1), tokens], dim=1)
        return tokens


# ----------------------------------------------------------------------------- U-Net


class DoubleConvRef(nn.Module):
    def __init__(self, cin: int, cout: int, cmid: Optional[int] = None):
        super().__init__()
        cmid = cmid or cout
        self.conv1 = nn.Conv2d(cin, cmid, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cmid)
        self.conv2 = nn.Conv2d(cmid, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class DownRef(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = DoubleConvRef(cin, cout)

    def forward(self, x):
        return self.conv(F.max_pool2d(x, 2))


class UpRef(nn.Module):
    def __init__(self, cin: int, cout: int, bilinear: bool):
        super().__init__()
        self.bilinear = bilinear
        if bilinear:
            self.conv = DoubleConvRef(cin, cout, cin // 2)
        else:
            self.up = nn.ConvTranspose2d(cin, cin // 2, 2, stride=2)
            self.conv = DoubleConvRef(cin, cout)

    def forward(self, x, skip):
        if self.bilinear:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            x = self.up(x)
        dy, dx = skip.shape[2] - x.shape[2], skip.shape[3] - x.shape[3]
        x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])  # centre, extra row/col at the end
        return self.conv(torch.cat([skip, x], dim=1))


class OutConvRef(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.conv(x)


class UnetRef(nn.Module):
    def __init__(self, n_channels: int, n_classes: int, bilinear: bool, c: int):
        super().__init__()
        f = 2 if bilinear else 1
        self.inc = DoubleConvRef(n_channels, c)
        self.down1, self.down2, self.down3 = DownRef(c, 2 * c), DownRef(2 * c, 4 * c), DownRef(4 * c, 8 * c)
        self.down4 = DownRef(8 * c, 16 * c // f)
        self.up1, self.up2 = UpRef(16 * c, 8 * c // f, bilinear), UpRef(8 * c, 4 * c // f, bilinear)
        self.up3, self.up4 = UpRef(4 * c, 2 * c // f, bilinear), UpRef(2 * c, c, bilinear)
        self.outc = OutConvRef(c, n_classes)

    def forward(self, x):
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x = self.up1(self.down4(x4), x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        return self.outc(self.up4(x, x1))

