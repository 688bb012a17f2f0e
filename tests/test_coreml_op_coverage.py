"""Evaluator coverage: every MIL op our Core ML exports emit has its own numpy unit test.

``OP_CASES`` holds one single-op program per case (iOS 18 opset, small random fp16/fp32/int32/bool
inputs in the dtypes the exports use). Each is saved to an ``.mlpackage`` (no coremltools passes),
read back and run by the numpy :class:`~mlx_zeta.converters.coreml.evaluate.Evaluator`, then
compared with an independent reference: a numpy formula or MLX (the semantics the lowering must
keep: ``AsType`` -> ``cast``, ``Round`` -> ``round``, ``Remainder`` -> ``mod``), never coremltools.

The guards: (1) the families of tests/test_coreml_families.py and tests/test_coreml_stateful.py
are exported at small sizes and every op type in the saved packages (all functions, ops added by
coremltools' passes included, ``const`` excluded) must be covered by ``OP_CASES`` or by the tests
of tests/test_coreml_evaluate.py named in ``TESTED_IN_EVALUATE``; (2) every ``mb.<op>`` the
emitters of ``converters/coreml`` can produce must be covered too. A new lowering that emits an
untested op fails here until it gets a case.
"""

import re
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")

from mlx_zeta.converters.coreml.evaluate import Evaluator, load_program  # noqa: E402  (before mlx: BLAS)

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from test_coreml_evaluate import _save  # noqa: E402

IOS18 = ct.target.iOS18
RNG = np.random.default_rng(0)
TESTS = Path(__file__).parent

# Ops unit-tested in tests/test_coreml_evaluate.py against MLX or hand-computed values (op -> its tests).
TESTED_IN_EVALUATE = {
    "conv": ("test_conv2d_vs_mlx", "test_conv1d_vs_mlx", "test_conv_fp16_output_dtype"),
    "conv_transpose": ("test_conv_transpose2d_vs_mlx", "test_conv_transpose_groups_dilation_valid"),
    "max_pool": ("test_pool2d", "test_max_pool_vs_mlx_valid"),
    "avg_pool": ("test_pool2d",),
    "silu": ("test_silu_fp16",),
    "upsample_bilinear": ("test_upsample_bilinear", "test_upsample_bilinear_align_false_scale6"),
    "upsample_nearest_neighbor": ("test_upsample_nearest",),
    "batch_norm": ("test_batch_norm",),
    "instance_norm": ("test_instance_norm_vs_mlx",),
    "layer_norm": ("test_layer_norm_vs_mlx",),
    "scaled_dot_product_attention": ("test_sdpa_vs_mlx",),
    "constexpr_lut_to_dense": ("test_lut_to_dense_uint2", "test_lut_to_dense_vector"),
    "constexpr_blockwise_shift_scale": ("test_blockwise_shift_scale",),
    "constexpr_affine_dequantize": ("test_affine_dequantize_ios17",),
    "constexpr_cast": ("test_constexpr_cast",),
    "read_state": ("test_stateful_decode_steps",),
    "coreml_update_state": ("test_stateful_decode_steps",),
}


# ----------------------------------------------------------------------------- inputs
def h(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float16)


def f(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def i(lo, hi, *shape):
    return RNG.integers(lo, hi, shape).astype(np.int32)


def b(*shape):
    return RNG.random(shape) < 0.5


def pos(*shape, dtype=np.float32):
    """Strictly positive values (sqrt, rsqrt, log, pow, divisors)."""
    return (RNG.random(shape) * 2 + 0.25).astype(dtype)


def f32(a):
    return np.asarray(a, np.float32)


def via_mlx(fn, dtype=None):
    """Reference through MLX: ``fn`` of mx arrays (fp16 inputs computed in float32), result in
    ``dtype`` (default: the first input's)."""
    def ref(*xs):
        out = np.array(fn(*[mx.array(f32(x) if x.dtype == np.float16 else x) for x in xs]))
        return out.astype(dtype or xs[0].dtype)
    return ref


def in_f32(fn):
    """Reference computed in float32 from the inputs, rounded once to the first input's dtype."""
    return lambda *xs: np.asarray(fn(*[f32(x) if x.dtype.kind == "f" else x for x in xs])).astype(xs[0].dtype)


# ----------------------------------------------------------------------------- the table
class Case(NamedTuple):
    op: str
    build: Callable  # MIL builder function; its parameters are the program inputs
    inputs: Sequence[np.ndarray]
    ref: Callable  # reference on the same inputs -> array (or tuple for several outputs), expected dtype
    tol: Optional[float] = None  # rtol = atol; None: 2e-3 for fp16 results, 1e-5 for fp32, exact otherwise
    id: str = ""


def _gather_nd_ref(x, idx):
    out = np.empty(idx.shape[:-1] + x.shape[idx.shape[-1]:], x.dtype)
    for p in np.ndindex(*idx.shape[:-1]):
        out[p] = x[tuple(int(k) for k in idx[p])]
    return out


def _slice_update_ref(x, u, begin, end):
    y = x.copy()
    y[tuple(slice(s, e) for s, e in zip(begin, end))] = u
    return y


W, BIAS = h(5, 8, scale=0.5), h(5)
HALVES = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.49, -0.51], np.float16)
INT_ROWS = np.array([3, 0, -2, 0, 7, 1], np.int32).reshape(1, 6)

