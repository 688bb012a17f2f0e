"""Plain PyTorch references for mlx_zeta.nn.positional, written from the papers' math.

RoPE is written as an explicit 2x2 rotation of the feature pairs (x_i, x_{i+d/2})
rather than through rotate_half; ALiBi and the T5 buckets are built element by
element from their definitions. Parameter names match the MLX blocks.
"""

from __future__ import annotations

import math
from typing import List, Optional

import numpy as np
import torch
from torch import nn


# ----------------------------------------------------------------------------- RoPE / xPos


def rope_angles(dim: int, positions: torch.Tensor, base: float = 10000.0, interpolation_factor: float = 1.0) -> torch.Tensor:
    """Angles p * base^(-2k/dim) / lambda, shape (L, dim/2), k = 0..dim/2-1 (RoFormer eq. 15)."""
    k = torch.arange(dim // 2, dtype=torch.float64)
    theta = base ** (-2.0 * k / dim)
    return (positions.double()[:, None] / interpolation_factor) * theta[None, :]


def xpos_scale(dim: int, positions: torch.Tensor, center: int, scale_base: float) -> torch.Tensor:
    """xPos zeta_k^((p - c)/gamma), zeta_k = (2k + 0.4 dim)/(1.4 dim); shape (L, dim/2) (Sun et al. 2022, eq. 9)."""
    k = torch.arange(dim // 2, dtype=torch.float64)
    zeta = (2.0 * k + 0.4 * dim) / (1.4 * dim)
    return zeta[None, :] ** ((positions.double()[:, None] - center) / scale_base)


def rotate_pairs(x: torch.Tensor, angles: torch.Tensor, scale=None) -> torch.Tensor:
    """Rotate each pair (x_k, x_{k+d/2}) by its angle; scale (L, d/2) multiplies both members."""
    half = angles.shape[-1]
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    c, s = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    y1 = x1 * c - x2 * s
    y2 = x1 * s + x2 * c
    if scale is not None:
        y1, y2 = y1 * scale.to(x.dtype), y2 * scale.to(x.dtype)
    return torch.cat([y1, y2, x[..., 2 * half :]], dim=-1)


class RotaryQKRef(nn.Module):
    """Rotates q by R(p) * s_p and k by R(p) / s_p (xPos) over positions offset..offset+L-1."""

    def __init__(self, dim: int, use_xpos: bool = False, scale_base: float = 512, base: float = 10000.0,
                 interpolation_factor: float = 1.0, offset: int = 0):
        super().__init__()
        self.dim, self.use_xpos, self.scale_base, self.base = dim, use_xpos, scale_base, base
        self.interpolation_factor, self.offset = interpolation_factor, offset

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        seq = q.shape[-2]
        pos = torch.arange(self.offset, self.offset + seq)
        ang = rope_angles(self.dim, pos, self.base, self.interpolation_factor)
        s = xpos_scale(self.dim, pos, (self.offset + seq) // 2, self.scale_base) if self.use_xpos else None
        return torch.cat([rotate_pairs(q, ang, s), rotate_pairs(k, ang, None if s is None else 1.0 / s)], dim=-1)


# ----------------------------------------------------------------------------- ALiBi


def alibi_slopes(n: int) -> List[float]:
    """Press et al. 2021, sec. 3: for n a power of two the geometric sequence with start
    and ratio 2^(-8/n); otherwise the 2^floor(log2 n) slopes, then the odd-indexed
    (1st, 3rd, ...) slopes of twice that many heads until n are reached."""

    def geometric(m: int) -> List[float]:
        start = 2.0 ** (-8.0 / m)
        return [start * start**i for i in range(m)]

    p = 1
    while p * 2 <= n:
        p *= 2
    if p == n:
        return geometric(n)
    return geometric(p) + [s for idx, s in enumerate(geometric(2 * p)) if idx % 2 == 0][: n - p]


def alibi_bias(heads: int, total_heads: int, i: int, j: int) -> torch.Tensor:
    """(total_heads, i, j): -m_h * |key_pos - query_pos|, queries the last i of j positions."""
    slopes = alibi_slopes(heads)
    out = torch.zeros(total_heads, i, j, dtype=torch.float64)
    for h in range(heads):
        for a in range(i):
            qpos = j - i + a
            for b in range(j):
                out[h, a, b] = -slopes[h] * abs(b - qpos)
    return out


# ----------------------------------------------------------------------------- T5 buckets


def t5_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Raffel et al. 2019, sec. 2.1: exact buckets for small distances, log-spaced up to max_distance.

    The log term is evaluated in float32 as in the original implementation, so that
    distances on a bucket edge land in the same bucket.
    """
    rp = relative_position.long()
    if bidirectional:
        half = num_buckets // 2
        offset = torch.where(rp > 0, half, 0)  # keys after the query use the upper half
        dist = rp.abs()
    else:
        half = num_buckets
        offset = torch.zeros_like(rp)
        dist = (-rp).clamp(min=0)  # keys after the query all count as distance 0
    exact = half // 2
    safe = dist.clamp(min=exact).float()
    log_part = (torch.log(safe / exact) / math.log(max_distance / exact) * (half - exact)).long()
    large = (exact + log_part).clamp(max=half - 1)
    return offset + torch.where(dist < exact, dist, large)


class RelativePositionBiasRef(nn.Module):
    def __init__(self, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128, num_heads: int = 1):
        super().__init__()
        self.bidirectional, self.num_buckets, self.max_distance = bidirectional, num_buckets, max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, num_heads)

    def forward(self, batch_size: int, qlen: int, klen: int, step: int = 0) -> torch.Tensor:
        q = torch.arange(step, step + qlen)[:, None]
        k = torch.arange(klen)[None, :]
        buckets = t5_bucket(k - q, self.bidirectional, self.num_buckets, self.max_distance)
        bias = self.relative_attention_bias.weight[buckets]  # (qlen, klen, heads)
        return bias.permute(2, 0, 1).unsqueeze(0).expand(batch_size, -1, -1, -1)


# ----------------------------------------------------------------------------- absolute / sinusoidal


class AbsolutePositionalEmbeddingRef(nn.Module):
    def __init__(self, dim: int, max_seq_len: int, l2norm_embed: bool = False):
        super().__init__()
        self.dim, self.l2norm_embed = dim, l2norm_embed
        self.emb = nn.Embedding(max_seq_len, dim)

    def forward(self, x: torch.Tensor, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        if pos is None:
            pos = torch.arange(x.shape[1])
        e = self.emb.weight[pos]
        if self.l2norm_embed:
            return e / e.norm(dim=-1, keepdim=True)
        return e / math.sqrt(self.dim)


class ScaledSinusoidalEmbeddingRef(nn.Module):
    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        self.dim, self.theta = dim, theta
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        if pos is None:
            pos = torch.arange(x.shape[1])
        half = self.dim // 2
        omega = self.theta ** (-torch.arange(half, dtype=torch.float64) / half)
        ang = pos.double()[..., None] * omega
        return torch.cat([ang.sin(), ang.cos()], dim=-1).float() * self.scale


def sinusoid_table(n: int, dim: int, theta: float = 10000.0) -> np.ndarray:
    """(n, dim) [sin | cos] table by a double loop, for hand checks."""
    half = dim // 2
    out = np.zeros((n, dim))
    for p in range(n):
        for k in range(half):
            w = theta ** (-k / half)
            out[p, k] = math.sin(p * w)
            out[p, half + k] = math.cos(p * w)
    return out
