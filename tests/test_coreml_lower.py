"""Core ML lowering (mlx_zeta.converters.coreml) checked without a Mac: the lowered MIL program is
evaluated in numpy by :func:`mlx_zeta.converters.coreml.evaluate.evaluate` (coremltools' own
``value_inference`` per op, numpy for the ops it lacks) and compared with MLX on the same inputs."""

import warnings
from collections import Counter

import numpy as np
import pytest

import mlx_zeta  # noqa: F401  (before mlx.core: fast BLAS)
import mlx.core as mx

ct = pytest.importorskip("coremltools")

from mlx_zeta.converters.coreml import LoweringError, export_coreml, lower, to_mil  # noqa: E402
from mlx_zeta.converters.coreml.evaluate import evaluate  # noqa: E402
from mlx_zeta.structs import Decoder, Transformer  # noqa: E402

FP16_RTOL_OF_MAX = 1e-2  # fp16 activations through a few layers, relative to the largest |reference|
FP32_ATOL = 1e-5


def compare(model, args, precision="float16", **kw):
    """(max abs error, max error / max |reference|, program, stats) of the lowered model vs MLX."""
    ref = np.array(model(*args).astype(mx.float32))
    prog, stats = to_mil(model, args, precision=precision, return_stats=True, **kw)
    feeds = {f"input_{i}": np.array(a) for i, a in enumerate(args)}
    out = evaluate(prog, feeds)["output_0"]
    assert out.shape == ref.shape
    err = float(np.abs(out.astype(np.float64) - ref).max())
    return err, err / float(np.abs(ref).max()), prog, stats


def op_counts(prog) -> Counter:
    return Counter(op.op_type for op in prog.functions["main"].operations)


def float_consts(prog):
    for op in prog.functions["main"].operations:
        if op.op_type == "const" and op.outputs[0].val is not None:
            val = np.asarray(op.outputs[0].val)
            if val.dtype.kind == "f":
                yield val


def tiny_decoder(depth=2):
    mx.random.seed(0)
    return Transformer(num_tokens=64, max_seq_len=32, attn_layers=Decoder(
        dim=32, depth=depth, heads=4, attn_kv_heads=2, rotary_pos_emb=True, use_rmsnorm=True, ff_glu=True,
        ff_swish=True))


TOKENS = mx.array([[3, 1, 4, 1, 5, 9, 2, 6, 5]])


# ----------------------------------------------------------------------------- tests
def test_decoder_logits_fp16_and_fp32_and_attention_fused():
    model = tiny_decoder()
    err16, rel16, prog16, stats = compare(model, (TOKENS,))
    err32, _, prog32, _ = compare(model, (TOKENS,), precision="float32")
    print(f"decoder fp16 max abs {err16:.2e} rel-of-max {rel16:.2e}; fp32 max abs {err32:.2e}")
    assert rel16 < FP16_RTOL_OF_MAX and err32 < FP32_ATOL
    ops = op_counts(prog16)
    assert stats["fused_attention"] == 2 and ops["scaled_dot_product_attention"] == 2
    assert ops["softmax"] == 0  # every softmax went into the fused op
    # statistics in fp32: the RMSNorm sums are fp32 reduce_sum ops in the fp16 program
    sums = [op for op in prog16.functions["main"].operations if op.op_type == "reduce_sum"]
    assert sums and all(op.outputs[0].dtype == ct.converters.mil.mil.types.fp32 for op in sums)


def test_fp16_norm_statistics_do_not_overflow():
    """Activations of ~300: sum(x^2) over 32 features is ~3e6, past fp16's 65504; the fp32 reductions keep it."""
    model = tiny_decoder(depth=1)
    model.token_emb.weight = model.token_emb.weight * 300
    _, rel, _, _ = compare(model, (TOKENS,))
    assert rel < FP16_RTOL_OF_MAX


