"""Compressed Core ML weights (converters/coreml/compress.py, weights.py): the encoders against MLX's own
quantizer and hand-derived laws, the policy, the saved packages' ``constexpr_`` ops against coremltools'
``materialized_val_inference`` and our numpy decode, MLX-quantized models exported to weights that decode
to MLX's dequantized weights, and two planted packing bugs (swapped nibbles) caught."""

import struct

import numpy as np
import pytest

import mlx_zeta  # noqa: F401  (before mlx.core: fast BLAS)
import mlx.core as mx
import mlx.nn as nn

ct = pytest.importorskip("coremltools")

from mlx_zeta.converters import quantize  # noqa: E402
from mlx_zeta.converters.coreml import compress as C  # noqa: E402
from mlx_zeta.converters.coreml import export_coreml, package_summary, to_mil  # noqa: E402
from mlx_zeta.converters.coreml.evaluate import Evaluator, load_program  # noqa: E402
from mlx_zeta.structs import Decoder, Transformer  # noqa: E402

RNG = np.random.default_rng(0)
CONSTEXPR = ("constexpr_blockwise_shift_scale", "constexpr_lut_to_dense")


def weights(rows=64, cols=128, scale=0.02):
    return (RNG.standard_normal((rows, cols)) * scale).astype(np.float32)


def tiny_lm(dim=64, vocab=256, depth=2, seed=0):
    mx.random.seed(seed)
    model = Transformer(num_tokens=vocab, max_seq_len=64,
                        attn_layers=Decoder(dim=dim, depth=depth, heads=4, rotary_pos_emb=True))
    mx.eval(model.parameters())
    return model


def rel_error(got, ref):
    return float(np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max())


