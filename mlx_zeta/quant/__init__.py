"""Ternary (1.58-bit) layers: BitNet b1.58 quantization-aware training (bitlinear),
packed ternary formats (packing) and the inference layer (ternary), model-wide
swaps (model), the MatMul-free LM's layers (matmulfree), BitNet's sub-norm and stacked
projections (bitnet) and Keras-MatMulLess's layer set on BitLinear (mmless)."""

from mlx_zeta.quant.bitlinear import (BitLinear, absmax_scale, absmean_scale, activation_quant, quantize_activations,
                                      ternarize, weight_quant)
from mlx_zeta.quant.matmulfree import (GLUChannelMixer, MatMulFreeBlock, MLGRU, MLGRUCache,
                                       complex_linear_scan, glu_hidden_dim, linear_recurrence_loop, linear_scan)
from mlx_zeta.quant.mmless import (GLU, AFTBlock, BilinearGLU, BitGRU, BitLRU, GeGLU, PatchEmbedding, ReGLU, SeGLU,
                                   SwiGLU, TokenEmbedding)
from mlx_zeta.quant.model import freeze_model, quantize_model
from mlx_zeta.quant.packing import bytes_per_weight, pack_2bit, pack_base3, unpack_2bit, unpack_base3
from mlx_zeta.quant.ternary import TernaryLinear
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
    "StackedProjection", "SubNormTernaryLinear",
]


def __getattr__(name: str):
    # ``mlx_zeta.quant.MatMulFreeLM``, a model, now lives in mlx_zeta.models; imported lazily by name
    # so this lower layer does not import the models layer.
    if name == "MatMulFreeLM":
        import importlib
        import warnings

        warnings.warn("mlx_zeta.quant.MatMulFreeLM moved to mlx_zeta.models.MatMulFreeLM; import it from there",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module("mlx_zeta.models.matmulfree").MatMulFreeLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
