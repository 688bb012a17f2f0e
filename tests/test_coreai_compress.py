"""Compressed weights in Core AI bundles, run by Apple's runtime (``coreai-core`` on Linux x86_64).

Every weight form of the Core AI backend (:mod:`mlx_zeta.converters.coreai.weights`) against an MLX
reference that is not the exporter's: the same MLX model with each compressed weight replaced by
:meth:`~mlx_zeta.converters.coreml.compress.Compressed.decode` of it (the numpy decode the Core ML
tests already hold to coremltools' ops and to MLX's own quantizer). Compute is float32 in a bundle, so
with float32 tables the bound is float32 rounding (``REL_OF_MAX``) and any mistake in the encoding (a
code's bits, a table's layout, a scale's block) shows as an error of the size of a weight:

* float32/float16 weights and every ``compress`` mode on a small decoder;
* MLX-quantized models (``nn.quantize``: 4/8 bits as MLX's own codes, scales and biases; 2/3/6 bits
  as exact tables) against MLX's quantized model itself, no re-quantization;
* a ternary (BitNet) decoder against MLX's ternary model;
* 3/5/6-bit tables, which Core AI has no index type for, widened to 4/8 bits exactly;
* bundle bytes per mode on a decoder whose weights dominate, with float16 tables, and those bundles'
  logits against the decode the runtime does in float16 (measured: ``fl16(fl16(s (q - z)) + b)``).

Plain float16 matrices are stored through ``blockwise_shift_scale`` (``converters/coreai/weights.py``
``emit_float16``): a ``cast`` of a float16 constant is folded by coreai-core 1.0.0b3's rewrites into a
float32 constant (twice the bytes, and float16 subnormals read as ~``2**-22``); through the op they
are float16 on disk and exact, subnormals included (:func:`fp16_plain` is plain float16 rounding).
"""

import numpy as np
import pytest

from mlx_zeta.converters.coreai import available

OK, WHY = available()
pytestmark = pytest.mark.skipif(not OK, reason=f"Core AI runtime unavailable: {WHY}")

import mlx_zeta  # noqa: E402,F401  (routes BLAS before mlx.core)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_unflatten  # noqa: E402

from mlx_zeta.converters import quantize  # noqa: E402
from mlx_zeta.converters.coreai import Bundle, export_coreai  # noqa: E402
from mlx_zeta.converters.coreai import weights as W  # noqa: E402
from mlx_zeta.converters.coreai.export import trace  # noqa: E402
from mlx_zeta.converters.coreml.weights import _key  # noqa: E402  (the exporter's content key of a weight)
from mlx_zeta.converters.swaps import dense_parameters  # noqa: E402
from test_coreai_export import rel_error  # noqa: E402
from test_coreml_compress import tiny_lm  # noqa: E402  (a rotary decoder; dim 64 takes every mode and group size)

REL_OF_MAX = 1e-5  # max |error| / max |reference|, float32 compute
COMPRESS = ("int8", "int4", "int4-block64", "palettize2", "palettize3", "palettize4", "palettize6", "palettize8")
MLX_Q = ((4, 32), (4, 64), (8, 32), (8, 64), (2, 32), (3, 64), (6, 32))  # (bits, group size) of nn.quantize
INT8_TIE = 1e-2  # int8 activations: a code a float32 rounding from a .5 tie may round the other way in the runtime,
#                  one int8 step (~1/127) of that activation (measured: 2-6e-7 for 5 token draws, 4.1e-3 for one)


def tokens_for(vocab, n=8, seed=0):
    """The same ids whatever ran before (an int8-activation check depends on them, see INT8_TIE)."""
    return mx.array(np.random.default_rng(seed).integers(0, vocab, (1, n)), mx.int32)


def bundle_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(path, tokens) -> np.ndarray:
    with Bundle(path) as bundle:
        return bundle("main", {"input_0": np.array(tokens)})["output_0"]


def fp16_plain(w: np.ndarray) -> np.ndarray:
    """A plain float16 matrix as the runtime reads it: rounded to float16, subnormals kept."""
    return w.astype(np.float16).astype(np.float32)