# Emitted by the exports of tests/test_coreml_families.py and tests/test_coreml_stateful.py.
EMITTED_CASES = [
    Case("abs", lambda x: mb.abs(x=x), [h(2, 3, 4)], np.abs),
    Case("add", lambda x, y: mb.add(x=x, y=y), [h(2, 3, 4), h(4)], np.add, id="fp16-broadcast"),
    Case("add", lambda x: mb.add(x=x, y=np.int32([1, 2, 8, 4])), [i(0, 5, 4)], lambda x: x + np.int32([1, 2, 8, 4]),
         id="int32"),
    Case("cast", lambda x: mb.cast(x=x, dtype="fp32"), [h(3, 4)], f32, id="fp16-fp32"),
    Case("cast", lambda x: mb.cast(x=x, dtype="fp16"), [np.array([1e5, -7e4, 1 / 3, 65504, 6e-8], np.float32)],
         via_mlx(lambda x: x.astype(mx.float16), np.float16), tol=0, id="fp32-fp16-overflow"),
    Case("cast", lambda x: mb.cast(x=x, dtype="int32"), [h(3, 4, scale=4)], via_mlx(lambda x: x.astype(mx.int32),
                                                                                     np.int32), id="fp16-int32"),
    Case("cast", lambda x: mb.cast(x=x, dtype="fp16"), [b(2, 5)], lambda x: x.astype(np.float16), id="bool-fp16"),
    Case("cast", lambda x: mb.cast(x=x, dtype="int32"), [b(2, 5)], lambda x: x.astype(np.int32), id="bool-int32"),
    Case("cast", lambda x: mb.cast(x=x, dtype="bool"), [i(-2, 3, 2, 5)], lambda x: x != 0, id="int32-bool"),
    Case("cast", lambda x: mb.cast(x=x, dtype="fp16"), [i(-9, 9, 2, 5)], lambda x: x.astype(np.float16),
         id="int32-fp16"),
    Case("concat", lambda x, y: mb.concat(values=[x, y], axis=1), [h(2, 3, 4), h(2, 1, 4)],
         lambda x, y: np.concatenate([x, y], 1), id="fp16"),
    Case("concat", lambda x, y: mb.concat(values=[x, y, np.zeros(1, np.int32)], axis=0), [i(0, 9, 1), i(0, 9, 2)],
         lambda x, y: np.concatenate([x, y, [0]]).astype(np.int32), id="int32"),
    Case("cos", lambda x: mb.cos(x=x), [h(4, 6, scale=3)], in_f32(np.cos)),
    Case("sin", lambda x: mb.sin(x=x), [h(4, 6, scale=3)], in_f32(np.sin)),
    Case("expand_dims", lambda x: mb.expand_dims(x=x, axes=[2]), [h(1, 3, 4)], lambda x: x[:, :, None]),
    Case("gather", lambda x, k: mb.gather(x=x, indices=k, axis=0), [h(10, 4), i(0, 10, 2, 3)], lambda x, k: x[k]),
    Case("gather_nd", lambda x, k: mb.gather_nd(x=x, indices=k),
         [h(1, 4, 5, 2), np.stack([i(0, 1, 1, 3, 3), i(0, 4, 1, 3, 3), i(0, 5, 1, 3, 3)], -1)], _gather_nd_ref),
    Case("gelu", lambda x: mb.gelu(x=x, mode="EXACT"), [h(2, 3, 8, scale=2)], via_mlx(nn.gelu)),
    Case("greater_equal", lambda x: mb.greater_equal(x=x, y=np.int32(0)), [i(-3, 3, 3, 8)], lambda x: x >= 0),
    Case("less_equal", lambda x, y: mb.less_equal(x=x, y=y), [i(0, 4, 8, 6), i(0, 4, 8, 6)], np.less_equal),
    Case("not_equal", lambda x: mb.not_equal(x=x, y=np.zeros((1, 6), np.int32)), [INT_ROWS], lambda x: x != 0),
    Case("identity", lambda x: mb.identity(x=x), [f(1, 6)], lambda x: x),
    Case("linear", lambda x: mb.linear(x=x, weight=W, bias=BIAS), [h(3, 8)],
         lambda x: (f32(x) @ f32(W).T + f32(BIAS)).astype(np.float16), tol=1e-2),
    Case("logical_not", lambda x: mb.logical_not(x=x), [b(3, 1, 4)], np.logical_not),
    Case("logical_or", lambda x, y: mb.logical_or(x=x, y=y), [b(2, 6), b(2, 6)], np.logical_or),
    Case("matmul", lambda x, y: mb.matmul(x=x, y=y, transpose_y=True), [h(2, 3, 8), h(2, 5, 8)],
         in_f32(lambda x, y: x @ y.swapaxes(-1, -2)), tol=1e-2),
    Case("maximum", lambda x: mb.maximum(x=x, y=np.float16(0)), [h(2, 3, 4)], lambda x: np.maximum(x, 0),
         id="fp16-relu"),
    Case("maximum", lambda x, y: mb.maximum(x=x, y=y), [f(3, 4), f(4)], np.maximum, id="fp32"),
    Case("minimum", lambda x: mb.minimum(x=x, y=np.float16(0.5)), [h(2, 3, 4)], lambda x: np.minimum(x, 0.5)),
    Case("mul", lambda x, y: mb.mul(x=x, y=y), [h(2, 3, 4), h(4)], in_f32(np.multiply), id="fp16-broadcast"),
    Case("mul", lambda x: mb.mul(x=x, y=np.float32(-1)), [f(3, 4)], np.negative, id="fp32-scalar"),
    Case("real_div", lambda x, y: mb.real_div(x=x, y=y), [h(3, 4), pos(3, 4, dtype=np.float16)], in_f32(np.divide),
         id="fp16"),
    Case("real_div", lambda y: mb.real_div(x=np.float16(127), y=y), [pos(1, 3, 1, dtype=np.float16)],
         in_f32(lambda y: 127 / y), id="fp16-scalar-numerator"),
    Case("real_div", lambda x, y: mb.real_div(x=x, y=y), [f(2, 6), pos(2, 1)], np.divide, id="fp32"),
    Case("reduce_max", lambda x: mb.reduce_max(x=x, axes=[2], keep_dims=True), [h(1, 3, 7)],
         lambda x: x.max(2, keepdims=True), id="fp16"),
    Case("reduce_max", lambda x: mb.reduce_max(x=x, axes=[3], keep_dims=True), [i(0, 2, 3, 1, 1, 8)],
         lambda x: x.max(3, keepdims=True), id="int32"),
    Case("reduce_mean", lambda x: mb.reduce_mean(x=x, axes=[2], keep_dims=True), [f(2, 5, 32)],
         lambda x: x.mean(2, keepdims=True)),
    Case("reduce_sum", lambda x: mb.reduce_sum(x=x, axes=[1], keep_dims=True), [f(2, 6, 16)],
         lambda x: x.sum(1, keepdims=True)),
    Case("reshape", lambda x: mb.reshape(x=x, shape=[2, 1, 12]), [h(2, 3, 4)], lambda x: x.reshape(2, 1, 12),
         id="fp16"),
    Case("reshape", lambda x: mb.reshape(x=x, shape=[1, 1, 1, 6]), [b(1, 6)], lambda x: x.reshape(1, 1, 1, 6),
         id="bool"),
    Case("round", lambda x: mb.round(x=x), [np.concatenate([HALVES, h(8, scale=4)])], via_mlx(mx.round)),
    Case("rsqrt", lambda x: mb.rsqrt(x=x, epsilon=np.float32(0)), [pos(3, 5, 1)], lambda x: 1 / np.sqrt(x),
         id="eps0"),
    Case("rsqrt", lambda x: mb.rsqrt(x=x, epsilon=np.float32(0.5)), [pos(3, 5, 1)], lambda x: 1 / np.sqrt(x + 0.5),
         id="eps-inside-sqrt"),
    Case("select", lambda c, x, y: mb.select(cond=c, a=x, b=y), [b(1, 4, 8), h(1, 4, 8), h(1, 4, 8)], np.where,
         id="fp16"),
    Case("select", lambda c, x, y: mb.select(cond=c, a=x, b=y), [b(1, 6), i(0, 9, 1, 6), i(0, 9, 1, 6)], np.where,
         id="int32"),
    Case("slice_by_index", lambda x: mb.slice_by_index(x=x, begin=[0, 1, 0], end=[2, 4, 6], stride=[1, 1, 2]),
         [h(2, 5, 6)], lambda x: x[0:2, 1:4, 0:6:2]),
    Case("slice_update", lambda x, u, s, e: mb.slice_update(x=x, update=u, begin=s, end=e),
         [h(1, 2, 6, 4), h(1, 2, 2, 4), np.array([0, 0, 3, 0], np.int32), np.array([1, 2, 5, 4], np.int32)],
         _slice_update_ref),
    Case("split", lambda x: mb.split(x=x, split_sizes=[2, 3], axis=2), [h(1, 2, 5)],
         lambda x: (x[..., :2], x[..., 2:])),
    Case("sqrt", lambda x: mb.sqrt(x=x), [pos(2, 6)], np.sqrt),
    Case("squeeze", lambda x: mb.squeeze(x=x, axes=[-3]), [h(1, 2, 1, 3, 4)], lambda x: x[:, :, 0]),
    Case("sub", lambda x, y: mb.sub(x=x, y=y), [f(2, 5, 8), f(2, 5, 1)], np.subtract),
    Case("tile", lambda x: mb.tile(x=x, reps=[1, 3, 2]), [h(2, 1, 3)], lambda x: np.tile(x, (1, 3, 2)), id="fp16"),
    Case("tile", lambda x: mb.tile(x=x, reps=[1, 4, 6, 1]), [b(1, 1, 1, 5)], lambda x: np.tile(x, (1, 4, 6, 1)),
         id="bool"),
    Case("transpose", lambda x: mb.transpose(x=x, perm=[0, 3, 1, 2]), [h(1, 3, 4, 2)],
         lambda x: x.transpose(0, 3, 1, 2)),
]