# ----------------------------------------------------------------------------- the encoders
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_mlx_affine_decodes_to_mlx_dequantize(bits, group_size):
    """Against MLX itself: ``mx.dequantize`` of the same arrays. Tables (2/3/5/6 bits) are exact; 4/8-bit
    shift-scale decodes within one float32 rounding in float32, one float16 rounding in float16."""
    w = weights(32, 256)
    wq, s, b = mx.quantize(mx.array(w), group_size=group_size, bits=bits)
    ref = np.array(mx.dequantize(wq, s, b, group_size=group_size, bits=bits))
    c = C.from_mlx_affine(np.array(wq), np.array(s), np.array(b), group_size, bits)
    assert c.data.shape == w.shape and c.data.max() < 2 ** bits
    if bits in (4, 8):
        assert c.kind == "shift_scale" and c.dtype == f"uint{bits}" and c.scale.shape == (32, 256 // group_size)
        assert C.affine_error(c, ref, np.float32)["max_ulps"] <= 2
        err16 = C.affine_error(c, ref, np.float16)
        assert err16["max_ulps"] <= 1 and err16["exact"] > 0.7
    else:
        assert c.kind == "lut"
        np.testing.assert_array_equal(c.decode(np.float32), ref)


def test_unpack_mlx_against_hand_packed_words():
    """Codes packed by hand, lowest bits first: 4-bit 0..7 in one word, 3-bit codes across a word boundary."""
    word = sum(v << (4 * i) for i, v in enumerate(range(8)))
    np.testing.assert_array_equal(C.unpack_mlx(np.array([[word]], np.uint32), 4)[0], np.arange(8))
    codes = RNG.integers(0, 8, size=32)
    stream = sum(int(v) << (3 * i) for i, v in enumerate(codes))  # 96 bits: three words
    words = np.array([[(stream >> (32 * k)) & 0xFFFFFFFF for k in range(3)]], np.uint32)
    np.testing.assert_array_equal(C.unpack_mlx(words, 3)[0], codes)


def test_zero_scale_group_decodes_to_its_bias():
    words = np.zeros((1, 8), np.uint32) + 0x76543210  # codes 0..7 repeated
    c = C.from_mlx_affine(words, np.array([[0.0, 0.5]]), np.array([[0.25, -1.0]]), 32, 4)
    dense = c.decode(np.float32)
    np.testing.assert_array_equal(dense[0, :32], 0.25)
    np.testing.assert_array_equal(dense[0, 32:], 0.5 * np.tile(np.arange(8), 4) - 1.0)


def test_int8_per_channel_is_symmetric_rounding():
    w = weights()
    c = C.compress_weight(w, "int8")
    scale = np.abs(w).max(axis=1, keepdims=True) / 127
    np.testing.assert_allclose(c.scale, scale, rtol=1e-7)
    assert c.offset is None and c.dtype == "int8" and np.abs(c.data).max() == 127
    assert np.all(np.abs(c.decode(np.float32) - w) <= scale / 2 * (1 + 1e-6))  # round to nearest


def test_int4_block_is_mlx_quantize():
    w = weights()
    for block in (32, 64):
        c = C.compress_weight(w, f"int4-block{block}")
        wq, s, b = mx.quantize(mx.array(w), group_size=block, bits=4)
        ref = np.array(mx.dequantize(wq, s, b, group_size=block, bits=4))
        assert c.scale.shape == (64, 128 // block)
        assert C.affine_error(c, ref, np.float32)["max_ulps"] <= 2
    assert C.compress_weight(weights(8, 48), "int4-block32") is None  # 48 inputs: not whole blocks, stays float


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_palettize_is_a_nearest_centroid_partition(bits):
    """k-means laws: every group of PALETTE_ROWS rows uses one table of 2**bits values, each weight takes
    its nearest table entry, and the error shrinks as the table grows."""
    w = weights(32, 64)
    c = C.compress_weight(w, f"palettize{bits}")
    assert c.lut.shape == (32 // C.PALETTE_ROWS, 1, 2 ** bits, 1) and c.dtype == f"uint{bits}"
    for g in range(c.lut.shape[0]):
        table = c.lut[g, 0, :, 0]
        block = w[g * C.PALETTE_ROWS:(g + 1) * C.PALETTE_ROWS]
        nearest = np.abs(block[..., None] - table).min(axis=-1)
        chosen = np.abs(block - table[c.data[g * C.PALETTE_ROWS:(g + 1) * C.PALETTE_ROWS]])
        np.testing.assert_allclose(chosen, nearest, atol=1e-7)
    if bits < 8:
        finer = C.compress_weight(w, f"palettize{bits + 1 if bits < 4 else 8}").decode()
        assert np.mean((finer - w) ** 2) < np.mean((c.decode() - w) ** 2)


def test_policy_resolution_and_bad_options():
    mode_of = C.policy({"*": "palettize4", "layers.0.*": "int8", "layers.0.attn.*": "none", "@head": "int4"})
    assert mode_of("layers.0.attn.to_q") == "none"  # the longest matching pattern wins
    assert mode_of("layers.0.ff.proj_in") == "int8"
    assert mode_of("to_logits", "head") == "int4-block32"  # a role key beats "*"
    assert mode_of("token_emb", "embedding") == "palettize4"
    assert C.policy("int4")("anything", "embedding") == "int4-block32"
    assert C.policy(None)("layers.0.attn.to_q") == "none"
    assert C.describe({"*": "int4", "@head": "int8"}) == "int4-block32; @head int8"
    for bad, says in (("int5", "expected compress to be one of"), ({"*": "int3"}, r"compress\['\*'\]"),
                      ({"@lm_head": "int8"}, "patterns or @embedding / @head"), (4, "got int")):
        with pytest.raises(ValueError, match=says):
            C.policy(bad)


# ----------------------------------------------------------------------------- lowered and saved
def constexpr_ops(program):
    return [op for f in program.functions.values() for op in f.operations if op.op_type in CONSTEXPR]


@pytest.mark.parametrize("mode", ["int8", "int4-block64", "palettize4"])
def test_saved_constexpr_ops_decode_three_ways(tmp_path, mode):
    """Each ``constexpr_`` op of a saved package: coremltools' ``materialized_val_inference`` == the
    Evaluator's numpy op == :meth:`Compressed.decode` of the weight it was made from; and the compressed
    package's logits stay near the float model's."""
    model, tokens = tiny_lm(), mx.array(RNG.integers(0, 256, (1, 8)), mx.int32)
    _, stats = to_mil(model, (tokens,), compress=mode, return_stats=True)
    assert stats["counts"]["policy"] == 2 * 6 + 2  # q, k, v, o, ff in, ff out per layer; embedding; head
    package = export_coreml(model, (tokens,), tmp_path / "m.mlpackage", compress=mode)
    ops = constexpr_ops(load_program(package))
    assert len(ops) == stats["counts"]["policy"]
    evaluator = Evaluator(package)
    out = evaluator({"input_0": np.array(tokens)})["output_0"]
    for op in ops:
        coreml = np.asarray(op.materialized_val_inference())
        np.testing.assert_array_equal(evaluator._decoded[op.name], coreml)
    # our decode of the same weights (the token embedding: the first 2-D weight of the model)
    emb = C.compress_weight(np.array(model.token_emb.weight), mode)
    emb_op = next(op for op in ops if op.outputs[0].shape == tuple(model.token_emb.weight.shape))
    np.testing.assert_array_equal(np.asarray(emb_op.materialized_val_inference()), emb.decode(np.float16))
    ref = np.array(model(tokens))
    assert rel_error(out, ref) < {"int8": 0.03}.get(mode, 0.3)


def test_int4_package_is_under_a_third_of_fp16(tmp_path):
    model, tokens = tiny_lm(dim=256, vocab=4096, depth=2), mx.zeros((1, 8), mx.int32)
    fp16 = package_summary(export_coreml(model, (tokens,), tmp_path / "fp16.mlpackage"))["bytes"]
    int4 = package_summary(export_coreml(model, (tokens,), tmp_path / "int4.mlpackage", compress="int4"))["bytes"]
    print(f"\nfp16 {fp16} B, int4-block32 {int4} B ({int4 / fp16:.3f}x)")
    assert int4 <= 0.3 * fp16


# ----------------------------------------------------------------------------- MLX-quantized models
def mlx_q(bits=4, group_size=32, dtype=mx.float32):
    model = tiny_lm()
    model.set_dtype(dtype)
    quantize(model, bits=bits, group_size=group_size)
    return model


def decoded_weights(package) -> dict:
    """Shape -> decoded weights of every constexpr op of the saved package (coremltools' decode)."""
    out = {}
    for op in constexpr_ops(load_program(package)):
        out.setdefault(tuple(op.outputs[0].shape), []).append(np.asarray(op.materialized_val_inference()))
    return out


def check_quantized_export(model, package, precision):
    """Every quantized layer's MLX-dequantized weight has a decoded twin in the package within one
    rounding of the package's dtype (float32: 2 ulps of the row's largest weight; float16: 1)."""
    dtype, ulps = (np.float32, 2.0) if precision == "float32" else (np.float16, 1.0)
    decoded = decoded_weights(package)
    layers = [m for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    assert layers
    for layer in layers:
        ref = np.array(mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)
                       .astype(mx.float32)).astype(dtype)
        row_ulp = np.spacing(np.abs(ref).max(axis=-1, keepdims=True)).astype(np.float64)
        errors = [float((np.abs(d.astype(np.float64) - ref) / row_ulp).max()) for d in decoded.get(ref.shape, [])]
        assert errors and min(errors) <= ulps, (type(layer).__name__, ref.shape, errors)
    return decoded


@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, 64), (2, 64)])
def test_mlx_quantized_model_exports_to_its_own_weights(tmp_path, bits, group_size):
    model = mlx_q(bits, group_size)
    tokens = mx.array(RNG.integers(0, 256, (1, 8)), mx.int32)
    ref = np.array(model(tokens))
    for precision, tol in (("float32", 2e-5), ("float16", 1e-2)):
        package = export_coreml(model, (tokens,), tmp_path / f"q{precision}.mlpackage", precision=precision)
        check_quantized_export(model, package, precision)
        got = Evaluator(package)({"input_0": np.array(tokens)})["output_0"]
        assert rel_error(got, ref) < tol, precision
    # weights: codes at `bits` (tables for 2 bits), not float
    fp = package_summary(export_coreml(tiny_lm(), (tokens,), tmp_path / "fp16.mlpackage"))["bytes"]
    assert package_summary(tmp_path / "qfloat16.mlpackage")["bytes"] < (0.45 if bits < 8 else 0.7) * fp