def fp16_arithmetic(c) -> np.ndarray:
    """``c`` decoded as the runtime does with float16 tables: tables read in float16, a shift-scale weight
    computed in float16, ``fl16(fl16(s (q - z)) + b)`` (one rounding per op, not one in all)."""
    if c.kind == "lut":
        return c.decode(np.float16).astype(np.float32)
    block = c.data.shape[1] // c.scale.shape[1]
    wide = lambda a: np.repeat(np.asarray(a, np.float32).astype(np.float16), block, axis=1)  # noqa: E731
    q = c.data.astype(np.float16)
    if c.offset is not None:
        q = q - wide(c.offset)
    w = (wide(c.scale) * q).astype(np.float16)
    if c.bias is not None:
        w = (w + wide(c.bias)).astype(np.float16)
    return w.astype(np.float32)


def decoded_twin(model, fresh, graph, compressed, decode=lambda c: c.decode(np.float32), plain=None):
    """``fresh`` (a float model of ``model``'s architecture) holding ``model``'s weights, MLX-affine layers
    de-quantized (``dense_parameters``), every weight the export compressed replaced by ``decode(c)`` and
    every other Linear/Embedding weight by ``plain(w)`` (when given). Asserts each compressed weight was found."""
    fresh.update(tree_unflatten(list(dense_parameters(model, fresh, "test").items())))
    by_key = {_key(graph.constants[name]): c for name, c in compressed.items()}
    found = set()
    for _, module in fresh.named_modules():
        if type(module) not in (nn.Linear, nn.Embedding):
            continue
        key = _key(module.weight)
        if key in by_key:
            module.weight = mx.array(decode(by_key[key]))
            found.add(key)
        elif plain is not None:
            module.weight = mx.array(plain(np.array(module.weight)))
    assert found == set(by_key), f"{len(by_key) - len(found)} compressed weights match no Linear/Embedding"
    mx.eval(fresh.parameters())
    return fresh


def export_and_trace(model, tokens, path, weights, compress=None):
    path = export_coreai(model, (tokens,), path, weights=weights, compress=compress)
    graph, compressed, _ = trace(model, (tokens,), compress=compress, weights=weights)
    return path, graph, compressed


# ----------------------------------------------------------------------------- (a) every form, float32 tables
@pytest.mark.parametrize("mode", ("float32", "float16") + COMPRESS)
def test_bundle_equals_mlx_with_the_decoded_weights(tmp_path, mode):
    model, tokens = tiny_lm(), tokens_for(256)
    weights = mode if mode in ("float32", "float16") else "float32"
    compress = None if mode in ("float32", "float16") else mode
    path, graph, compressed = export_and_trace(model, tokens, tmp_path / "m.aimodel", weights, compress)
    assert len(compressed) == (0 if compress is None else 2 * 6 + 2)  # q k v o, ff in/out per layer; emb; head
    twin = decoded_twin(model, tiny_lm(), graph, compressed, plain=fp16_plain if mode == "float16" else None)
    rel = rel_error(run(path, tokens), twin(tokens))
    print(f"\n{mode}: max rel logit error vs MLX with the decoded weights {rel:.2e}")
    assert rel <= REL_OF_MAX


# ----------------------------------------------------------------------------- (b) MLX-quantized sources
def mlx_quantized(bits, group_size, how="nn.quantize"):
    model = tiny_lm()
    if how == "nn.quantize":
        nn.quantize(model, group_size=group_size, bits=bits)
    else:  # convert --quantize: AffineLinear (a QuantizedLinear subclass) and QuantizedEmbedding
        quantize(model, bits=bits, group_size=group_size)
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("bits,group_size,how", [(b, g, "nn.quantize") for b, g in MLX_Q] + [(4, 64, "convert")])
def test_mlx_quantized_model_equals_mlx_itself(tmp_path, bits, group_size, how):
    """MLX's codes, scales and biases as they are: the runtime's logits equal MLX's quantized model's
    (and MLX's with the decoded weights) at float32 rounding; 4/8 bits are shift-scale, others tables."""
    model, tokens = mlx_quantized(bits, group_size, how), tokens_for(256)
    path, graph, compressed = export_and_trace(model, tokens, tmp_path / "q.aimodel", "float32")
    kinds = {c.kind for c in compressed.values()}
    assert len(compressed) == 2 * 6 + 2 and kinds == ({"shift_scale"} if bits in (4, 8) else {"lut"})
    got = run(path, tokens)
    own = rel_error(got, model(tokens))
    decoded = rel_error(got, decoded_twin(model, tiny_lm(), graph, compressed)(tokens))
    print(f"\nMLX {bits}-bit group {group_size} ({how}): rel error vs MLX's quantized model {own:.2e}, "
          f"vs the decoded weights {decoded:.2e}")
    assert own <= REL_OF_MAX and decoded <= REL_OF_MAX