def test_no_infinite_or_float32_min_consts_in_fp16_program():
    model = tiny_decoder(depth=1)
    prog = to_mil(model, (TOKENS,))
    vals = list(float_consts(prog))
    assert vals and all(np.isfinite(v).all() and (v >= lower.MASK_FILL).all() for v in vals if v.dtype == np.float16)
    # the causal fill is finite in every const, fp32 islands included (mask fills become MASK_FILL)
    assert not any((v <= -lower.MASK_CLAMP).any() for v in vals)
    # and after coremltools' own passes (constant folding of the mask and rotary subgraphs)
    optimized = ct.convert(to_mil(model, (TOKENS,)), convert_to="milinternal",
                           minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT32)
    for v in float_consts(optimized):
        assert np.isfinite(v).all() and not (v <= -lower.MASK_CLAMP).any()


def test_bert_tiny_hidden_states(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    from hf_tiny import lift_init, save_hf, seeded

    seeded(0)
    hf = transformers.BertModel(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=50,
        max_position_embeddings=16, type_vocab_size=2)).eval()
    lift_init(hf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = mlx_zeta.from_pretrained(save_hf(hf, tmp_path / "bert"), dtype="float32")
    ids = mx.array([[5, 7, 9, 11, 13, 0, 0]])
    mask = mx.array([[1, 1, 1, 1, 1, 0, 0]])
    types = mx.array([[0, 0, 0, 1, 1, 1, 1]])
    err, rel, prog, stats = compare(model, (ids, mask, types))
    print(f"bert fp16 max abs {err:.2e} rel-of-max {rel:.2e}")
    assert rel < FP16_RTOL_OF_MAX
    assert stats["fused_attention"] == 2 and op_counts(prog)["erf"] == 2


def test_vit_patch_conv():
    from mlx_zeta.converters import vit

    mx.random.seed(1)
    model = vit.build(vit.ModelArgs(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                            intermediate_size=48, image_size=16, patch_size=8))
    err, rel, prog, _ = compare(model, (mx.random.normal((1, 16, 16, 3)),))
    print(f"vit fp16 max abs {err:.2e} rel-of-max {rel:.2e}")
    assert rel < FP16_RTOL_OF_MAX and op_counts(prog)["conv"] == 1


@pytest.mark.parametrize("bilinear", [False, True])
def test_unet_transposed_conv_and_bilinear(bilinear):
    from mlx_zeta.nn.unet import Unet

    mx.random.seed(2)
    model = Unet(3, 2, bilinear=bilinear, base_channels=4)
    model.eval()
    err, rel, _, _ = compare(model, (mx.random.normal((1, 16, 16, 3)),), precision="float32")
    assert err < 1e-4, err


def _ternary_model(activation="int8", in_features=256, out_features=128):
    from mlx_zeta.quant import BitLinear, TernaryLinear

    mx.random.seed(3)
    return TernaryLinear.from_bitlinear(BitLinear(in_features, out_features), activation=activation)


@pytest.mark.parametrize("activation", ["int8", "float"])
def test_ternary_lut_decodes_exactly_and_matches(activation):
    from mlx_zeta.kernels.packing import unpack_2bit

    layer = _ternary_model(activation)
    x = (mx.random.normal((4, 256)),)
    err, rel, prog, _ = compare(layer, x)
    assert rel < FP16_RTOL_OF_MAX
    luts = [op for op in prog.functions["main"].operations if op.op_type == "constexpr_lut_to_dense"]
    assert len(luts) == 1 and luts[0].indices.dtype == ct.converters.mil.mil.types.uint2
    t = np.array(unpack_2bit(layer.packed, layer.out_features)).astype(np.float32)
    s = np.float32(1.0 / layer.weight_scale.item())  # "divide": the trained matrix is T / sigma
    decoded = luts[0].materialized_val_inference()
    assert decoded.dtype == np.float16
    np.testing.assert_array_equal(decoded, (t * np.float16(s)).astype(np.float16))  # exact, fp16 scale
    prog32 = to_mil(layer, x, precision="float32")
    lut32 = next(op for op in prog32.functions["main"].operations if op.op_type == "constexpr_lut_to_dense")
    np.testing.assert_array_equal(lut32.materialized_val_inference(), t * s)  # exact in fp32


def _weight_bytes(package):
    return sum(f.stat().st_size for f in (package / "Data").rglob("weight.bin"))


def test_ternary_package_weight_bytes_at_most_a_seventh(tmp_path):
    layer = _ternary_model(in_features=512, out_features=256)  # whole files: ~2 KiB of other blobs too
    x = (mx.random.normal((2, 512)),)
    lut = export_coreml(layer, x, tmp_path / "lut.mlpackage")
    dense = export_coreml(layer, x, tmp_path / "dense.mlpackage", compress="ternary-dense")
    assert lut.is_dir() and dense.is_dir()
    print(f"ternary weight.bin {_weight_bytes(lut)} B vs fp16 {_weight_bytes(dense)} B")
    assert _weight_bytes(lut) > 0  # no weight.bin found must not pass as 0 * 7 <= 0
    assert _weight_bytes(lut) * 7 <= _weight_bytes(dense)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.mlpackage", "lut.mlpackage"]  # no temp left


def test_broadcast_constants_are_not_stored_at_activation_size(tmp_path):
    """A Linear's bias (AddMM), a compared Arange and a Select fill are broadcast by MLX to the
    activation's (T, 64); in the saved package each stays its own size (coremltools would fold
    a broadcast into a T x 64 weight, per function of a multifunction package) and the values hold."""
    import mlx.nn as nn

    from mlx_zeta.converters.coreml.evaluate import load_program

    mx.random.seed(0)
    lin = nn.Linear(16, 64)
    mx.eval(lin.parameters())

    def fn(x):  # x (32, 16) -> (32, 64)
        y = lin(x)
        return mx.where(y >= mx.arange(64).astype(mx.float32) / 64, y, -5.0)

    x = mx.random.normal((32, 16))
    path = export_coreml(fn, (x,), tmp_path / "b.mlpackage", precision="float32")
    ops = load_program(path).functions["main"].operations
    sizes = {op.outputs[0].name: np.asarray(op.outputs[0].val).size for op in ops
             if op.op_type == "const" and op.outputs[0].val is not None}
    assert max(sizes.values()) <= 16 * 64, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]  # the weight
    np.testing.assert_allclose(evaluate(path, {"input_0": np.array(x)})["output_0"], np.array(fn(x)),
                               rtol=1e-5, atol=1e-5)