def test_bfloat16_quantized_model_warns_with_the_measured_error(tmp_path):
    """bf16 scales and biases: -bias/scale is not near an integer, so float16 offsets round; the export
    warns with the measured distance (it does not silently claim exactness) and the logits stay close."""
    model = mlx_q(4, 64, mx.bfloat16)
    tokens = mx.array(RNG.integers(0, 256, (1, 8)), mx.int32)
    with pytest.warns(UserWarning, match=r"MLX-affine weights decode [0-9.]+ ulps \(max abs"):
        _, stats = to_mil(model, (tokens,), return_stats=True)
    assert stats["affine"]["weights"] == stats["counts"]["affine"] == 2 * 6 + 2  # per layer q k v o in out; emb; head
    got = Evaluator(export_coreml(model, (tokens,), tmp_path / "b.mlpackage"))({"input_0": np.array(tokens)})
    ref = np.array(model(tokens).astype(mx.float32))
    assert rel_error(got["output_0"], ref) < 2e-2


def test_planted_swapped_nibbles_in_the_encoder_are_caught(tmp_path, monkeypatch):
    """Plant: unpack MLX's words with the two nibbles of each byte swapped. The weight check and the
    logits both fail."""
    model = mlx_q(4, 32)
    tokens = mx.array(RNG.integers(0, 256, (1, 8)), mx.int32)
    good = C.unpack_mlx

    def swapped(words, bits):
        codes = good(words, bits)
        return codes.reshape(codes.shape[0], -1, 2)[..., ::-1].reshape(codes.shape)

    monkeypatch.setattr(C, "unpack_mlx", swapped)
    package = export_coreml(model, (tokens,), tmp_path / "bad.mlpackage", precision="float32")
    with pytest.raises(AssertionError):
        check_quantized_export(model, package, "float32")
    got = Evaluator(package)({"input_0": np.array(tokens)})["output_0"]
    assert rel_error(got, np.array(model(tokens))) > 0.05


