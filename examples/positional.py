"""Positional encodings and attention biases, used the way zeta's README uses them.

Rotary (with xPos) on queries and keys, ALiBi and T5 relative-position biases added to
attention scores, and learned / scaled-sinusoidal absolute embeddings added to tokens.

    .venv/bin/python examples/positional.py
"""

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core loads)
import mlx.core as mx

from mlx_zeta.nn.positional import (
    AbsolutePositionalEmbedding,
    AlibiPositionalBias,
    RelativePositionBias,
    RotaryEmbedding,
    ScaledSinusoidalEmbedding,
    apply_rotary_pos_emb,
)


def main() -> None:
    mx.random.seed(0)
    batch, heads, seq, head_dim, dim = 2, 8, 16, 32, 64
    q = mx.random.normal((batch, heads, seq, head_dim))
    k = mx.random.normal((batch, heads, seq, head_dim))

    # Rotary with xPos: queries take the scale, keys its inverse.
    rotary = RotaryEmbedding(dim=head_dim, use_xpos=True, scale_base=512)
    freqs, scale = rotary(seq)
    q_rot = apply_rotary_pos_emb(q, freqs, scale)
    k_rot = apply_rotary_pos_emb(k, freqs, scale**-1)
    scores = (q_rot @ k_rot.swapaxes(-1, -2)) * head_dim**-0.5
    print(f"RotaryEmbedding: freqs {freqs.shape}, xpos scale {scale.shape} "
          f"in [{scale.min().item():.4f}, {scale.max().item():.4f}], scores {scores.shape}")

    # ALiBi: 4 of the 8 heads get a linear bias, the rest zero.
    alibi = AlibiPositionalBias(heads=4, total_heads=heads)
    bias = alibi(seq, seq)
    print(f"AlibiPositionalBias: bias {bias.shape}, slopes {[round(s, 4) for s in alibi._get_slopes(4)]}, "
          f"bias[0, -1, 0] = {bias[0, -1, 0].item():.4f}")

    # T5 relative position bias: learned, one value per bucket and head.
    rel_bias = RelativePositionBias(bidirectional=True, num_buckets=32, max_distance=128, num_heads=heads)
    t5 = rel_bias(batch, seq, seq)
    attn = mx.softmax(scores + bias + t5, axis=-1)
    print(f"RelativePositionBias: bias {t5.shape}; attention rows sum to {attn.sum(-1).mean().item():.4f}")

    # Absolute embeddings added to token embeddings.
    tokens = mx.random.normal((batch, seq, dim))
    abs_emb = AbsolutePositionalEmbedding(dim=dim, max_seq_len=1024)
    sin_emb = ScaledSinusoidalEmbedding(dim=dim)
    x = tokens + abs_emb(tokens) + sin_emb(tokens)
    print(f"AbsolutePositionalEmbedding: {abs_emb(tokens).shape}; ScaledSinusoidalEmbedding: "
          f"{sin_emb(tokens).shape}, scale {sin_emb.scale.item():.4f}; x {x.shape}, mean |x| {mx.abs(x).mean().item():.4f}")


if __name__ == "__main__":
    main()
