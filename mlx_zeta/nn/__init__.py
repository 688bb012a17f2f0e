"""Building blocks on mlx.nn, one file per layer family, re-exported by name."""

from mlx_zeta.nn.attention import (
    Attention,
    FlashAttention,
    MultiGroupedQueryAttn,
    MultiheadAttention,
    MultiQueryAttention,
)
from mlx_zeta.nn.feedforward import FeedForward, ReluSquared
from mlx_zeta.nn.cache import Cache, KVCache, RotatingKVCache, StaticKVCache
from mlx_zeta.nn.norms import LayerNorm, RMSNorm, ScaleNorm, SimpleRMSNorm
from mlx_zeta.nn.positional import (
    AbsolutePositionalEmbedding,
    AlibiPositionalBias,
    PositionBias,
    RelativePositionBias,
    RotaryEmbedding,
    ScaledSinusoidalEmbedding,
    apply_rotary_pos_emb,
    rotate_half,
)
from mlx_zeta.nn.unet import Unet
from mlx_zeta.nn.vision import VisionEmbedding

__all__ = [
    "AbsolutePositionalEmbedding",
    "AlibiPositionalBias",
    "PositionBias",
    "Attention",
    "FeedForward",
    "FlashAttention",
    "Cache",
    "KVCache",
    "RotatingKVCache",
    "StaticKVCache",
    "LayerNorm",
    "MultiGroupedQueryAttn",
    "MultiheadAttention",
    "MultiQueryAttention",
    "RelativePositionBias",
    "ReluSquared",
    "RMSNorm",
    "RotaryEmbedding",
    "ScaleNorm",
    "ScaledSinusoidalEmbedding",
    "SimpleRMSNorm",
    "Unet",
    "VisionEmbedding",
    "apply_rotary_pos_emb",
    "rotate_half",
]
