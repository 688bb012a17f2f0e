"""Plain PyTorch feed-forward block written from the formulas (Vaswani et al. 2017;
Shazeer 2020 for the GLU variants; So et al. 2021 for ReLU^2).

    plain:  y = W2 drop(LN(act(W1 x + b1))) + b2
    gated:  [u, v] = W1 x + b1 ;  y = W2 drop(LN(u * act(v) * m)) + b2

Parameter names match mlx_zeta.nn.feedforward so check_parity needs no param_map.
"""

import torch
from torch import nn

ACTIVATIONS = {
    "gelu": lambda t: 0.5 * t * (1.0 + torch.erf(t / 2.0 ** 0.5)),
    "silu": lambda t: t * torch.sigmoid(t),
    "relu_squared": lambda t: torch.clamp(t, min=0.0) ** 2,
}


class ReluSquaredRef(nn.Module):
    def forward(self, x):
        return torch.where(x > 0, x * x, torch.zeros_like(x))


class FeedForwardRef(nn.Module):
    """``act`` is a name in ACTIVATIONS or a callable/torch module (registered as ``act``)."""

    def __init__(self, dim, inner_dim, dim_out, act="gelu", gated=False, mult_bias=False,
                 post_ln=False, bias=True):
        super().__init__()
        self.gated = gated
        self.proj_in = nn.Linear(dim, 2 * inner_dim if gated else inner_dim, bias=bias)
        if isinstance(act, nn.Module):
            self.act = act
        else:
            self.act_fn = ACTIVATIONS[act] if isinstance(act, str) else act
        if mult_bias:
            self.mult_bias = nn.Parameter(torch.ones(inner_dim))
        if post_ln:
            self.norm = nn.Module()
            self.norm.weight = nn.Parameter(torch.ones(inner_dim))
            self.norm.bias = nn.Parameter(torch.zeros(inner_dim))
        self.proj_out = nn.Linear(inner_dim, dim_out, bias=bias)

    def _act(self, t):
        return self.act(t) if hasattr(self, "act") else self.act_fn(t)

    def forward(self, x):
        h = self.proj_in(x)
        if self.gated:
            half = h.shape[-1] // 2
            h = h[..., :half] * self._act(h[..., half:])
        else:
            h = self._act(h)
        if hasattr(self, "mult_bias"):
            h = h * self.mult_bias
        if hasattr(self, "norm"):
            mean = h.mean(-1, keepdim=True)
            var = ((h - mean) ** 2).mean(-1, keepdim=True)
            h = (h - mean) / torch.sqrt(var + 1e-5) * self.norm.weight + self.norm.bias
        return self.proj_out(h)
