"""Attention blocks, used the way zeta's docs use them.

FlashAttention on per-head tensors (zeta's example shapes), a causal grouped-query
Attention decoding token by token with a KVCache (checked against the full forward),
MultiQueryAttention and MultiGroupedQueryAttn with attention weights.

    .venv/bin/python examples/attention.py
"""

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core loads)
import mlx.core as mx

from mlx_zeta.nn.attention import Attention, FlashAttention, KVCache, MultiGroupedQueryAttn, MultiQueryAttention

mx.random.seed(0)

# FlashAttention: q (batch, heads, q_len, dim), k/v (batch, kv_heads, k_len, dim)
q = mx.random.normal((2, 4, 6, 8))
k = mx.random.normal((2, 4, 10, 8))
v = mx.random.normal((2, 4, 10, 8))
attention = FlashAttention(causal=False, dropout=0.1, flash=True)
attention.eval()  # dropout acts only in training mode
output = attention(q, k, v)
explicit = FlashAttention(causal=False, dropout=0.1, flash=False).eval()(q, k, v)
print(f"FlashAttention: {tuple(output.shape)}, |flash - explicit| = {mx.abs(output - explicit).max().item():.2e}")

mask = mx.ones((2, 4, 6, 10), dtype=mx.bool_)  # True = attend
causal = FlashAttention(causal=True, flash=True)(q, k, v, mask=mask)
print(f"FlashAttention causal + mask: {tuple(causal.shape)}, mean {causal.mean().item():.4f}")

# Grouped-query self-attention, decoded one token at a time with a KV cache
attn = Attention(dim=64, heads=8, kv_heads=2, causal=True, qk_norm=True)
x = mx.random.normal((2, 12, 64))
full = attn(x)
cache = KVCache()
steps = [attn(x[:, :4], cache=cache)] + [attn(x[:, t : t + 1], cache=cache) for t in range(4, 12)]
decoded = mx.concatenate(steps, axis=1)
print(f"Attention (GQA 8/2): {tuple(full.shape)}, cache offset {cache.offset}, "
      f"|cached - full| = {mx.abs(decoded - full).max().item():.2e}")

# Multi-query attention (one key/value head); returns the output only
mqa = MultiQueryAttention(d_model=64, heads=8, qk_ln=True, clip_qkv=6.0)
out = mqa(x)
print(f"MultiQueryAttention: {tuple(out.shape)}, to_k weight {tuple(mqa.to_k.weight.shape)}")

# Grouped-query attention with MAGNETO's sub-LayerNorm, zeta's call signature
gqa = MultiGroupedQueryAttn(dim=64, heads=8, kv_heads=4)
out, weights = gqa(x, x, x, need_weights=True, is_causal=True)
print(f"MultiGroupedQueryAttn: {tuple(out.shape)}, weights {tuple(weights.shape)}, "
      f"row sums {weights.sum(-1).min().item():.4f}..{weights.sum(-1).max().item():.4f}")
