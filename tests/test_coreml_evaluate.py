"""Numpy evaluator and fp16 lint for saved Core ML ML Programs.

Each program is built with the MIL builder, converted and saved to an
``.mlpackage``, loaded back from disk and evaluated; every op the evaluator
implements is checked against MLX or a hand-computed value.
"""

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")

from mlx_zeta.converters.coreml.evaluate import Evaluator, evaluate, load_program  # noqa: E402  (before mlx: BLAS)
from mlx_zeta.converters.coreml.lint import lint  # noqa: E402

mx = pytest.importorskip("mlx.core")

from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402
from coremltools.converters.mil.mil import get_new_symbol  # noqa: E402

IOS18 = ct.target.iOS18
RNG = np.random.default_rng(0)


def _save(prog, tmp_path, name="m", empty=True, target=IOS18):
    """Convert ``prog`` and save it; ``empty`` skips the optimization passes so the op under test survives."""
    kw = {"pass_pipeline": ct.PassPipeline.EMPTY} if empty else {}
    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=target, **kw)
    path = tmp_path / f"{name}.mlpackage"
    model.save(str(path))
    return path


def _run(build, specs, inputs, tmp_path, op_type, empty=True, target=IOS18):
    """Build, save, reload, assert ``op_type`` is in the saved program, evaluate; return the single output."""
    prog = mb.program(input_specs=specs, opset_version=target)(build)
    path = _save(prog, tmp_path, empty=empty, target=target)
    loaded = load_program(path)
    assert op_type in {op.op_type for op in loaded.functions["main"].operations}
    out = evaluate(path, inputs)
    assert len(out) == 1
    return next(iter(out.values()))


def _f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _spec(a):
    return mb.TensorSpec(shape=a.shape, dtype=types.fp16 if a.dtype == np.float16 else types.fp32)


# --------------------------------------------------------------------------- conv