def blob_records(package):
    """(record offset, data type, size, data offset) of every blob in the package's weight.bin."""
    path = next(package.rglob("weight.bin"))
    raw = path.read_bytes()
    count = struct.unpack_from("<I", raw, 0)[0]
    records, offset = [], 64
    for _ in range(count):
        marker, dtype, nbytes, data = struct.unpack_from("<IIQQ", raw, offset)
        assert marker == 0xDEADBEEF
        records.append((offset, dtype, nbytes, data))
        offset = data + nbytes
        offset += -offset % 64
    return path, records


def test_planted_swapped_nibbles_on_disk_are_caught_by_the_evaluator(tmp_path):
    """Plant: swap the nibbles of a saved uint4 weight blob (a 64 x 64 layer: 2048 bytes of codes). The
    Evaluator reads what is on disk, so its output leaves MLX's."""
    layer = nn.QuantizedLinear(64, 64, bias=False, group_size=32, bits=4)
    mx.eval(layer.parameters())
    x = mx.array(RNG.standard_normal((2, 64)).astype(np.float32))
    package = export_coreml(layer, (x,), tmp_path / "q.mlpackage", precision="float32")
    ref = np.array(layer(x))
    assert rel_error(Evaluator(package)({"input_0": np.array(x)})["output_0"], ref) < 1e-5
    path, records = blob_records(package)
    codes = [r for r in records if r[2] == 64 * 64 // 2]
    assert len(codes) == 1
    raw = bytearray(path.read_bytes())
    start, n = codes[0][3], codes[0][2]
    block = np.frombuffer(bytes(raw[start:start + n]), np.uint8)
    raw[start:start + n] = ((block << 4) | (block >> 4)).astype(np.uint8).tobytes()
    path.write_bytes(bytes(raw))
    assert rel_error(Evaluator(package)({"input_0": np.array(x)})["output_0"], ref) > 0.05


def test_compressed_weights_need_ios18_and_bad_options_fail_before_tracing(tmp_path):
    model, tokens = tiny_lm(), mx.zeros((1, 4), mx.int32)
    with pytest.raises(ValueError, match=r"compressed weights \(14 policy\) need iOS18"):
        to_mil(model, (tokens,), compress="int8", minimum_deployment_target="iOS17")
    with pytest.raises(ValueError, match=r"compressed weights \(14 affine\) need iOS18"):
        to_mil(mlx_q(), (tokens,), minimum_deployment_target="iOS17")
    with pytest.raises(ValueError, match="expected compress to be one of"):
        export_coreml(model, (tokens,), tmp_path / "x.mlpackage", compress="int3")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_converted_q4_decoder_greedy_equals_mlx(tmp_path, precision):
    """The headline path: a checkpoint converted and quantized to 4 bits (saved and loaded back, so its
    layers are the AffineLinear/QuantizedEmbedding that ``convert --quantize 4`` gives) exports as a
    stateful decoder whose free-running greedy tokens over 32 decode steps equal MLX's quantized model's."""
    from lm_tiny import save_peaked_llama

    from mlx_zeta.converters import from_pretrained, save_pretrained
    from mlx_zeta.converters.coreml import export_decoder
    from mlx_zeta.structs import AutoregressiveWrapper

    save_peaked_llama(tmp_path / "hf", 96, layers=2, seed=1)
    model = from_pretrained(tmp_path / "hf")
    quantize(model, bits=4, group_size=32)
    model = from_pretrained(save_pretrained(model, tmp_path / "q4"))
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    prompt = mx.array(RNG.integers(0, 96, (1, 5)), mx.int32)
    want = np.array(AutoregressiveWrapper(model).generate(prompt, 32, temperature=0.0))[0].tolist()
    package = export_decoder(model, tmp_path / "q4.mlpackage", capacity=48, prefill_lens=(8,), precision=precision)
    state = {}
    prefill = Evaluator(package, function="prefill_8", state=state)
    decode = Evaluator(package, function="decode", state=state)
    ids = np.zeros((1, 8), np.int32)
    ids[0, :5] = np.array(prompt)[0]  # right-padded to the function's length
    token = int(prefill({"input_ids": ids, "position": np.array([0], np.int32)})["logits"][0, 4].argmax())
    got = [token]
    for step in range(31):
        out = decode({"input_ids": np.array([[token]], np.int32), "position": np.array([5 + step], np.int32)})
        token = int(out["logits"][0, 0].argmax())
        got.append(token)
    assert got == want


def test_compress_of_a_function_needs_its_module(tmp_path):
    """A function has no module paths: compress warns that it compressed nothing, and weights_root fixes it."""
    model, tokens = tiny_lm(), mx.zeros((1, 4), mx.int32)
    with pytest.warns(UserWarning, match=r"compressed no weight: .* pass weights_root="):
        _, stats = to_mil(lambda t: model(t), (tokens,), compress="int8", return_stats=True)
    assert stats["counts"]["policy"] == 0
    _, stats = to_mil(lambda t: model(t), (tokens,), compress="int8", weights_root=model, return_stats=True)
    assert stats["counts"]["policy"] == 2 * 6 + 2
