"""Plain PyTorch attention-layer stacks and token transformer, written from the math
(x-transformers-like semantics), for parity with mlx_zeta.structs.

Stated independently here:
- Layer l: [self-attention], [cross-attention], feed-forward; each branch f with its
  norm N is x + f(N(x)) (pre-norm, then a final norm) or N(x + f(x)) (post-norm).
- Self-attention positions over the whole sequence 0..L-1 (no cache here):
  rotary on the first rotary_emb_dim features of every head (explicit 2x2 rotations,
  reference.positional), xPos with the centre L // 2 (x-transformers' choice; the
  MLX stack uses 0, the scores are the same); ALiBi -m_h |i - j|; the T5 bias from one
  bucket table shared by all layers.
- Sliding window w: query i sees key j iff i - w < j <= i (causal) or |i - j| < w.
- Transformer: h = E[x] + pos_emb(p + t) (tokens numbered after a prefix of p
  prepended embeddings), optional LayerNorm, prefix concatenated, optional projection,
  the stack, then W_o or E^T.

Parameter names mirror the flattened MLX names, so check_parity needs no param_map.
"""

from __future__ import annotations

import torch
from torch import nn

from reference.attention import RefAttention, attention
from reference.feedforward import FeedForwardRef
from reference.norms import RMSNormRef, ScaleNormRef
from reference.positional import (AbsolutePositionalEmbeddingRef, RelativePositionBiasRef, alibi_bias, rope_angles,
                                  rotate_pairs, xpos_scale)


