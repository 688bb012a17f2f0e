"""Plain PyTorch attention written from the papers' math, for parity tests.

Conventions (those of mlx_zeta.nn.attention, stated independently here):
- GQA: query head h reads kv head h // (heads // kv_heads) (kv heads repeated in place).
- Boolean masks: True = attend. Floating masks are added to the scores.
- A 2-D mask is key padding (batch, k_len); 3-D/4-D masks broadcast to (batch, heads, q, k).
- Causal is bottom-right: query i sees key j iff j <= i + k_len - q_len.
- Sliding window w (also bottom-right): query i sees key j iff |i + k_len - q_len - j| < w.
- Soft-capping c (Gemma 2): the scaled scores s become c * tanh(s / c) before any bias or mask.
- ALiBi: bias -m_h |j - (i + k_len - q_len)|; T5: bias table[bucket[j - i + q_len - 1], h].
- A query row whose scores are all -inf after masking outputs zeros.
"""

import math

import torch
from torch import nn


def causal_mask(q_len: int, k_len: int, device=None) -> torch.Tensor:
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    return j <= i + (k_len - q_len)


def window_mask(q_len: int, k_len: int, window: int, device=None) -> torch.Tensor:
    i = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    j = torch.arange(k_len, device=device)[None, :]
    return (i - j).abs() < window


def alibi_bias(slopes: torch.Tensor, q_len: int, k_len: int) -> torch.Tensor:
    """(heads, q_len, k_len): -m_h |j - (i + k_len - q_len)|."""
    i = torch.arange(q_len)[:, None] + (k_len - q_len)
    j = torch.arange(k_len)[None, :]
    return -slopes[:, None, None] * (j - i).abs().to(slopes.dtype)


def t5_bias(table: torch.Tensor, buckets: torch.Tensor, q_len: int, k_len: int) -> torch.Tensor:
    """(heads, q_len, k_len): table[bucket of offset j - i, h], buckets[n] for offset n - (q_len - 1)."""
    offset = torch.arange(k_len)[None, :] - torch.arange(q_len)[:, None] + (q_len - 1)
    return table[buckets.long()[offset]].permute(2, 0, 1)


def attention(q, k, v, mask=None, attn_bias=None, causal=False, scale=None, return_weights=False, softcap=None,
              window=None):
    """softmax(cap(scale * q k^T) + attn_bias + mask) v over (batch, heads, seq, dim) tensors,
    cap(s) = softcap * tanh(s / softcap) (identity without softcap)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if attn_bias is not None:
        scores = scores + attn_bias
    if mask is not None:
        if mask.dim() == 2:
            mask = mask[:, None, None, :]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    if causal:
        scores = scores.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    if window:
        scores = scores.masked_fill(~window_mask(q.shape[2], k.shape[2], window, q.device), float("-inf"))
    alive = (scores > float("-inf")).any(dim=-1, keepdim=True)  # rows with an attendable key
    probs = torch.softmax(scores.masked_fill(~alive, 0.0), dim=-1) * alive
    out = torch.matmul(probs, v)
    return (out, probs) if return_weights else out


def fused_attention(q, k, v, *, scale=None, causal=False, window=None, softcap=None, alibi_slopes=None,
                    t5_table=None, t5_buckets=None, mask=None):
    """mlx_zeta.kernels.fused_attention's arguments in torch: the ALiBi / T5 biases built from their
    O(L) data, a mask of 2 to 4 dims broadcast (materialised) to (batch, heads, q_len, k_len)."""
    b, heads, q_len = q.shape[:3]
    k_len = k.shape[2]
    bias = None
    if alibi_slopes is not None:
        bias = alibi_bias(alibi_slopes, q_len, k_len)
    if t5_table is not None:
        t5 = t5_bias(t5_table, t5_buckets, q_len, k_len)
        bias = t5 if bias is None else bias + t5
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(b, heads, q_len, k_len)
    return attention(q, k, v, mask=mask, attn_bias=None if bias is None else bias[None], causal=causal, scale=scale,
                     softcap=softcap, window=window)


class RefFlashAttention(nn.Module):
    def __init__(self, causal=False, scale=None):
        super().__init__()
        self.causal, self.scale = causal, scale

    def forward(self, q, k, v, mask=None, attn_bias=None):
        return attention(q, k, v, mask=mask, attn_bias=attn_bias, causal=self.causal, scale=self.scale)


class RefRMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class RefAttention(nn.Module):
    """Multi-head attention with kv_heads key/value heads (MHA, GQA, MQA)."""

    def __init__(self, dim, heads=8, dim_head=None, kv_heads=None, causal=False, qk_norm=False, bias=False,
                 scale=None, clip_qkv=None):
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads or heads
        self.dim_head = dim_head or dim // heads
        self.causal, self.scale, self.clip_qkv = causal, scale, clip_qkv
        self.to_q = nn.Linear(dim, heads * self.dim_head, bias=bias)
        self.to_k = nn.Linear(dim, self.kv_heads * self.dim_head, bias=bias)
        self.to_v = nn.Linear(dim, self.kv_heads * self.dim_head, bias=bias)
        self.to_out = nn.Linear(heads * self.dim_head, dim, bias=bias)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RefRMSNorm(self.dim_head)
            self.k_norm = RefRMSNorm(self.dim_head)

    def forward(self, x, context=None, mask=None, attn_bias=None):
        c = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(c), self.to_v(c)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        b, n = x.shape[:2]
        q = q.view(b, n, self.heads, self.dim_head).transpose(1, 2)
        k = k.view(b, c.shape[1], self.kv_heads, self.dim_head).transpose(1, 2)
        v = v.view(b, c.shape[1], self.kv_heads, self.dim_head).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        out = attention(q, k, v, mask=mask, attn_bias=attn_bias, causal=self.causal, scale=self.scale)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class RefMultiGroupedQueryAttn(nn.Module):
    """GQA with a LayerNorm over the concatenated heads before the output projection."""

    def __init__(self, dim, heads, kv_heads, bias=True, layer_norm=True, layer_norm_eps=1e-5):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=bias)
        self.norm = nn.LayerNorm(dim, eps=layer_norm_eps) if layer_norm else None
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, query, key, value, attn_mask=None, is_causal=False):
        b, n, s = query.shape[0], query.shape[1], key.shape[1]
        q = self.q_proj(query).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(key).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask[:, None]
        out, probs = attention(q, k, v, mask=attn_mask, causal=is_causal, return_weights=True)
        x = out.transpose(1, 2).reshape(b, n, -1)
        if self.norm is not None:
            x = self.norm(x)
        return self.out_proj(x), probs