@pytest.mark.parametrize("pad_type,groups,strides,dilations", [
    ("custom", 2, (2, 1), (1, 2)),
    ("same", 1, (1, 1), (1, 1)),
    ("valid", 4, (1, 2), (2, 1)),
])
def test_conv2d_vs_mlx(tmp_path, pad_type, groups, strides, dilations):
    x, w, b = _f32(1, 4, 7, 8), _f32(8, 4 // groups, 3, 3), _f32(8)
    pad = [1, 1, 2, 2] if pad_type == "custom" else None
    mx_pad = {"custom": (1, 2), "same": (1, 1), "valid": (0, 0)}[pad_type]

    def build(x):
        kw = {"pad": np.array(pad, np.int32)} if pad else {}
        return mb.conv(x=x, weight=w, bias=b, strides=strides, dilations=dilations, pad_type=pad_type, groups=groups, **kw)

    got = _run(build, [_spec(x)], {"x": x}, tmp_path, "conv")
    ref = mx.conv2d(mx.array(x.transpose(0, 2, 3, 1)), mx.array(w.transpose(0, 2, 3, 1)), stride=strides,
                    padding=mx_pad, dilation=dilations, groups=groups) + mx.array(b)
    np.testing.assert_allclose(got, np.array(ref).transpose(0, 3, 1, 2), rtol=1e-5, atol=1e-5)


def test_conv1d_vs_mlx(tmp_path):
    x, w = _f32(2, 3, 11), _f32(4, 3, 3)
    got = _run(lambda x: mb.conv(x=x, weight=w, strides=[2], dilations=[2], pad_type="valid"),
               [_spec(x)], {"x": x}, tmp_path, "conv")
    ref = mx.conv1d(mx.array(x.transpose(0, 2, 1)), mx.array(w.transpose(0, 2, 1)), stride=2, dilation=2)
    np.testing.assert_allclose(got, np.array(ref).transpose(0, 2, 1), rtol=1e-5, atol=1e-5)


def test_conv_fp16_output_dtype(tmp_path):
    x, w = _f32(1, 2, 5, 5).astype(np.float16), _f32(3, 2, 3, 3).astype(np.float16)
    got = _run(lambda x: mb.conv(x=x, weight=w, pad_type="same"), [_spec(x)], {"x": x}, tmp_path, "conv")
    assert got.dtype == np.float16
    ref = mx.conv2d(mx.array(x.astype(np.float32).transpose(0, 2, 3, 1)),
                    mx.array(w.astype(np.float32).transpose(0, 2, 3, 1)), padding=1)
    np.testing.assert_allclose(got.astype(np.float32), np.array(ref).transpose(0, 3, 1, 2), rtol=2e-3, atol=2e-3)


def test_conv_transpose2d_vs_mlx(tmp_path):
    x, w = _f32(1, 4, 5, 5), _f32(4, 3, 3, 3)  # [C_in, C_out, kH, kW]
    got = _run(lambda x: mb.conv_transpose(x=x, weight=w, strides=[2, 2], pad_type="custom", pad=[1, 1, 1, 1]),
               [_spec(x)], {"x": x}, tmp_path, "conv_transpose")
    ref = mx.conv_transpose2d(mx.array(x.transpose(0, 2, 3, 1)), mx.array(w.transpose(1, 2, 3, 0)), stride=2, padding=1)
    np.testing.assert_allclose(got, np.array(ref).transpose(0, 3, 1, 2), rtol=1e-5, atol=1e-5)


def test_conv_transpose_groups_dilation_valid(tmp_path):
    x, w, b = _f32(2, 4, 3, 4), _f32(4, 2, 2, 3), _f32(4)
    got = _run(lambda x: mb.conv_transpose(x=x, weight=w, bias=b, strides=[2, 1], dilations=[2, 1], groups=2, pad_type="valid"),
               [_spec(x)], {"x": x}, tmp_path, "conv_transpose")
    # H: stride 2, dilation 2; W: stride 1, dilation 1. Every input pixel scatters weight * value.
    ref = np.zeros(got.shape)
    for c in range(4):
        g = c // 2
        for i in range(3):
            for j in range(4):
                for a in range(2):
                    for bb in range(3):
                        ref[:, g * 2:(g + 1) * 2, i * 2 + a * 2, j + bb] += x[:, c, i, j, None] * w[c, :, a, bb]
    np.testing.assert_allclose(got, ref + b.reshape(1, -1, 1, 1), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- pooling


def _pool_ref(x, k, s, p, kind, exclude):
    n, c, h, w = x.shape
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    out = np.zeros((n, c, oh, ow), np.float32)
    for i in range(oh):
        for j in range(ow):
            r0, c0 = i * s - p, j * s - p
            win = x[:, :, max(r0, 0):r0 + k, max(c0, 0):c0 + k]
            if kind == "max":
                out[:, :, i, j] = win.max(axis=(2, 3))
            else:
                out[:, :, i, j] = win.sum(axis=(2, 3)) / (win.shape[2] * win.shape[3] if exclude else k * k)
    return out


@pytest.mark.parametrize("kind,exclude", [("max", False), ("avg", True), ("avg", False)])
def test_pool2d(tmp_path, kind, exclude):
    x = _f32(1, 2, 6, 7)

    def build(x):
        kw = dict(x=x, kernel_sizes=[3, 3], strides=[2, 2], pad_type="custom", pad=[1, 1, 1, 1])
        return mb.max_pool(**kw) if kind == "max" else mb.avg_pool(**kw, exclude_padding_from_average=exclude)

    got = _run(build, [_spec(x)], {"x": x}, tmp_path, f"{kind}_pool")
    np.testing.assert_allclose(got, _pool_ref(x, 3, 2, 1, kind, exclude), rtol=1e-6, atol=1e-6)


def test_max_pool_vs_mlx_valid(tmp_path):
    import mlx.nn as nn

    x = _f32(2, 3, 8, 8)
    got = _run(lambda x: mb.max_pool(x=x, kernel_sizes=[2, 2], strides=[2, 2], pad_type="valid"),
               [_spec(x)], {"x": x}, tmp_path, "max_pool")
    ref = nn.MaxPool2d(2, 2)(mx.array(x.transpose(0, 2, 3, 1)))
    np.testing.assert_array_equal(got, np.array(ref).transpose(0, 3, 1, 2))


# --------------------------------------------------------------------------- activations / resampling / norms


def test_silu_fp16(tmp_path):
    x = np.linspace(-8, 8, 24, dtype=np.float16).reshape(2, 12)
    got = _run(lambda x: mb.silu(x=x), [_spec(x)], {"x": x}, tmp_path, "silu")
    assert got.dtype == np.float16
    ref = np.array(mx.sigmoid(mx.array(x.astype(np.float32))) * mx.array(x.astype(np.float32)))
    np.testing.assert_allclose(got.astype(np.float32), ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("align,grid", [
    (False, [0.0, 0.1, 0.5, 0.9, 1.0]),   # coremltools docs, Xin=2 -> Xout=5
    (True, [0.0, 0.25, 0.5, 0.75, 1.0]),
])
def test_upsample_bilinear(tmp_path, align, grid):
    x = (np.arange(2, dtype=np.float32)[:, None] * 10 + np.arange(2, dtype=np.float32)).reshape(1, 1, 2, 2)
    got = _run(lambda x: mb.upsample_bilinear(x=x, scale_factor_height=2.5, scale_factor_width=2.5, align_corners=align),
               [_spec(x)], {"x": x}, tmp_path, "upsample_bilinear")
    g = np.array(grid, np.float32)
    np.testing.assert_allclose(got[0, 0], 10 * g[:, None] + g[None, :], rtol=1e-6, atol=1e-6)


def test_upsample_bilinear_align_false_scale6(tmp_path):
    x = np.array([0.0, 1.0], np.float32).reshape(1, 1, 1, 2)
    got = _run(lambda x: mb.upsample_bilinear(x=x, scale_factor_height=1, scale_factor_width=3, align_corners=False),
               [_spec(x)], {"x": x}, tmp_path, "upsample_bilinear")
    np.testing.assert_allclose(got[0, 0, 0], [0.0, 0.0, 1 / 3, 2 / 3, 1.0, 1.0], atol=1e-6)


def test_upsample_nearest(tmp_path):
    x = _f32(1, 2, 3, 4)
    got = _run(lambda x: mb.upsample_nearest_neighbor(x=x, scale_factor_height=2, scale_factor_width=3),
               [_spec(x)], {"x": x}, tmp_path, "upsample_nearest_neighbor")
    np.testing.assert_array_equal(got, np.repeat(np.repeat(x, 2, axis=2), 3, axis=3))


def test_batch_norm(tmp_path):
    x, mean, var, g, b = _f32(2, 3, 4, 5), _f32(3), np.abs(_f32(3)) + 0.5, _f32(3), _f32(3)
    got = _run(lambda x: mb.batch_norm(x=x, mean=mean, variance=var, gamma=g, beta=b, epsilon=1e-3),
               [_spec(x)], {"x": x}, tmp_path, "batch_norm")
    r = lambda a: mx.array(a.reshape(1, 3, 1, 1))  # noqa: E731
    ref = (mx.array(x) - r(mean)) * mx.rsqrt(r(var) + 1e-3) * r(g) + r(b)
    np.testing.assert_allclose(got, np.array(ref), rtol=1e-5, atol=1e-5)


def test_instance_norm_vs_mlx(tmp_path):
    import mlx.nn as nn

    x, g, b = _f32(2, 3, 4, 5) * 3 + 1, _f32(3), _f32(3)
    got = _run(lambda x: mb.instance_norm(x=x, gamma=g, beta=b, epsilon=1e-5),
               [_spec(x)], {"x": x}, tmp_path, "instance_norm")
    ref = np.array(nn.InstanceNorm(3, eps=1e-5)(mx.array(x.transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, ref * g.reshape(1, 3, 1, 1) + b.reshape(1, 3, 1, 1), rtol=1e-4, atol=1e-4)


def test_layer_norm_vs_mlx(tmp_path):  # coremltools' own value_inference
    x, g, b = _f32(2, 5, 8), _f32(8), _f32(8)
    got = _run(lambda x: mb.layer_norm(x=x, axes=[-1], gamma=g, beta=b, epsilon=1e-5),
               [_spec(x)], {"x": x}, tmp_path, "layer_norm")
    ref = mx.fast.layer_norm(mx.array(x), mx.array(g), mx.array(b), 1e-5)
    np.testing.assert_allclose(got, np.array(ref), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("with_mask", [False, True])
def test_sdpa_vs_mlx(tmp_path, with_mask):
    q, k, v = _f32(1, 2, 3, 8), _f32(1, 2, 5, 8), _f32(1, 2, 5, 8)
    mask = np.triu(np.full((3, 5), -1e4, np.float32), k=3)

    def build(q, k, v):
        kw = {"attn_mask": mask} if with_mask else {}
        return mb.scaled_dot_product_attention(query=q, key=k, value=v, **kw)

    got = _run(build, [_spec(q), _spec(k), _spec(v)], {"q": q, "k": k, "v": v}, tmp_path, "scaled_dot_product_attention")
    ref = mx.fast.scaled_dot_product_attention(mx.array(q), mx.array(k), mx.array(v), scale=8 ** -0.5,
                                               mask=mx.array(mask) if with_mask else None)
    np.testing.assert_allclose(got, np.array(ref), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- constexpr


def _eval_const(make, shape, dtype, tmp_path, op_type, target=IOS18):
    """Evaluate ``zeros + make()`` so the constexpr op is used by the saved program."""
    x = np.zeros(shape, dtype)
    return _run(lambda x: mb.add(x=x, y=make()), [_spec(x)], {"x": x}, tmp_path, op_type, target=target)


def test_lut_to_dense_uint2(tmp_path):
    # coremltools docs, case 1: 2-group 2-bit scalar palettization.
    idx = np.array([2, 3, 3, 0, 1, 0, 3, 0, 2, 1, 0, 3], dtype=types.np_uint2_dtype).reshape(6, 2)
    lut = np.array([1, 5, 9, 13, 2, 10, 18, 26], np.float16).reshape(2, 1, 4, 1)
    got = _eval_const(lambda: mb.constexpr_lut_to_dense(indices=idx, lut=lut), (6, 2), np.float16, tmp_path,
                      "constexpr_lut_to_dense")
    np.testing.assert_array_equal(got, [[9, 13], [13, 1], [5, 1], [26, 2], [18, 10], [2, 26]])


def test_lut_to_dense_vector(tmp_path):
    idx = np.array([[[0, 0], [1, 0]], [[1, 1], [0, 0]]], dtype=types.np_uint1_dtype)
    a, b = [1.0, 2.0, 3.0], [-1.0, -2.0, -3.0]
    lut = np.array([a, b], np.float16).reshape(1, 1, 1, 2, 3)
    got = _eval_const(lambda: mb.constexpr_lut_to_dense(indices=idx, lut=lut, vector_axis=1), (2, 6, 2), np.float16,
                      tmp_path, "constexpr_lut_to_dense")
    cent = {0: a, 1: b}
    want = np.zeros((2, 6, 2))
    for i in range(2):
        for j in range(2):
            for k in range(2):
                want[i, 3 * j:3 * j + 3, k] = cent[int(idx[i, j, k])]
    np.testing.assert_array_equal(got, want)


def test_blockwise_shift_scale(tmp_path):
    data = RNG.integers(-8, 8, size=(4, 6)).astype(np.int8)
    scale = np.array([[0.5, 1, 2], [0.25, 4, 1]], np.float16)
    offset = np.array([[1, 0, -1], [2, 3, 0]], np.int8)
    got = _eval_const(lambda: mb.constexpr_blockwise_shift_scale(data=data, scale=scale, offset=offset), (4, 6),
                      np.float16, tmp_path, "constexpr_blockwise_shift_scale")
    want = [[float(scale[i // 2, j // 2]) * (int(data[i, j]) - int(offset[i // 2, j // 2])) for j in range(6)] for i in range(4)]
    np.testing.assert_array_equal(got, want)


def test_affine_dequantize_ios17(tmp_path):
    q = np.array([[0, 10, 255], [3, 4, 5]], np.uint8)
    got = _eval_const(lambda: mb.constexpr_affine_dequantize(quantized_data=q, zero_point=np.uint8(3),
                                                             scale=np.array([0.5, 2.0], np.float32), axis=0),
                      (2, 3), np.float32, tmp_path, "constexpr_affine_dequantize", target=ct.target.iOS17)
    np.testing.assert_array_equal(got, [[-1.5, 3.5, 126.0], [0.0, 2.0, 4.0]])


def test_constexpr_cast(tmp_path):
    src = np.array([[1.5, -2.25], [65504, 0.0]], np.float16)
    got = _eval_const(lambda: mb.constexpr_cast(source_val=src, output_dtype="fp32"), (2, 2), np.float32, tmp_path,
                      "constexpr_cast", target=ct.target.iOS17)
    np.testing.assert_array_equal(got, src.astype(np.float32))


# --------------------------------------------------------------------------- state, multifunction


def _cache_program(reread):
    """Decode-style cache: write ``x`` [1, 1, 2] at row ``pos`` of the state [1, 4, 2]; return the column sums
    of the updated cache, read back with a second ``read_state`` (``reread``) or taken from
    ``coreml_update_state``'s output. (coremltools 9.0's default pipeline merges the second ``read_state``
    into the first by common-subexpression elimination, so the re-read variant is only saved without passes.)"""
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 1, 2), dtype=types.fp16), mb.TensorSpec(shape=(1,), dtype=types.int32),
                             mb.StateTensorSpec((1, 4, 2), dtype=types.fp16)], opset_version=IOS18)
    def prog(x, pos, cache):
        zero = np.array([0], np.int32)
        begin = mb.concat(values=[zero, pos, zero], axis=0)
        end = mb.concat(values=[np.array([1], np.int32), mb.add(x=pos, y=1), np.array([2], np.int32)], axis=0)
        upd = mb.slice_update(x=mb.read_state(input=cache), update=x, begin=begin, end=end)
        new = mb.coreml_update_state(state=cache, value=upd)
        return mb.reduce_sum(x=mb.read_state(input=cache) if reread else new, axes=[1])

    return prog


@pytest.mark.parametrize("empty", [True, False])
def test_stateful_decode_steps(tmp_path, empty):
    path = _save(_cache_program(reread=empty), tmp_path, empty=empty)
    ops = {op.op_type for op in load_program(path).functions["main"].operations}
    assert {"read_state", "coreml_update_state", "slice_update"} <= ops
    ev = Evaluator(path)
    assert ev.state["cache"].shape == (1, 4, 2) and not ev.state["cache"].any()
    want = np.zeros((1, 4, 2), np.float16)
    for step in range(3):
        x = np.array([[[step + 1, -(step + 1) * 0.5]]], np.float16)
        out = ev({"x": x, "pos": np.array([step], np.int32)})
        want[0, step] = x[0, 0]
        np.testing.assert_array_equal(ev.state["cache"], want)
        np.testing.assert_array_equal(next(iter(out.values())), want.sum(axis=1))
    # evaluate() with an explicit state dict continues from it (in place).
    st = {"cache": ev.state["cache"].copy()}
    evaluate(path, {"x": np.ones((1, 1, 2), np.float16), "pos": np.array([3], np.int32)}, state=st)
    want[0, 3] = 1
    np.testing.assert_array_equal(st["cache"], want)
    ev.reset_state()
    assert not ev.state["cache"].any()


def test_multifunction_package(tmp_path):
    x = _f32(1, 2, 4, 4)
    p1 = _save(mb.program(input_specs=[_spec(x)], opset_version=IOS18)(lambda x: mb.silu(x=x)), tmp_path, "a")
    p2 = _save(mb.program(input_specs=[_spec(x)], opset_version=IOS18)(
        lambda x: mb.max_pool(x=x, kernel_sizes=[2, 2], strides=[2, 2], pad_type="valid")), tmp_path, "b")
    desc = ct.utils.MultiFunctionDescriptor()
    desc.add_function(str(p1), src_function_name="main", target_function_name="act")
    desc.add_function(str(p2), src_function_name="main", target_function_name="pool")
    desc.default_function_name = "act"
    out = tmp_path / "multi.mlpackage"
    ct.utils.save_multifunction(desc, str(out))
    a = next(iter(evaluate(out, {"x": x}, function="act").values()))
    b = next(iter(evaluate(out, {"x": x}, function="pool").values()))
    np.testing.assert_allclose(a, x / (1 + np.exp(-x)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(b, x.reshape(1, 2, 2, 2, 2, 2).max(axis=(3, 5)))
    with pytest.raises(KeyError, match=r"'main'.*\['act', 'pool'\]"):
        Evaluator(out)


def test_default_pipeline_end_to_end(tmp_path):
    """ct.convert's passes may fuse/rewrite ops (conv+batch_norm); the saved program still matches MLX."""
    x, w = _f32(1, 3, 6, 6), _f32(4, 3, 3, 3)
    mean, var, g, b = _f32(4), np.abs(_f32(4)) + 0.5, _f32(4), _f32(4)

    def build(x):
        y = mb.conv(x=x, weight=w, pad_type="same")
        y = mb.batch_norm(x=y, mean=mean, variance=var, gamma=g, beta=b, epsilon=1e-5)
        return mb.mul(x=y, y=mb.sigmoid(x=y))

    prog = mb.program(input_specs=[_spec(x)], opset_version=IOS18)(build)
    path = _save(prog, tmp_path, empty=False)
    got = next(iter(evaluate(path, {"x": x.astype(np.float16)}).values()))  # default fp16 precision: inputs fp16
    y = mx.conv2d(mx.array(x.transpose(0, 2, 3, 1)), mx.array(w.transpose(0, 2, 3, 1)), padding=1)
    y = (y - mx.array(mean)) * mx.rsqrt(mx.array(var) + 1e-5) * mx.array(g) + mx.array(b)
    ref = np.array(y * mx.sigmoid(y)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=2e-2, atol=2e-2)


def test_flexible_shape_specialized(tmp_path):
    n = get_new_symbol()
    prog = mb.program(input_specs=[mb.TensorSpec(shape=(1, n), dtype=types.fp32)], opset_version=IOS18)(
        lambda x: mb.reduce_sum(x=mb.silu(x=x), axes=[1]))
    ev = Evaluator(prog)
    for size in (3, 7):
        x = _f32(1, size)
        np.testing.assert_allclose(next(iter(ev({"x": x}).values())), (x / (1 + np.exp(-x))).sum(1), rtol=1e-5)


# --------------------------------------------------------------------------- errors, overflow


def test_errors_name_inputs_shapes_and_ops(tmp_path):
    x = _f32(2, 3)
    path = _save(mb.program(input_specs=[_spec(x)], opset_version=IOS18)(lambda x: mb.relu(x=x)), tmp_path)
    ev = Evaluator(path)
    with pytest.raises(KeyError, match=r"missing inputs \['x'\].*unexpected inputs \['y'\]"):
        ev({"y": x})
    with pytest.raises(ValueError, match=r"input 'x': expected shape \(2, 3\).*got \(3, 2\)"):
        ev({"x": x.T})
    with pytest.raises(TypeError, match="input 'x': expected float32, got int32"):
        ev({"x": np.zeros((2, 3), np.int32)})
    prog = mb.program(input_specs=[_spec(x)], opset_version=IOS18)(
        lambda x: mb.scatter_nd(data=x, indices=np.array([[0, 1]], np.int32), updates=np.array([5.0], np.float32)))
    with pytest.raises(NotImplementedError, match=r"op 'scatter_nd_0' of type 'scatter_nd'"):
        evaluate(prog, {"x": x})


def test_fp16_overflow_recorded():
    prog = mb.program(input_specs=[mb.TensorSpec(shape=(2,), dtype=types.fp16)], opset_version=IOS18)(
        lambda x: mb.mul(x=x, y=x, name="sq"))
    ev = Evaluator(prog)
    out = next(iter(ev({"x": np.array([2.0, 300.0], np.float16)}).values()))
    assert out.dtype == np.float16 and out[0] == 4 and np.isinf(out[1])
    assert ev.nonfinite_ops == [("sq", "mul")]


# --------------------------------------------------------------------------- lint


def _attn_program(mask_value, manual_softmax=False, shifted=True):
    mask = np.triu(np.full((4, 4), mask_value, np.float16), k=1)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4, 4), dtype=types.fp16)], opset_version=IOS18)
    def prog(s):
        s = mb.add(x=s, y=mask, name="masked")
        if not manual_softmax:
            return mb.softmax(x=s, axis=-1)
        if shifted:
            s = mb.sub(x=s, y=mb.reduce_max(x=s, axes=[-1], keep_dims=True))
        e = mb.exp(x=s, name="e")
        return mb.real_div(x=e, y=mb.reduce_sum(x=e, axes=[-1], keep_dims=True))

    return prog


def test_lint_flags_inf_mask_in_saved_package(tmp_path):
    findings = lint(_save(_attn_program(-np.inf), tmp_path))
    assert [f.code for f in findings] == ["nonfinite-constant"]
    assert "-inf" in findings[0].message and findings[0].op_type == "const" and findings[0].function == "main"
    assert "add" in findings[0].message


def test_lint_safe_program_is_clean(tmp_path):
    assert lint(_save(_attn_program(-1e4), tmp_path)) == []
    assert lint(_attn_program(-1e4, manual_softmax=True, shifted=True)) == []


def test_lint_manual_softmax_unshifted():
    (f,) = lint(_attn_program(-1e4, manual_softmax=True, shifted=False))
    assert (f.code, f.op_name, f.op_type) == ("fp16-exp-unshifted", "e", "exp")


def test_lint_near_fp16_limit_and_fp32_min_and_fill():
    (f,) = lint(_attn_program(-65504.0))
    assert f.code == "fp16-range-constant"
    big = np.full((4,), np.finfo(np.float32).min, np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(4,), dtype=types.fp32)], opset_version=IOS18)
    def prog(x):
        y = mb.add(x=x, y=big)
        return mb.add(x=y, y=mb.fill(shape=np.array([4], np.int32), value=-np.inf, name="neg_fill"))

    codes = {(f.code, f.op_type) for f in lint(prog)}
    assert ("fp16-range-constant", "const") in codes and ("inf-fill", "fill") in codes


@pytest.mark.parametrize("variant,flagged", [("pow", True), ("mul", True), ("rss", True), ("scaled", False), ("fp32", False)])
def test_lint_rmsnorm_square(variant, flagged):
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 8), dtype=types.fp16)], opset_version=IOS18)
    def prog(x):
        if variant == "fp32":
            x32 = mb.cast(x=x, dtype="fp32")
            ms = mb.reduce_mean(x=mb.mul(x=x32, y=x32), axes=[-1], keep_dims=True)
            return mb.cast(x=mb.mul(x=x32, y=mb.rsqrt(x=ms)), dtype="fp16")
        if variant == "scaled":
            x = mb.mul(x=x, y=np.float16(1 / 64))
        if variant == "rss":
            ms = mb.reduce_sum_square(x=x, axes=[-1], keep_dims=True)
        elif variant == "pow":
            ms = mb.reduce_mean(x=mb.pow(x=x, y=np.float16(2)), axes=[-1], keep_dims=True)
        else:
            ms = mb.reduce_mean(x=mb.mul(x=x, y=x), axes=[-1], keep_dims=True)
        return mb.mul(x=x, y=mb.rsqrt(x=ms))

    findings = lint(prog)
    assert [f.code for f in findings] == (["fp16-square-unscaled"] if flagged else [])
    if flagged:
        assert findings[0].op_type in {"pow", "mul", "reduce_sum_square"} and "scal" in findings[0].message
