"""Plain PyTorch references for mlx_zeta.quant.matmulfree and mlx_zeta.quant.mmless, written
from the papers' math, step by step where the MLX side scans in parallel.

    MLGRU (Zhu et al. 2024, sec. 3.3.1), per step t, h_0 = 0:
        f = sigmoid(x W_f + b_f); c = silu(x W_c + b_c); h = f h + (1 - f) c
        g = sigmoid(x W_g + b_g); o = (g h) W_o + b_o
    GLU (sec. 3.3.2; Shazeer 2020):  y = (act(x W_g) * x W_u) W_d
    LRU (Orvieto et al. 2023, app. A), complex torch tensors:
        lambda = exp(-exp(nu_log) + i exp(theta_log)); x_k = lambda x_{k-1} + exp(gamma_log) (B_re u + i B_im u)
        y_k = C_re Re(x_k) - C_im Im(x_k) + D u_k
    AFT (Zhai et al. 2021, eq. 2) from the explicit (t, t') weights, a softmax over t':
        Y_t = sigmoid(Q_t) * sum_t' softmax_t'(K_t' + w_{t,t'}) V_t'   (t' <= t when causal)

Every projection is the BitLinear fake-quant reference (reference.bitlinear) or a float
nn.Linear where the MLX layer uses one. Parameter names mirror the MLX modules, so
check_parity needs no param_map.
"""

import torch
import torch.nn.functional as F
from torch import nn

from reference.bitlinear import BitLinearRef, RMSNormRef

ACTS = {
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "gelu": lambda t: 0.5 * t * (1.0 + torch.erf(t / 2.0 ** 0.5)),
    "relu": torch.relu,
    "selu": F.selu,
    "identity": lambda t: t,
}


def _linear(in_f, out_f, bias, ternary):
    return BitLinearRef(in_f, out_f, bias=bias) if ternary else nn.Linear(in_f, out_f, bias=bias)


class MLGRURef(nn.Module):
    """MLGRU (and BitGRU with ``bias=True, ternary_output=False``), one position at a time."""

    def __init__(self, dim, hidden_dim, dim_out, bias=False, ternary_output=True, act="silu"):
        super().__init__()
        self.act = ACTS[act]
        self.f_proj = BitLinearRef(dim, hidden_dim, bias=bias)
        self.c_proj = BitLinearRef(dim, hidden_dim, bias=bias)
        self.g_proj = _linear(dim, hidden_dim, bias, ternary_output)
        self.o_proj = _linear(hidden_dim, dim_out, bias, ternary_output)

    def forward(self, x, h=None):
        h = x.new_zeros(x.shape[0], self.f_proj.weight.shape[0]) if h is None else h
        out = []
        for t in range(x.shape[1]):
            xt = x[:, t]
            f = torch.sigmoid(self.f_proj(xt))
            c = self.act(self.c_proj(xt))
            h = f * h + (1 - f) * c
            g = torch.sigmoid(self.g_proj(xt))
            out.append(self.o_proj(g * h))
        return torch.stack(out, dim=1)


class GLURef(nn.Module):
    def __init__(self, dim, hidden_dim, dim_out=None, act="silu", bias=False):
        super().__init__()
        self.act = ACTS[act]
        self.gate_proj = BitLinearRef(dim, hidden_dim, bias=bias)
        self.up_proj = BitLinearRef(dim, hidden_dim, bias=bias)
        self.down_proj = BitLinearRef(hidden_dim, dim_out or dim, bias=bias)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class MatMulFreeBlockRef(nn.Module):
    def __init__(self, dim, hidden_dim, ff_hidden_dim, eps=1e-6):
        super().__init__()
        self.attn_norm = RMSNormRef(dim, eps)
        self.mixer = MLGRURef(dim, hidden_dim, dim)
        self.ff_norm = RMSNormRef(dim, eps)
        self.ff = GLURef(dim, ff_hidden_dim)

    def forward(self, x):
        x = x + self.mixer(self.attn_norm(x))
        return x + self.ff(self.ff_norm(x))