# Not emitted by the families today, but within reach of the emitters in converters/coreml/ops.py.
EMITTER_CASES = [
    Case("exp", lambda x: mb.exp(x=x), [h(3, 4)], in_f32(np.exp)),
    Case("log", lambda x: mb.log(x=x), [pos(3, 4, dtype=np.float16)], in_f32(np.log)),
    Case("tanh", lambda x: mb.tanh(x=x), [h(3, 4, scale=2)], in_f32(np.tanh)),
    Case("tan", lambda x: mb.tan(x=x), [f(3, 4, scale=0.5)], np.tan),
    Case("erf", lambda x: mb.erf(x=x), [h(3, 4)], via_mlx(mx.erf)),
    Case("sigmoid", lambda x: mb.sigmoid(x=x), [h(3, 4, scale=3)], in_f32(lambda x: 1 / (1 + np.exp(-x)))),
    Case("floor", lambda x: mb.floor(x=x), [np.concatenate([HALVES, h(6, scale=3)])], np.floor),
    Case("ceil", lambda x: mb.ceil(x=x), [np.concatenate([HALVES, h(6, scale=3)])], np.ceil),
    Case("sign", lambda x: mb.sign(x=x), [np.concatenate([h(6), np.zeros(2, np.float16)])], np.sign),
    Case("pow", lambda x, y: mb.pow(x=x, y=y), [pos(3, 4), f(3, 4)], np.power),
    Case("mod", lambda x, y: mb.mod(x=x, y=y), [f(3, 4, scale=5), np.array([2.5, -2.5, 1.5, -0.75], np.float32)],
         via_mlx(mx.remainder)),
    Case("equal", lambda x, y: mb.equal(x=x, y=y), [i(0, 3, 3, 4), i(0, 3, 3, 4)], np.equal),
    Case("less", lambda x, y: mb.less(x=x, y=y), [h(3, 4), h(3, 4)], np.less),
    Case("greater", lambda x, y: mb.greater(x=x, y=y), [f(3, 4), f(4)], np.greater),
    Case("logical_and", lambda x, y: mb.logical_and(x=x, y=y), [b(2, 6), b(2, 6)], np.logical_and),
    Case("logical_xor", lambda x, y: mb.logical_xor(x=x, y=y), [b(2, 6), b(2, 6)], np.logical_xor),
    Case("reduce_min", lambda x: mb.reduce_min(x=x, axes=[1], keep_dims=True), [i(-5, 5, 2, 6)],
         lambda x: x.min(1, keepdims=True)),
    Case("reduce_prod", lambda x: mb.reduce_prod(x=x, axes=[0, 2], keep_dims=True), [pos(2, 3, 4)],
         lambda x: x.prod((0, 2), keepdims=True)),
    Case("softmax", lambda x: mb.softmax(x=x, axis=-1), [h(2, 3, 7, scale=3)], via_mlx(lambda x: mx.softmax(x, -1))),
    Case("pad", lambda x: mb.pad(x=x, pad=[0, 0, 1, 2, 0, 1], mode="constant", constant_val=np.float16(-3)),
         [h(2, 3, 4)], lambda x: np.pad(x, [(0, 0), (1, 2), (0, 1)], constant_values=-3)),
    Case("reverse", lambda x: mb.reverse(x=x, axes=[1, 2]), [h(2, 3, 4)], lambda x: x[:, ::-1, ::-1]),
    Case("stack", lambda x, y: mb.stack(values=[x, y], axis=-1), [i(0, 9, 2, 3), i(0, 9, 2, 3)],
         lambda x, y: np.stack([x, y], -1)),
]