def window_mask(n: int, window: int, causal: bool) -> torch.Tensor:
    """(n, n) bool: query i may see key j inside the window."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    return ((j <= i) & (j > i - window)) if causal else (i - j).abs() < window


class TorchSelfAttention(RefAttention):
    """RefAttention with rotary (and xPos) applied to the query/key heads after qk_norm."""

    def forward(self, x, mask=None, attn_bias=None, rotary=None):
        b, n = x.shape[:2]
        q = self.to_q(x).view(b, n, self.heads, self.dim_head).transpose(1, 2)
        k = self.to_k(x).view(b, n, self.kv_heads, self.dim_head).transpose(1, 2)
        v = self.to_v(x).view(b, n, self.kv_heads, self.dim_head).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            angles, scale = rotary
            q = rotate_pairs(q, angles, scale)
            k = rotate_pairs(k, angles, None if scale is None else 1.0 / scale)
        out = attention(q, k, v, mask=mask, attn_bias=attn_bias, causal=self.causal)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class TorchLayer(nn.Module):
    def __init__(self, dim, make_norm, self_attn, cross_attn, ff, pre_norm):
        super().__init__()
        if self_attn is not None:
            self.attn_norm, self.attn = make_norm(), self_attn
        if cross_attn is not None:
            self.cross_attn_norm, self.cross_attn = make_norm(), cross_attn
        self.ff_norm, self.ff = make_norm(), ff
        self.pre_norm = pre_norm

    def branch(self, x, norm, f):
        return x + f(norm(x)) if self.pre_norm else norm(x + f(x))

    def forward(self, x, self_mask, attn_bias, rotary, context, context_mask):
        if hasattr(self, "attn"):
            x = self.branch(x, self.attn_norm, lambda h: self.attn(h, mask=self_mask, attn_bias=attn_bias, rotary=rotary))
        if hasattr(self, "cross_attn"):
            x = self.branch(x, self.cross_attn_norm, lambda h: self.cross_attn(h, context=context, mask=context_mask))
        return self.branch(x, self.ff_norm, self.ff)


class TorchAttentionLayers(nn.Module):
    """Same keywords as mlx_zeta.structs.AttentionLayers (the subset that changes the math)."""

    def __init__(self, dim, depth, heads=8, causal=False, cross_attend=False, only_cross=False, attn_dim_head=None,
                 attn_kv_heads=None, attn_qk_norm=False, attn_bias=False, ff_mult=4, ff_glu=False, ff_swish=False,
                 ff_relu_squared=False, ff_swiglu=False, ff_no_bias=False, ff_post_act_ln=False, ff_glu_mult_bias=False,
                 rotary_pos_emb=False, rotary_emb_dim=None, rotary_xpos=False, rotary_xpos_scale_base=512,
                 rotary_base=10000, rotary_interpolation_factor=1.0, alibi_pos_bias=False, rel_pos_bias=False,
                 rel_pos_num_buckets=32, rel_pos_max_distance=128, use_rmsnorm=False, use_scalenorm=False,
                 pre_norm=True, sliding_window=None, **ignored):
        super().__init__()
        unknown = set(ignored) - {"attn_dropout", "ff_dropout", "attn_flash"}
        assert not unknown, f"reference lacks {unknown}"
        dim_head = attn_dim_head or dim // heads
        self.heads, self.causal, self.pre_norm, self.window = heads, causal, pre_norm, sliding_window
        self.rotary_dim = (rotary_emb_dim or dim_head // 2) if rotary_pos_emb else None
        self.xpos, self.xpos_base, self.rotary_base = rotary_xpos, rotary_xpos_scale_base, rotary_base
        self.interp, self.alibi = rotary_interpolation_factor, alibi_pos_bias
        if rel_pos_bias:
            self.rel_pos = RelativePositionBiasRef(not causal, rel_pos_num_buckets, rel_pos_max_distance, heads)

        def make_norm():
            return RMSNormRef(dim) if use_rmsnorm else ScaleNormRef(dim) if use_scalenorm else nn.LayerNorm(dim)

        def attn(cls, is_causal):
            return cls(dim, heads=heads, dim_head=dim_head, kv_heads=attn_kv_heads, causal=is_causal,
                       qk_norm=attn_qk_norm, bias=attn_bias)

        act = "relu_squared" if ff_relu_squared else "silu" if (ff_swish or ff_swiglu) else "gelu"
        inner = int(dim * ff_mult)
        self.layers = nn.ModuleList([
            TorchLayer(dim, make_norm, None if only_cross else attn(TorchSelfAttention, causal),
                       attn(RefAttention, False) if cross_attend else None,
                       FeedForwardRef(dim, inner, dim, act=act, gated=ff_glu or ff_swiglu, mult_bias=ff_glu_mult_bias,
                                      post_ln=ff_post_act_ln, bias=not ff_no_bias), pre_norm)
            for _ in range(depth)])
        if pre_norm:
            self.final_norm = make_norm()

    def forward(self, x, mask=None, context=None, context_mask=None):
        n = x.shape[1]
        self_mask = None if mask is None else mask[:, None, None, :]  # (b, 1, 1, n)
        if self.window is not None:
            w = window_mask(n, self.window, self.causal).to(x.device)[None, None]
            self_mask = w if self_mask is None else self_mask & w
        bias = None
        if self.alibi:
            bias = alibi_bias(self.heads, self.heads, n, n).float().to(x.device)
        elif hasattr(self, "rel_pos"):
            bias = self.rel_pos(1, n, n)
        rotary = None
        if self.rotary_dim is not None:
            pos = torch.arange(n)
            angles = rope_angles(self.rotary_dim, pos, self.rotary_base, self.interp).to(x.device)
            scale = xpos_scale(self.rotary_dim, pos, n // 2, self.xpos_base).to(x.device) if self.xpos else None
            rotary = (angles, scale)
        for layer in self.layers:
            x = layer(x, self_mask, bias, rotary, context, context_mask)
        return self.final_norm(x) if self.pre_norm else x


class TorchTransformer(nn.Module):
    """Token embedding + absolute positions + stack + logits (x-transformers' TransformerWrapper math)."""

    def __init__(self, num_tokens, max_seq_len, attn_layers: TorchAttentionLayers, dim, emb_dim=None,
                 tie_embedding=False, use_abs_pos_emb=True, post_emb_norm=False, logits_dim=None):
        super().__init__()
        emb_dim = emb_dim or dim
        self.token_emb = nn.Embedding(num_tokens, emb_dim)
        if use_abs_pos_emb:
            self.pos_emb = AbsolutePositionalEmbeddingRef(emb_dim, max_seq_len)
        if post_emb_norm:
            self.post_emb_norm = nn.LayerNorm(emb_dim)
        if emb_dim != dim:
            self.project_emb = nn.Linear(emb_dim, dim)
        self.attn_layers = attn_layers
        if not tie_embedding:
            self.to_logits = nn.Linear(dim, logits_dim or num_tokens, bias=False)

    def forward(self, x, mask=None, return_embeddings=False, prepend_embeds=None, context=None, context_mask=None):
        b, n = x.shape
        p = 0 if prepend_embeds is None else prepend_embeds.shape[1]
        h = self.token_emb.weight[x]
        if hasattr(self, "pos_emb"):
            h = h + self.pos_emb(x, pos=torch.arange(p, p + n, device=x.device))
        if hasattr(self, "post_emb_norm"):
            h = self.post_emb_norm(h)
        if prepend_embeds is not None:
            h = torch.cat([prepend_embeds, h], dim=1)
            if mask is not None:
                mask = torch.cat([torch.ones(b, p, dtype=torch.bool, device=x.device), mask], dim=1)
        if hasattr(self, "project_emb"):
            h = self.project_emb(h)
        h = self.attn_layers(h, mask=mask, context=context, context_mask=context_mask)
        if return_embeddings:
            return h
        return self.to_logits(h) if hasattr(self, "to_logits") else h @ self.token_emb.weight.t()
