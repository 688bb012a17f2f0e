"""mlx_zeta.quant.ternary.TernaryLinear: the integer accumulation against exact numpy int32
matmuls, the int8 output against BitLinear's training forward, float mode, both Hugging Face
scale conventions (hand-computed and against transformers' own BitLinear/AutoBitLinear), both
compute paths, save/load of the packed weights, and the errors."""

import mlx_zeta  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from parity import assert_close

import mlx_zeta.quant.ternary as ternary
from mlx_zeta.quant import BitLinear, quantize_activations, ternarize
from mlx_zeta.kernels.packing import pack_2bit, pack_base3
from mlx_zeta.quant.ternary import TernaryLinear

ROWS = [1, 3, 8, 33]  # kernel="auto": the native kernel where built (GEMV up to 8 rows), else unpack
SHAPES = [(64, 32), (70, 33), (5, 1), (1, 7), (129, 66)]  # (in, out): non-multiples of 4, 5, 64
PATHS = [(k, p) for k in ("unpack", "affine") for p in ("2bit", "base3")]


def _bitlinear(rng, cols, out, bias=False, norm=False):
    layer = BitLinear(cols, out, bias=bias, norm=norm)
    layer.weight = mx.array(rng.standard_normal((out, cols)).astype(np.float32) * 0.1)
    if bias:
        layer.bias = mx.array(rng.standard_normal(out).astype(np.float32))
    if norm:
        layer.norm.weight = mx.array(rng.uniform(0.5, 1.5, cols).astype(np.float32))
    return layer


def _x(rng, *shape):
    return mx.array(rng.standard_normal(shape).astype(np.float32))


@pytest.mark.parametrize("kernel, packing", PATHS + [("auto", "2bit")])
@pytest.mark.parametrize("cols, out", SHAPES)
def test_integer_accumulation_is_exact(rng, cols, out, kernel, packing):
    bit = _bitlinear(rng, cols, out)
    layer = TernaryLinear.from_bitlinear(bit, kernel=kernel, packing=packing)
    q_w = np.array(ternarize(bit.weight)[0]).astype(np.int32)
    for rows in ROWS:
        x = _x(rng, rows, cols)
        acc, s_x = layer.integer_matmul(x)
        q_x, s_ref = quantize_activations(x)
        assert acc.dtype == mx.int32 and acc.shape == (rows, out)
        assert np.array_equal(np.array(acc), np.array(q_x).astype(np.int32) @ q_w.T)
        assert np.array_equal(np.array(s_x), np.array(s_ref))


def test_integer_accumulation_at_the_largest_products(rng):
    # every |q_x| = 127 and every weight 1: A = 127 * in exactly (520192 for in = 4096)
    layer = TernaryLinear.from_packed(pack_2bit(np.ones((4, 4096), np.int8)), 1.0, kernel="unpack")
    x = mx.array(np.where(rng.random((2, 4096)) < 0.5, -3.0, 3.0).astype(np.float32))
    acc, _ = layer.integer_matmul(x)
    expected = 127 * np.array(mx.sum(mx.sign(x), axis=-1)).astype(np.int64)
    assert np.array_equal(np.array(acc), np.repeat(expected[:, None], 4, axis=1))


@pytest.mark.parametrize("kernel", ["unpack", "affine"])
def test_long_inputs_split_into_exact_chunks(rng, monkeypatch, kernel):
    # shrink the float32-exactness limits so that the chunked int32 sum (unpack) and the
    # affine -> unpack fallback both run on a small layer
    monkeypatch.setattr(ternary, "EXACT_IN_FEATURES", 16)
    monkeypatch.setattr(ternary, "EXACT_IN_FEATURES_AFFINE", 16)
    bit = _bitlinear(rng, 70, 9)
    layer = TernaryLinear.from_bitlinear(bit, kernel=kernel)
    x = _x(rng, 3, 70)
    acc, _ = layer.integer_matmul(x)
    q_w = np.array(ternarize(bit.weight)[0]).astype(np.int32)
    assert np.array_equal(np.array(acc), np.array(quantize_activations(x)[0]).astype(np.int32) @ q_w.T)
    assert_close(layer(x), bit(x))