@pytest.mark.parametrize("activation", ["int8", "float"])
def test_ternary_lm_equals_mlx_itself(tmp_path, activation):
    """BitNet layers as 2-bit tables {-s, 0, s}: each decodes to the layer's ``s T`` exactly, and the
    runtime's logits equal MLX's ternary model's (float activations at float32 rounding; int8 activations
    within ``INT8_TIE``)."""
    from mlx_zeta.quant import TernaryLinear, freeze_model, quantize_model

    model, tokens = tiny_lm(), tokens_for(256)
    freeze_model(quantize_model(model), activation=activation)
    model.eval()
    path, graph, compressed = export_and_trace(model, tokens, tmp_path / "t.aimodel", "float32")
    dense = {_key(t * s): None for t, s, _ in (m.dense_weight() for _, m in model.named_modules()
                                                if isinstance(m, TernaryLinear))}
    assert len(dense) == len(compressed) == 2 * 6
    for c in compressed.values():
        assert c.kind == "lut" and c.dtype == "uint2" and _key(c.decode(np.float32)) in dense
    rel = rel_error(run(path, tokens), model(tokens))
    print(f"\nternary ({activation} activations): rel error vs MLX {rel:.2e}")
    assert rel <= (INT8_TIE if activation == "int8" else REL_OF_MAX)


# ----------------------------------------------------------------------------- widened tables
def one_linear(source, weights):
    """(layer, Compressed, exact dense weight) of a 32 x 128 layer in ``source``: ``palettize{n}`` or ``mlx{n}``."""
    mx.random.seed(1)
    if source.startswith("mlx"):
        layer = nn.QuantizedLinear(128, 32, bias=False, group_size=32, bits=int(source[3:]))
        dense = np.array(mx.dequantize(layer.weight, layer.scales, layer.biases, 32, layer.bits))
        compress = None
    else:
        layer, dense, compress = nn.Linear(128, 32, bias=False), None, source
    mx.eval(layer.parameters())
    _, compressed, _ = trace(layer, (mx.eye(128),), compress=compress, weights=weights)
    (c,) = compressed.values()
    return layer, c, c.decode(np.float32) if dense is None else dense, compress


def weight_through_runtime(layer, path, weights, compress) -> np.ndarray:
    """The layer's weight as the runtime decodes it: the bundle run on the identity (x @ W.T = W.T, exact)."""
    eye = mx.eye(128)
    return run(export_coreai(layer, (eye,), path, weights=weights, compress=compress), eye).T


@pytest.mark.parametrize("weights", ["float32", "float16"])
@pytest.mark.parametrize("source", ["palettize3", "palettize6", "mlx3", "mlx5", "mlx6"])
def test_widened_tables_are_exact(tmp_path, source, weights):
    """3/5/6-bit indices stored as 4/8-bit codes into a table padded with zeros decode to the very same
    weight: Core AI's ``lut_to_dense`` equals the numpy decode (and MLX's ``mx.dequantize``) bit for bit."""
    layer, c, dense, compress = one_linear(source, weights)
    bits = int(c.dtype[len("uint"):])
    assert W.index_width(bits) == (4 if bits <= 4 else 8) > bits
    got = weight_through_runtime(layer, tmp_path / "w.aimodel", weights, compress)
    np.testing.assert_array_equal(got, fp16_arithmetic(c) if weights == "float16" else dense)


