"""AffineLinear (mlx_zeta.quant.affine): MLX's affine QuantizedLinear with a dequantize + BLAS path
for many rows on the CPU. References: MLX's own QuantizedLinear on the same arrays, and a float64
numpy product with the dequantized weight written out from the affine format (w = scale * q + bias)."""

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core loads)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_zeta.quant import AffineLinear, use_affine_linear
from mlx_zeta.quant.affine import DEQUANTIZE_ROWS


def _numpy_dequantized(layer: nn.QuantizedLinear) -> np.ndarray:
    """(out, in) float64 weight from the packed 4-bit codes: eight codes per uint32, low bits first."""
    packed = np.array(layer.weight).astype(np.uint64)  # (out, in / 8)
    codes = np.stack([(packed >> (4 * i)) & 0xF for i in range(8)], axis=-1).reshape(packed.shape[0], -1)
    g = layer.group_size
    scales = np.repeat(np.array(layer.scales, np.float64), g, axis=1)
    biases = np.repeat(np.array(layer.biases, np.float64), g, axis=1)
    return codes * scales + biases


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, DEQUANTIZE_ROWS - 1, DEQUANTIZE_ROWS, 96])
def test_equals_quantized_linear_and_a_float64_product(bias, rows):
    mx.random.seed(0)
    q = nn.QuantizedLinear.from_linear(nn.Linear(128, 48, bias=bias), group_size=64, bits=4)
    layer = AffineLinear.from_quantized(q)
    x = mx.random.normal((2, rows, 128))
    got, mlx_ref = layer(x), q(x)
    want = np.array(x, np.float64) @ _numpy_dequantized(q).T + (np.array(q.bias, np.float64) if bias else 0)
    np.testing.assert_allclose(np.array(got), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.array(got), np.array(mlx_ref), rtol=1e-5, atol=1e-5)


def test_swap_keeps_parameters_names_and_freezing():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64, bias=False), nn.Embedding(10, 64))
    nn.quantize(model, group_size=32, bits=4)
    weight = model.layers[0].weight
    names = sorted(k for k, _ in tree_flatten(model.parameters()))
    assert use_affine_linear(model) == 2
    assert [type(m).__name__ for m in model.layers] == ["AffineLinear", "ReLU", "AffineLinear", "QuantizedEmbedding"]
    assert sorted(k for k, _ in tree_flatten(model.parameters())) == names
    assert not tree_flatten(model.trainable_parameters())  # frozen, as MLX's quantized layers
    assert model.layers[0].weight is weight  # shared, not copied
    assert use_affine_linear(model) == 0  # already swapped


def test_bad_inputs_raise_one_line_errors():
    with pytest.raises(ValueError, match=r"^\[AffineLinear\] expected an mlx.nn.QuantizedLinear, got Linear$"):
        AffineLinear.from_quantized(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"^\[use_affine_linear\] expected an mlx.nn.Module, got dict$"):
        use_affine_linear({})
