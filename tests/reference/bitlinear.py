"""Plain PyTorch BitLinear written from the BitNet b1.58 math (Ma et al., 2024, eq. 1-3, and
"The Era of 1-bit LLMs: Training Tips, Code and FAQ", 2024).

    x~ = x / sqrt(mean(x^2) + eps_n) * g                     (RMSNorm, optional)
    s_x = 127 / max(max_j |x~_j|, eps_q)                     (per token)
    X_q = clip(round(x~ s_x), -128, 127) / s_x               (int8 fake-quant)
    s_w = 1 / max(mean |W|, eps_q)                           (per tensor)
    W_q = clip(round(W s_w), -1, 1) / s_w                    (ternary fake-quant)
    y = X_q W_q^T + b

Both fake-quantizers pass gradients straight through: v + (q(v) - v).detach().
Parameter names (``weight``, ``bias``, ``norm.weight``) match mlx_zeta.quant.BitLinear so
check_parity needs no param_map.
"""

import torch
from torch import nn


def absmean_quant_ref(w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Dequantized ternary weights Q / s_w (no gradient path of its own)."""
    scale = 1.0 / w.abs().mean().clamp(min=eps)
    return torch.clamp(torch.round(w * scale), -1, 1) / scale


def absmax_quant_ref(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Dequantized per-token int8 activations Q_x / s_x (no gradient path of its own)."""
    scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=eps)
    return torch.clamp(torch.round(x * scale), -128, 127) / scale


def _round_to(x: torch.Tensor, dtype) -> torch.Tensor:
    """``x`` rounded to ``dtype`` (kept in float32), gradient of the identity."""
    return x if dtype is None else x + (x.to(dtype).float() - x).detach()


class RMSNormRef(nn.Module):
    def __init__(self, dim: int, eps: float, round_dtype=None):
        super().__init__()
        self.eps, self.round_dtype = eps, round_dtype
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x = _round_to(x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.eps), self.round_dtype)
        return _round_to(x * self.weight, self.round_dtype)


class BitLinearRef(nn.Module):
    """``norm_dtype`` (a torch dtype, optional) makes the RMSNorm round where a low-precision
    forward stores its intermediates: x / rms(x) is rounded to that dtype, then its product with
    the weight (MLX's fused ``rms_norm`` does exactly this), each with a straight-through gradient.
    The int8 grid (steps of max|x|/127) is finer than bfloat16's (and, near max|x|, than float16's),
    so without it a low-precision run and a float32 reference land on different integers."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, norm: bool = True,
                 norm_eps: float = 1e-6, quant_eps: float = 1e-5, norm_dtype: torch.dtype = None):
        super().__init__()
        self.quant_eps = quant_eps
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.norm = RMSNormRef(in_features, norm_eps, norm_dtype) if norm else None

    def quantized(self, x):
        """(straight-through X_q, straight-through W_q) for input ``x``."""
        if self.norm is not None:
            x = self.norm(x)
        x_q = x + (absmax_quant_ref(x, self.quant_eps) - x).detach()
        w = self.weight
        w_q = w + (absmean_quant_ref(w, self.quant_eps) - w).detach()
        return x_q, w_q

    def forward(self, x):
        x_q, w_q = self.quantized(x)
        y = x_q @ w_q.t()
        return y + self.bias if self.bias is not None else y
