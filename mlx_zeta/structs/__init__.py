"""Model structs on the mlx_zeta blocks: attention-layer stacks, the token
Transformer wrapper and their caches (x-transformers style), re-exported by name.
"""

from mlx_zeta.structs.attention_layers import AttentionLayers, CrossAttender, Decoder, Encoder
from mlx_zeta.structs.cache import RotatingKVCache
from mlx_zeta.structs.transformer import Transformer

__all__ = ["AttentionLayers", "CrossAttender", "Decoder", "Encoder", "RotatingKVCache", "Transformer"]
