"""Model structs on the mlx_zeta blocks: attention-layer stacks, the token
Transformer wrapper and their caches (x-transformers style), re-exported by name.
"""

from mlx_zeta.structs.attention_layers import AttentionLayers, CrossAttender, Decoder, Encoder
from mlx_zeta.nn.cache import RotatingKVCache
from mlx_zeta.structs.layer_options import Alibi, Rotary, T5Bias
from mlx_zeta.structs.transformer import Transformer

__all__ = ["Alibi", "AttentionLayers", "CrossAttender", "Decoder", "Encoder", "Rotary", "RotatingKVCache", "T5Bias",
           "Transformer"]
from mlx_zeta.structs.vit import ViTransformerWrapper  # noqa: E402

__all__ += ["ViTransformerWrapper"]
from mlx_zeta.structs.autoregressive import AutoregressiveWrapper  # noqa: E402
from mlx_zeta.structs.decoding import decode_steps  # noqa: E402
from mlx_zeta.structs.sampling import min_p_filter, sample, top_k_filter, top_p_filter  # noqa: E402

__all__ += ["AutoregressiveWrapper", "decode_steps", "min_p_filter", "sample", "top_k_filter", "top_p_filter"]
from mlx_zeta.structs.encoder_decoder import XTransformer  # noqa: E402

__all__ += ["XTransformer"]