OP_CASES = EMITTED_CASES + EMITTER_CASES
COVERED = {c.op for c in OP_CASES} | set(TESTED_IN_EVALUATE)


# ----------------------------------------------------------------------------- per-op tests
_MIL_DTYPES = {np.dtype(np.float16): types.fp16, np.dtype(np.float32): types.fp32, np.dtype(np.int32): types.int32,
               np.dtype(np.bool_): types.bool}


def run_case(case, tmp_path):
    """Save the case's program (no passes), read it back, check the op survived, evaluate it.
    Bool inputs/outputs become fp32 features in a saved package (coremltools adds the casts)."""
    specs = [mb.TensorSpec(shape=a.shape, dtype=_MIL_DTYPES[a.dtype]) for a in case.inputs]
    path = _save(mb.program(input_specs=specs, opset_version=IOS18)(case.build), tmp_path)
    ev = Evaluator(path)
    assert case.op in {op.op_type for op in ev.function.operations}
    feeds = {n: a.astype(types.nptype_from_builtin(v.dtype)) for (n, v), a in zip(ev.input_vars.items(), case.inputs)}
    out = ev(feeds)
    return [out[n] for n in ev.output_names]


@pytest.mark.parametrize("case", OP_CASES, ids=[f"{c.op}-{c.id}" if c.id else c.op for c in OP_CASES])
def test_op_matches_reference(case, tmp_path):
    got = run_case(case, tmp_path)
    refs = case.ref(*case.inputs)
    refs = [np.asarray(r) for r in (refs if isinstance(refs, tuple) else (refs,))]
    assert len(got) == len(refs)
    for g, r in zip(got, refs):
        assert g.shape == r.shape
        if r.dtype == np.bool_:  # a bool output is cast to fp32 by the converter
            np.testing.assert_array_equal(g, r.astype(g.dtype))
            continue
        assert g.dtype == r.dtype
        tol = case.tol if case.tol is not None else {"f2": 2e-3, "f4": 1e-5}.get(f"{r.dtype.kind}{r.dtype.itemsize}", 0)
        if tol:
            np.testing.assert_allclose(g.astype(np.float64), r.astype(np.float64), rtol=tol, atol=tol)
        else:
            np.testing.assert_array_equal(g, r)


