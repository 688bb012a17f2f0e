"""Plain PyTorch normalisation layers written from the papers' formulas.

Parameter names match mlx_zeta.nn.norms so check_parity needs no param_map.
All normalise over the last axis.
"""

import math

import torch
from torch import nn


class RMSNormRef(nn.Module):
    """y = sqrt(d) * gamma * x / max(||x||, eps)  (Zhang & Sennrich 2019, L2 form)."""

    def __init__(self, dim, eps=1e-12):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(self.eps)
        return x / norm * math.sqrt(self.dim) * self.gamma


class SimpleRMSNormRef(nn.Module):
    """y = sqrt(d) * x / max(||x||, eps), no parameters."""

    def __init__(self, dim, eps=1e-12):
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x):
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(self.eps)
        return x / norm * math.sqrt(self.dim)


class ScaleNormRef(nn.Module):
    """y = g * x / max(||x||, eps), scalar g = sqrt(d) at init (Nguyen & Salazar 2019)."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.full((1,), math.sqrt(dim)))

    def forward(self, x):
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(self.eps)
        return self.g * x / norm


class LayerNormRef(nn.Module):
    """y = g * (x - mean) / sqrt(var + eps), biased variance, no bias (Ba et al. 2016).

    ``stable``: x is first divided by max |x| over the row, treated as a constant.
    ``eps`` is the one the tested layer uses for its dtype.
    """

    def __init__(self, dim, eps=1e-5, stable=False):
        super().__init__()
        self.eps, self.stable = eps, stable
        self.g = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if self.stable:
            x = x / x.abs().amax(dim=-1, keepdim=True).detach()
        mean = x.mean(dim=-1, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps) * self.g