class MatMulFreeLMRef(nn.Module):
    def __init__(self, num_tokens, dim, depth, hidden_dim, ff_hidden_dim, ternary_head=False, eps=1e-6):
        super().__init__()
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.layers = nn.ModuleList([MatMulFreeBlockRef(dim, hidden_dim, ff_hidden_dim, eps) for _ in range(depth)])
        self.norm = RMSNormRef(dim, eps)
        self.to_logits = _linear(dim, num_tokens, False, ternary_head)

    def forward(self, tokens):
        h = self.token_emb(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.to_logits(self.norm(h))


class LRURef(nn.Module):
    def __init__(self, input_dim, units, state_dim, fully_mml=False, bias=False):
        super().__init__()
        self.nu_log = nn.Parameter(torch.zeros(state_dim))
        self.theta_log = nn.Parameter(torch.zeros(state_dim))
        self.gamma_log = nn.Parameter(torch.zeros(state_dim))
        self.B_re = BitLinearRef(input_dim, state_dim, bias=bias)
        self.B_im = BitLinearRef(input_dim, state_dim, bias=bias)
        self.C_re = _linear(state_dim, units, bias, fully_mml)
        self.C_im = _linear(state_dim, units, bias, fully_mml)
        self.D = _linear(input_dim, units, bias, fully_mml)

    def forward(self, u):
        lam = torch.exp(torch.complex(-torch.exp(self.nu_log), torch.exp(self.theta_log)))  # (N,) complex
        bu = torch.complex(self.B_re(u), self.B_im(u)) * torch.exp(self.gamma_log)  # (B, L, N)
        x = torch.zeros_like(bu[:, 0])
        out = []
        for k in range(u.shape[1]):
            x = lam * x + bu[:, k]
            out.append(self.C_re(x.real) - self.C_im(x.imag) + self.D(u[:, k]))
        return torch.stack(out, dim=1)


def aft_ref(q, k, v, w=None, causal=True):
    """AFT from its definition: weights (B, t, t', d) = softmax over t' of K_t' + w_{t,t'}."""
    n = k.shape[1]
    logits = k[:, None, :, :].expand(-1, n, -1, -1)
    if w is not None:
        logits = logits + w[None, :n, :n, None]
    if causal:
        allowed = torch.tril(torch.ones(n, n, dtype=torch.bool, device=k.device))
        logits = logits.masked_fill(~allowed[None, :, :, None], float("-inf"))
    weights = torch.softmax(logits, dim=2)
    return torch.sigmoid(q) * (weights * v[:, None]).sum(dim=2)


class AFTBlockRef(nn.Module):
    def __init__(self, dim, hidden_dim, max_seq_len=None, causal=True, eps=1e-6):
        super().__init__()
        self.causal = causal
        self.attn_norm = RMSNormRef(dim, eps)
        self.to_q, self.to_k, self.to_v = BitLinearRef(dim, dim), BitLinearRef(dim, dim), BitLinearRef(dim, dim)
        self.to_out = BitLinearRef(dim, dim)
        self.pos_bias = nn.Parameter(torch.zeros(max_seq_len, max_seq_len)) if max_seq_len else None
        self.ff_norm = RMSNormRef(dim, eps)
        self.ff = GLURef(dim, hidden_dim)

    def forward(self, x):
        h = self.attn_norm(x)
        x = x + self.to_out(aft_ref(self.to_q(h), self.to_k(h), self.to_v(h), self.pos_bias, self.causal))
        return x + self.ff(self.ff_norm(x))


class TokenEmbeddingRef(nn.Module):
    def __init__(self, vocab_size, dim, max_len=None):
        super().__init__()
        self.token_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Embedding(max_len, dim) if max_len else None

    def forward(self, x):
        h = self.token_emb(x)
        if self.pos_emb is not None:
            h = h + self.pos_emb.weight[: x.shape[1]]
        return h


class PatchEmbeddingRef(nn.Module):
    """Patches cut one by one in row-major order, each flattened (py, px, c), then BitLinear."""

    def __init__(self, patch_size, in_channels, dim, num_patches=None):
        super().__init__()
        self.p = patch_size
        self.proj = BitLinearRef(patch_size * patch_size * in_channels, dim)
        self.pos_emb = nn.Parameter(torch.zeros(num_patches, dim)) if num_patches else None

    def forward(self, x):
        n, h, w, _ = x.shape
        p = self.p
        patches = [x[:, i:i + p, j:j + p, :].reshape(n, -1) for i in range(0, h, p) for j in range(0, w, p)]
        tokens = self.proj(torch.stack(patches, dim=1))
        return tokens + self.pos_emb if self.pos_emb is not None else tokens
