"""Ternary (1.58-bit) layers: BitNet b1.58 quantization-aware training (bitlinear),
packed ternary formats (:mod:`mlx_zeta.kernels.packing`, re-exported) and the inference layer
(ternary), model-wide swaps (model), the MatMul-free LM's layers (matmulfree), BitNet's sub-norm
and stacked projections (bitnet) and Keras-MatMulLess's layer set on BitLinear (mmless)."""

from mlx_zeta.quant.bitlinear import (BitLinear, absmax_scale, absmean_scale, activation_quant, quantize_activations,
                                      ternarize, weight_quant)
from mlx_zeta.quant.matmulfree import (GLUChannelMixer, MatMulFreeBlock, MLGRU, MLGRUCache,
                                       complex_linear_scan, glu_hidden_dim, linear_recurrence_loop, linear_scan)
from mlx_zeta.quant.mmless import (GLU, AFTBlock, BilinearGLU, BitGRU, BitLRU, GeGLU, PatchEmbedding, ReGLU, SeGLU,
                                   SwiGLU, TokenEmbedding)
from mlx_zeta.quant.model import freeze_model, quantize_model
from mlx_zeta.kernels.packing import bytes_per_weight, pack_2bit, pack_base3, unpack_2bit, unpack_base3
from mlx_zeta.quant.ternary import TernaryLinear
from mlx_zeta.quant.affine import AffineEmbedding, AffineLinear, affine_quantize, use_affine_linear
from mlx_zeta.quant.bitnet import StackedProjection, SubNormTernaryLinear

__all__ = [
    "BitLinear", "absmax_scale", "absmean_scale", "activation_quant", "quantize_activations", "ternarize",
    "weight_quant",
    "GLUChannelMixer", "MatMulFreeBlock", "MLGRU", "MLGRUCache", "complex_linear_scan",
    "glu_hidden_dim", "linear_recurrence_loop", "linear_scan",
    "GLU", "AFTBlock", "BilinearGLU", "BitGRU", "BitLRU", "GeGLU", "PatchEmbedding", "ReGLU", "SeGLU", "SwiGLU",
    "TokenEmbedding",
    "freeze_model", "quantize_model",
    "bytes_per_weight", "pack_2bit", "pack_base3", "unpack_2bit", "unpack_base3", "TernaryLinear",
    "StackedProjection", "SubNormTernaryLinear", "AffineLinear", "AffineEmbedding", "affine_quantize", "use_affine_linear",
]


def __getattr__(name: str):
    if name == "MatMulFreeLM":  # a model: it lives in the models layer, above this one
        raise ImportError("mlx_zeta.quant.MatMulFreeLM moved: import it from mlx_zeta.models")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