def test_tested_in_evaluate_names_real_tests():
    source = (TESTS / "test_coreml_evaluate.py").read_text()
    for op, names in TESTED_IN_EVALUATE.items():
        for name in names:
            assert f"def {name}(" in source, f"{op}: tests/test_coreml_evaluate.py has no {name}"
        assert op in source, f"{op} is not used in tests/test_coreml_evaluate.py"


# ----------------------------------------------------------------------------- guards
def family_packages(root):
    """Export every family of the end-to-end tests at small sizes; yields (name, package path)."""
    from test_coreml_families import bert_hidden, padded_batch, ternary_lm, tiny_bert, tiny_vit

    from mlx_zeta.converters.coreml import export_coreml, export_decoder
    from mlx_zeta.nn.unet import Unet
    from mlx_zeta.structs import Decoder, Transformer

    bert = tiny_bert()
    mx.eval(bert.parameters())
    yield "bert", export_coreml(bert_hidden(bert), padded_batch(), root / "bert.mlpackage",
                                input_names=["input_ids", "attention_mask"])
    yield "bert-embed", export_coreml(lambda ids, mask: bert.embed(ids, mask), padded_batch(),
                                      root / "embed.mlpackage", input_names=["input_ids", "attention_mask"])
    vit = tiny_vit()
    yield "vit", export_coreml(vit, (mx.random.uniform(shape=(2, 16, 16, 3)),), root / "vit.mlpackage")
    yield "vit-image", export_coreml(vit, (mx.random.uniform(shape=(1, 16, 16, 3)),), root / "vit_image.mlpackage",
                                     image_input={"scale": 1 / 255, "bias": [0.0] * 3, "color_layout": "RGB"})
    for bilinear in (False, True):
        unet = Unet(3, 2, bilinear=bilinear, base_channels=4)
        unet.eval()
        yield f"unet-{'bilinear' if bilinear else 'transposed'}", export_coreml(
            unet, (mx.random.normal((1, 16, 16, 3)),), root / f"unet{bilinear}.mlpackage")
    for activation in ("int8", "float"):
        lm, _ = ternary_lm(activation)
        yield f"ternary-{activation}", export_coreml(lm, (mx.array([[3, 1, 4, 1, 5, 9, 2, 6]]),),
                                                     root / f"ternary_{activation}.mlpackage")
    for name, kw in (("decoder-rotary-gqa", dict(attn_kv_heads=2, rotary_pos_emb=True, use_rmsnorm=True,
                                                 ff_glu=True, ff_swish=True)), ("decoder", {})):
        mx.random.seed(0)
        lm = Transformer(num_tokens=64, max_seq_len=64, attn_layers=Decoder(dim=32, depth=1, heads=4, **kw))
        yield name, export_decoder(lm, root / f"{name}.mlpackage", capacity=16, prefill_lens=4)