@pytest.mark.parametrize("packing", ["2bit", "base3"])
def test_many_small_slabs_and_input_gradient(rng, monkeypatch, packing):
    # 70 inputs with slabs of 140 weights: 2 rows per slab, chained with mx.depends
    bit = _bitlinear(rng, 70, 33, bias=True)
    layer = TernaryLinear.from_bitlinear(bit, activation="float", packing=packing)
    x = _x(rng, 3, 70)
    whole = np.array(layer(x))
    monkeypatch.setattr(ternary, "SLAB_ELEMENTS", 140)
    np.testing.assert_allclose(np.array(layer(x)), whole, rtol=1e-6, atol=1e-6)
    # float mode is linear in x: d sum(y) / dx = sum over outputs of T / s_w, for every row
    q, s_w = ternarize(bit.weight)
    grad = mx.grad(lambda x: layer(x).sum())(x)
    assert_close(grad, np.broadcast_to(np.array(q).sum(0) / float(s_w.item()), (3, 70)))


@pytest.mark.parametrize("convention", ["divide", "multiply"])
@pytest.mark.parametrize("bias, norm", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("kernel, packing", PATHS)
def test_int8_output_matches_bitlinear_training_forward(rng, bias, norm, convention, kernel, packing):
    bit = _bitlinear(rng, 70, 33, bias=bias, norm=norm)
    layer = TernaryLinear.from_bitlinear(bit, scale_convention=convention, kernel=kernel, packing=packing)
    assert ("bias" in layer) == bias and ("norm" in layer) == norm
    for shape in ((1, 70), (2, 4, 70)):
        x = _x(rng, *shape)
        assert_close(layer(x), bit(x), what=f"{shape}")  # float32 tolerance: rtol = atol = 1e-5


@pytest.mark.parametrize("convention", ["divide", "multiply"])
@pytest.mark.parametrize("kernel, packing", PATHS)
def test_int8_input_gradient_is_bitlinears_straight_through(rng, convention, kernel, packing):
    """The int8 rounding passes the gradient straight through, as BitLinear trains (otherwise x would
    get only the gradient through s_x): needed by adapters on earlier layers of a ternary model."""
    bit = _bitlinear(rng, 70, 33, bias=True, norm=True)
    layer = TernaryLinear.from_bitlinear(bit, scale_convention=convention, kernel=kernel, packing=packing)
    x, w = _x(rng, 2, 3, 70), mx.array(rng.standard_normal((2, 3, 33)).astype(np.float32))
    grad = mx.grad(lambda x: (layer(x) * w).sum())(x)
    assert_close(grad, mx.grad(lambda x: (bit(x) * w).sum())(x))


@pytest.mark.parametrize("convention", ["divide", "multiply"])
@pytest.mark.parametrize("kernel, packing", PATHS)
def test_float_mode(rng, convention, kernel, packing):
    bit = _bitlinear(rng, 70, 33, bias=True)
    layer = TernaryLinear.from_bitlinear(bit, activation="float", scale_convention=convention,
                                         kernel=kernel, packing=packing)
    q, s_w = ternarize(bit.weight)
    w = np.array(q).astype(np.float64) / float(s_w.item())
    for rows in (1, 8):
        x = _x(rng, rows, 70)
        assert_close(layer(x), np.array(x).astype(np.float64) @ w.T + np.array(bit.bias))


def test_bitlinear_to_ternary_and_frozen(rng):
    bit = _bitlinear(rng, 64, 32, norm=True)
    layer = bit.to_ternary(activation="float")
    assert isinstance(layer, TernaryLinear) and layer.activation == "float"
    assert tree_flatten(layer.trainable_parameters()) == []
    assert layer.packed.dtype == mx.uint8 and layer.weight_scale.dtype == mx.float32 and layer.weight_scale.ndim == 0
    assert np.array_equal(np.array(layer.norm.weight), np.array(bit.norm.weight))


def test_low_precision_input_keeps_its_dtype(rng):
    layer = TernaryLinear.from_bitlinear(_bitlinear(rng, 64, 32, norm=True))
    x = _x(rng, 2, 64)
    for dtype in (mx.float16, mx.bfloat16):
        y = layer(x.astype(dtype))
        assert y.dtype == dtype
        assert_close(y, layer(x.astype(dtype).astype(mx.float32)), dtype)


# Hand-made case for both conventions. x = [0.5, -1, 3, 4]: s_x = 127 / 4 = 31.75,
# Q_x = round([15.875, -31.75, 95.25, 127]) = [16, -32, 95, 127].
# A = Q_x T^T: [16 - 95 + 127, -32 + 95, -16 + 32, 16 - 32 + 95 + 127] = [48, 63, 16, 206].
HAND_T = np.array([[1, 0, -1, 1], [0, 1, 1, 0], [-1, -1, 0, 0], [1, 1, 1, 1]], np.int8)
HAND_X = np.array([[0.5, -1.0, 3.0, 4.0]], np.float32)
HAND_A = np.array([48.0, 63.0, 16.0, 206.0])
HAND_B = np.array([1.0, 0.0, -1.0, 0.5], np.float32)


@pytest.mark.parametrize("kernel, packing", PATHS)
def test_scale_conventions_hand_computed(kernel, packing):
    packed = pack_2bit(HAND_T) if packing == "2bit" else pack_base3(HAND_T)
    kw = dict(in_features=4, out_features=4, bias=HAND_B, kernel=kernel, packing=packing)
    divide = TernaryLinear.from_packed(packed, np.array([2.0], np.float32), scale_convention="divide", **kw)
    assert np.array_equal(np.array(divide.integer_matmul(mx.array(HAND_X))[0]), HAND_A[None].astype(np.int32))
    # transformers BitLinear: A / (s_x * weight_scale) + b = A / 63.5 + b
    assert_close(divide(mx.array(HAND_X)), (HAND_A / 63.5 + HAND_B)[None])
    # transformers AutoBitLinear (offline): (A / s_x + b) * weight_scale, bias scaled too
    multiply = TernaryLinear.from_packed(packed, 0.5, scale_convention="multiply", **kw)
    assert_close(multiply(mx.array(HAND_X)), ((HAND_A / 31.75 + HAND_B) * 0.5)[None])


def _transformers_bitnet():
    torch = pytest.importorskip("torch")
    bitnet = pytest.importorskip("transformers.integrations.bitnet")
    return torch, bitnet


@pytest.mark.parametrize("use_rms_norm", [False, True])
def test_divide_matches_transformers_bitlinear(rng, use_rms_norm):
    torch, bitnet = _transformers_bitnet()
    cols, out = 40, 12  # transformers' BitLinear holds (out // 4, in) packed rows: out % 4 == 0
    q = rng.integers(-1, 2, (out, cols)).astype(np.int8)
    scale, bias = np.float32(3.7), rng.standard_normal(out).astype(np.float32)
    gain = rng.uniform(0.5, 1.5, cols).astype(np.float32)
    theirs = bitnet.BitLinear(cols, out, bias=True, dtype=torch.float32, use_rms_norm=use_rms_norm)
    with torch.no_grad():
        theirs.weight.copy_(bitnet.pack_weights(torch.from_numpy(q.copy())))
        theirs.weight_scale.fill_(float(scale))  # weight_scale: shape (1,), the model dtype
        theirs.bias.copy_(torch.from_numpy(bias))
        if use_rms_norm:
            theirs.rms_norm.weight.copy_(torch.from_numpy(gain))
    assert tuple(theirs.weight_scale.shape) == (1,)
    ours = TernaryLinear.from_packed(theirs.weight.numpy(), theirs.weight_scale.numpy(), bias=bias,
                                     scale_convention="divide", norm=use_rms_norm)
    if use_rms_norm:
        ours.norm.weight = mx.array(gain)
    x = rng.standard_normal((2, 3, cols)).astype(np.float32)
    with torch.no_grad(), torch._dynamo.config.patch(disable=True):  # its methods are torch.compile'd
        expected = theirs(torch.from_numpy(x))
    for kernel in ("unpack", "affine"):
        ours.kernel = kernel
        assert_close(ours(mx.array(x)), expected, what=kernel)


def test_multiply_matches_transformers_autobitlinear(rng):
    torch, bitnet = _transformers_bitnet()
    cols, out = 40, 12
    q = rng.integers(-1, 2, (out, cols)).astype(np.int8)
    scale, bias = np.float32(0.27), rng.standard_normal(out).astype(np.float32)
    theirs = bitnet.AutoBitLinear(cols, out, bias=True, dtype=torch.float32, online_quant=False)
    with torch.no_grad():
        theirs.weight.copy_(torch.from_numpy(q.astype(np.float32)))  # offline: unpacked ternary weights
        theirs.weight_scale.fill_(float(scale))
        theirs.bias.copy_(torch.from_numpy(bias))
    ours = TernaryLinear.from_packed(pack_2bit(q), theirs.weight_scale.numpy(), bias=bias,
                                     scale_convention="multiply")
    x = rng.standard_normal((5, cols)).astype(np.float32)
    with torch.no_grad(), torch._dynamo.config.patch(disable=True):
        expected = theirs(torch.from_numpy(x))
    assert_close(ours(mx.array(x)), expected)


@pytest.mark.parametrize("packing", ["2bit", "base3"])
@pytest.mark.parametrize("activation", ["int8", "float"])
def test_compute_paths_agree(rng, activation, packing):
    bit = _bitlinear(rng, 129, 66, bias=True, norm=True)
    layer = TernaryLinear.from_bitlinear(bit, activation=activation, packing=packing)
    for rows in (1, 33):
        x = _x(rng, rows, 129)
        layer.kernel = "unpack"
        unpacked = np.array(layer(x))
        layer.kernel = "affine"
        affine = np.array(layer(x))
        if activation == "int8":  # exact integers, then the same scaling ops: bitwise equal
            assert np.array_equal(unpacked, affine)
        else:  # float sums in different orders
            np.testing.assert_allclose(affine, unpacked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("packing", ["2bit", "base3"])
def test_save_and_load_keep_packed_weights(rng, tmp_path, packing):
    bit = _bitlinear(rng, 70, 33, bias=True, norm=True)
    source = TernaryLinear.from_bitlinear(bit, packing=packing)
    path = str(tmp_path / "ternary.safetensors")
    mx.save_safetensors(path, dict(tree_flatten(source.parameters())))
    stored = mx.load(path)
    assert sorted(stored) == ["bias", "norm.weight", "packed", "weight_scale"]
    assert stored["packed"].dtype == mx.uint8 and stored["packed"].shape == source.packed.shape
    target = TernaryLinear(70, 33, bias=True, norm=True, packing=packing, kernel="affine")
    x = _x(rng, 2, 70)
    mx.eval(target(x))  # builds the affine cache from the zero weights; loading must replace it
    target.load_weights(path)
    assert target.packed.dtype == mx.uint8
    assert np.array_equal(np.array(target.packed), np.array(source.packed))
    assert np.array_equal(np.array(target(x)), np.array(source(x)))


def test_nbytes_counts_packed_weights_and_the_affine_cache(rng):
    layer = TernaryLinear.from_bitlinear(_bitlinear(rng, 128, 64), kernel="unpack")
    assert layer.nbytes() == 16 * 128 + 4
    layer.kernel = "affine"
    mx.eval(layer(_x(rng, 1, 128)))
    # words: 64 x 128 / 16 uint32; scales and biases: 64 x 1 float32 each (group 128)
    assert layer.nbytes(cache=False) == 16 * 128 + 4
    assert layer.nbytes() == 16 * 128 + 4 + 64 * 8 * 4 + 2 * 64 * 4


def test_errors(rng):
    with pytest.raises(ValueError, match=r"\[TernaryLinear\] expected in_features to be an int >= 1"):
        TernaryLinear(0, 4)
    for kw, name in ((dict(activation="int4"), "activation"), (dict(scale_convention="mul"), "scale_convention"),
                     (dict(packing="3bit"), "packing"), (dict(kernel="metal"), "kernel")):
        with pytest.raises(ValueError, match=rf"expected {name} in"):
            TernaryLinear(8, 4, **kw)
    layer = TernaryLinear(8, 4)
    with pytest.raises(ValueError, match=r"expected input of shape \(\.\.\., 8\), got \(2, 7\)"):
        layer(mx.zeros((2, 7)))
    packed = pack_2bit(rng.integers(-1, 2, (8, 6)).astype(np.int8))
    with pytest.raises(ValueError, match="2-D uint8"):
        TernaryLinear.from_packed(packed.astype(mx.int32), 1.0)
    with pytest.raises(ValueError, match=r"packed has shape \(2, 6\), expected \(3, 6\)"):
        TernaryLinear.from_packed(packed, 1.0, out_features=9)
    with pytest.raises(ValueError, match="not ternary"):
        TernaryLinear.from_packed(np.full((2, 6), 0b11, np.uint8), 1.0)
    with pytest.raises(ValueError, match="not ternary"):
        TernaryLinear.from_packed(np.full((2, 6), 250, np.uint8), 1.0, in_features=30, packing="base3")
    with pytest.raises(ValueError, match="needs in_features"):
        TernaryLinear.from_packed(np.full((2, 6), 121, np.uint8), 1.0, packing="base3")
    for scale in (np.array([1.0, 2.0]), 0.0, float("nan")):
        with pytest.raises(ValueError, match="weight_scale to be one positive finite number"):
            TernaryLinear.from_packed(packed, scale)
    with pytest.raises(ValueError, match=r"bias of shape \(8,\), got \(7,\)"):
        TernaryLinear.from_packed(packed, 1.0, bias=np.zeros(7, np.float32))
    layer = TernaryLinear.from_packed(packed, 1.0)
    layer.packed = layer.packed.astype(mx.float32)  # e.g. float weights loaded into a packed layer
    with pytest.raises(ValueError, match=r"packed must be uint8 of shape \(2, 6\)"):
        layer(mx.zeros((1, 6)))


@pytest.mark.parametrize("packing", ["2bit", "base3"])
@pytest.mark.parametrize("convention", ["divide", "multiply"])
@pytest.mark.parametrize("activation", ["int8", "float"])
def test_dense_form_matches_the_forward(rng, activation, convention, packing):
    """dense_weight decodes the trained ternary matrix (ternarize of the BitLinear weight), its
    effective scale and bias; dense_forward on W = s T (what Core ML export traces) equals the
    packed forward."""
    bit = _bitlinear(rng, 70, 33, bias=True, norm=True)
    layer = TernaryLinear.from_bitlinear(bit, activation=activation, scale_convention=convention, packing=packing)
    t, s, b = layer.dense_weight()
    q, s_w = ternarize(bit.weight, bit.quant_eps)
    assert t.dtype == mx.float32 and t.shape == (33, 70)
    assert np.array_equal(np.array(t), np.array(q).astype(np.float32))
    # both conventions: W = s T is the trained T / s_w ("multiply" stores sigma = 1 / s_w in float32)
    np.testing.assert_allclose(s, 1.0 / float(s_w.item()), rtol=2e-7)
    assert_close(b, bit.bias)  # "multiply" stores bias * s_w and scales it back by sigma
    w = t * s
    for shape in ((1, 70), (2, 4, 70)):
        x = _x(rng, *shape)
        assert_close(layer.dense_forward(x, w, b), layer(x), what=f"{shape}")
    x16 = _x(rng, 3, 70).astype(mx.float16)
    assert layer.dense_forward(x16, w, b).dtype == mx.float16