def test_broken_transpose_emitter_is_caught(monkeypatch):
    """Transposes that keep the shape (heads == tokens) become no-ops: the numbers must notice."""
    model = tiny_decoder(depth=1)
    tokens = mx.array([[3, 1, 4, 1]])  # 4 tokens, 4 heads: (1, 4, 4, 8) -> (1, 4, 4, 8)
    good = lower.EMITTERS["Transpose"]

    def broken(ctx, node):
        if tuple(node.in_shapes[0]) == tuple(node.out_shapes[0]):
            return ctx.get(node.inputs[0])
        return good(ctx, node)

    _, rel_ok, _, _ = compare(model, (tokens,))
    monkeypatch.setitem(lower.EMITTERS, "Transpose", broken)
    _, rel_bad, _, _ = compare(model, (tokens,))
    assert rel_ok < FP16_RTOL_OF_MAX < rel_bad


def test_unknown_primitive_raises_clear_error(tmp_path):
    def running_total(x):
        return mx.cumsum(x, axis=-1)

    with pytest.raises(LoweringError, match=r"(?s)primitive.*Scan.*running_total") as info:
        export_coreml(running_total, (mx.ones((2, 3)),), tmp_path / "bad.mlpackage")
    assert isinstance(info.value, ValueError)
    assert list(tmp_path.iterdir()) == []  # nothing half-written
