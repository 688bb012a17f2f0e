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
    assert use_affine_linear(model) == 3
    assert [type(m).__name__ for m in model.layers] == ["AffineLinear", "ReLU", "AffineLinear", "AffineEmbedding"]
    assert sorted(k for k, _ in tree_flatten(model.parameters())) == names
    assert not tree_flatten(model.trainable_parameters())  # frozen, as MLX's quantized layers
    assert model.layers[0].weight is weight  # shared, not copied
    assert use_affine_linear(model) == 0  # already swapped


def test_bad_inputs_raise_one_line_errors():
    with pytest.raises(ValueError, match=r"^\[AffineLinear\] expected an mlx.nn.QuantizedLinear, got Linear$"):
        AffineLinear.from_quantized(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"^\[use_affine_linear\] expected an mlx.nn.Module, got dict$"):
        use_affine_linear({})


@pytest.mark.parametrize("bias", [False, True])
def test_input_gradient_equals_the_dense_one_and_keeps_no_float_weights(bias):
    """The backward pass of the dequantize path gives x's gradient of the float product (and zeros for
    the frozen quantized arrays) and dequantizes each weight only when it is needed (after the input in
    the forward pass, after the gradient in the backward one) rather than holding every float copy at
    once: a chain of 16 layers peaks (about 4 float weights, whatever the depth) well below its 16."""
    mx.random.seed(0)
    layers = [AffineLinear.from_quantized(nn.QuantizedLinear.from_linear(nn.Linear(512, 512, bias=bias), 64, 4))
              for _ in range(16)]
    x = mx.random.normal((16, 512))

    def chain(x, dense=False):
        for layer in layers:
            if dense:
                w = mx.dequantize(layer.weight, layer.scales, layer.biases, 64, 4)
                x = x @ w.T + (layer.bias if bias else 0)
            else:
                x = layer(x)
            x = mx.tanh(x)
        return x.sum()

    expected = mx.grad(lambda x: chain(x, dense=True))(x)
    mx.eval(expected, [layer.parameters() for layer in layers])
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    got = mx.grad(chain)(x)
    mx.eval(got)
    float_weights = 16 * 512 * 512 * 4
    assert mx.get_peak_memory() - before < float_weights / 2
    np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-4, atol=1e-5)
    dw = mx.grad(lambda w: layers[0].__class__.__call__(_with_weight(layers[0], w), x).sum())(layers[0].weight)
    assert dw.dtype == layers[0].weight.dtype and not mx.any(dw).item()


def _with_weight(layer: AffineLinear, weight: mx.array) -> AffineLinear:
    out = AffineLinear.from_quantized(layer)
    out.weight = weight
    return out