def test_planted_high_bits_first_packing_is_caught(tmp_path, monkeypatch):
    """Plant: pack each byte's first code in its high bits. The decoded weight leaves the numpy decode."""
    good = W.pack_bits

    def high_first(codes, bits):
        per = 8 // bits
        flat = np.asarray(codes, np.uint8).reshape(-1)
        flat = np.pad(flat, (0, (-flat.size) % per)).reshape(-1, per)[:, ::-1]
        return good(flat, bits)

    monkeypatch.setattr(W, "pack_bits", high_first)
    layer, c, dense, compress = one_linear("palettize3", "float32")
    got = weight_through_runtime(layer, tmp_path / "bad.aimodel", "float32", compress)
    assert rel_error(got, dense) > 0.1


# ----------------------------------------------------------------------------- (c) bundle bytes, float16 tables
SIZE_MODES = ("float32", "float16") + COMPRESS[:-1] + ("mlx-q4-g64",)
SIZED = dict(dim=512, vocab=512, depth=1)  # 3.7M parameters: weights dominate the bytes


@pytest.fixture(scope="module")
def sized(tmp_path_factory):
    """``{mode: (bundle bytes, rel error vs MLX with the weights as the runtime decodes them)}`` for a
    decoder whose weights are > 99% of the bundle (``SIZED``), float16 tables."""
    folder, tokens, out = tmp_path_factory.mktemp("sized"), tokens_for(SIZED["vocab"]), {}
    for mode in SIZE_MODES:
        model = tiny_lm(**SIZED)
        if mode == "mlx-q4-g64":
            nn.quantize(model, group_size=64, bits=4)
            mx.eval(model.parameters())
        weights = "float32" if mode == "float32" else "float16"
        compress = mode if mode in COMPRESS else None
        path, graph, compressed = export_and_trace(model, tokens, folder / f"{mode}.aimodel", weights, compress)
        twin = decoded_twin(model, tiny_lm(**SIZED), graph, compressed,
                            decode=fp16_arithmetic if weights == "float16" else lambda c: c.decode(np.float32),
                            plain=fp16_plain if weights == "float16" else None)
        out[mode] = (bundle_bytes(path), rel_error(run(path, tokens), twin(tokens)))
    return out


def test_bundle_bytes_per_mode(sized):
    fp16 = sized["float16"][0]
    print("\n| mode | bundle bytes | x float16 | rel error vs MLX (weights as decoded) |\n|---|---|---|---|")
    for mode, (size, rel) in sized.items():
        print(f"| {mode} | {size:,} | {size / fp16:.3f} | {rel:.1e} |")
    ratio = {mode: size / fp16 for mode, (size, _) in sized.items()}
    assert 1.9 <= ratio["float32"] <= 2.05
    assert 0.45 <= ratio["int8"] <= 0.55 and 0.45 <= ratio["palettize6"] <= 0.55  # 6-bit indices stored as 8
    # int4 blocks of 32: 4-bit codes + a float16 scale and a uint4 zero point per 32 weights, 4.625 / 16 = 0.289
    # (measured 0.292); MLX-q4 sources keep MLX's float16 bias: (4 + 32 / 64) / 16 = 0.281 at group 64
    assert ratio["int4"] <= 0.3 and ratio["int4-block64"] <= 0.3 and ratio["mlx-q4-g64"] <= 0.3
    assert ratio["palettize2"] <= 0.15 and abs(ratio["palettize3"] - ratio["palettize4"]) < 0.01  # 3 as 4 bits
    assert ratio["palettize4"] <= 0.27


def test_float16_bundles_equal_mlx_with_the_runtimes_decode(sized):
    """Float16 tables: the runtime decodes in float16 arithmetic (:func:`fp16_arithmetic`), which MLX
    with those weights matches at float32 rounding; so does every float16 plain matrix (:func:`fp16_plain`)."""
    bad = {mode: rel for mode, (_, rel) in sized.items() if rel > REL_OF_MAX}
    assert not bad, bad