def emitted_op_types(package):
    return {op.op_type for func in load_program(package).functions.values() for op in func.operations
            if op.op_type != "const"}


def test_every_exported_op_is_covered(tmp_path):
    emitted = {}
    for name, package in family_packages(tmp_path):
        for op in emitted_op_types(package):
            emitted.setdefault(op, []).append(name)
    print(f"\nemitted op types ({len(emitted)}): {sorted(emitted)}")
    missing = {op: where for op, where in emitted.items() if op not in COVERED}
    assert not missing, f"ops emitted without a unit test (add an OP_CASES entry): {missing}"
    # the families still exercise what they are known to (a silently narrowed export shows here)
    assert {"conv", "max_pool", "gather_nd", "constexpr_lut_to_dense", "read_state", "coreml_update_state",
            "slice_update", "scaled_dot_product_attention", "linear", "gelu", "silu"} <= set(emitted)


def test_every_emitter_op_is_covered():
    """Every MIL op the lowering code can emit (``mb.<op>`` in converters/coreml, plus the unary and
    binary tables of ops.py, which call ``getattr(mb, name)``) has a test."""
    from mlx_zeta.converters.coreml import compress, graph, lower, ops

    names = set(ops.BINARY.values()) | set(ops.UNARY.values())
    for module in (ops, lower, graph, compress):  # graph: the Context's consts and casts; compress: constexpr ops
        names |= set(re.findall(r"\bmb\.([a-z_0-9]+)\b", Path(module.__file__).read_text()))
        names |= set(re.findall(r'"(logical_[a-z]+)"', Path(module.__file__).read_text()))
    names -= {"const"}
    assert names - COVERED == set()
