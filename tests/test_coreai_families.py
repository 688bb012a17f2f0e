"""Every exported model family run by Apple's Core AI runtime (``coreai-core`` on Linux x86_64) in
float32 and compared with MLX; the same models exported to Core ML and evaluated by our numpy
evaluator, so that three executions (MLX, Core AI runtime, Core ML evaluator) check each other; and
planted wrong lowerings that only the runtime's numbers give away.

Bounds: ``REL_OF_MAX`` (max |error| / max |MLX|, float32 compute and float32 weights) for every
output, greedy agreement ``STEPS``/``STEPS`` for every decoder (``greedy_check``: prefill and decode
functions sharing one state). The Core ML stateful decoder keeps its KV cache in float16 (Core ML
states are fp16), so its logits get the fp16 bound of ``test_coreml_stateful``. Each test prints
``core ai <family>: max rel err X[, greedy a/32]`` (``-s``).

Models are the tiny ones of the Core ML tests (written once there, imported here), random HF
checkpoints converted with ``from_pretrained`` (made by the ``test_convert_*`` helpers; skipped
without torch/transformers) and the real all-MiniLM-L6-v2 (skipped without its package).
"""

import importlib
from dataclasses import replace
from functools import partial

import numpy as np
import pytest

from mlx_zeta.converters.coreai import available

OK, WHY = available()
pytestmark = pytest.mark.skipif(not OK, reason=f"Core AI runtime unavailable: {WHY}")

import mlx_zeta  # noqa: E402  (routes BLAS before mlx.core)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from mlx_zeta.converters import quantize, save_pretrained  # noqa: E402
from mlx_zeta.converters.coreai import EMITTERS, Bundle, export_coreai, export_decoder_coreai  # noqa: E402
from mlx_zeta.converters.coreai import weights as coreai_weights  # noqa: E402
from mlx_zeta.converters.coreml import export_coreml, export_decoder  # noqa: E402
from mlx_zeta.converters.coreml.evaluate import evaluate  # noqa: E402
from mlx_zeta.quant import TernaryLinear  # noqa: E402
from mlx_zeta.structs import Decoder, Transformer  # noqa: E402
from test_coreai_export import CAPACITY, LENS, REL_OF_MAX, STEPS, greedy_check, rel_error  # noqa: E402
from test_coreml_compress import mlx_q, tiny_lm  # noqa: E402
from test_coreml_families import bert_hidden, minilm_batch, padded_batch, ternary_lm, tiny_bert, tiny_vit  # noqa: E402
from test_coreml_stateful import FP16_RTOL_OF_MAX, greedy_parity  # noqa: E402

PROMPT = (3, 5, 7, 9, 11, 2, 4, 6, 8, 10, 12)  # 11 tokens: prefill_8, then prefill_4 with one pad
TOKENS = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])


# ----------------------------------------------------------------------------- helpers
def feeds(names, args) -> dict:
    return {n: np.array(a) for n, a in zip(names, args)}


def run_bundle(fn, args, path, names, outputs=("output",)):
    """``fn`` at ``args`` exported with float32 weights to ``path``, the saved bundle run by Apple's
    runtime on the same arrays: (its outputs, MLX's float32 outputs), both in ``outputs`` order."""
    ref = fn(*args)
    ref = [np.array(r.astype(mx.float32)) for r in (ref if isinstance(ref, (list, tuple)) else [ref])]
    path = export_coreai(fn, args, path, weights="float32", input_names=list(names), output_names=list(outputs))
    with Bundle(path) as bundle:
        got = bundle("main", feeds(names, args))
    return [got[n] for n in outputs], ref


def check(family, got, ref, bound=REL_OF_MAX) -> float:
    """Print and assert max |got - ref| / max |ref| <= ``bound``."""
    rel = rel_error(got, ref)
    print(f"\ncore ai {family}: max rel err {rel:.2e}")
    assert rel <= bound, f"[core ai {family}] max rel err {rel:.2e} > {bound:.0e}"
    return rel


# ----------------------------------------------------------------------------- single-function families
def test_bert_hidden_states_with_attention_mask(tmp_path):
    model, batch = tiny_bert(), padded_batch()
    (got,), (ref,) = run_bundle(bert_hidden(model), batch, tmp_path / "bert.aimodel", ["input_ids", "attention_mask"])
    check("bert hidden states (padded batch)", got, ref)
    unmasked = np.array(model(batch[0]))  # the bundle uses the mask: without it the padded rows change
    assert rel_error(got, unmasked) > 1e3 * REL_OF_MAX


def test_all_minilm_l6_v2_hidden_states_and_embeddings(tmp_path):
    """The real checkpoint: hidden states at the real tokens and the pooled, normalised sentence
    embeddings. (Padded positions' hidden states, which nothing reads, measured 6e-6 of max.)"""
    model, ids, mask = minilm_batch()

    def hidden_and_embedding(input_ids, attention_mask):
        return model(input_ids, attention_mask), model.embed(input_ids, attention_mask)

    (hidden, emb), (ref_hidden, ref_emb) = run_bundle(hidden_and_embedding, (ids, mask), tmp_path / "minilm.aimodel",
                                                      ["input_ids", "attention_mask"], ("hidden", "embedding"))
    real = np.array(mask).astype(bool)
    check("all-MiniLM-L6-v2 hidden states (real tokens)", hidden[real], ref_hidden[real])
    check("all-MiniLM-L6-v2 sentence embeddings", emb, ref_emb)


def test_vit_logits_nhwc(tmp_path):
    model = tiny_vit()
    images = mx.random.uniform(shape=(2, 16, 16, 3))
    (got,), (ref,) = run_bundle(model, (images,), tmp_path / "vit.aimodel", ["image"])
    assert got.shape == (2, 10)
    check("vit logits (NHWC)", got, ref)


@pytest.mark.parametrize("bilinear", [False, True], ids=["transposed-conv", "bilinear"])
def test_unet_segmentation(tmp_path, bilinear):
    from mlx_zeta.nn.unet import Unet

    mx.random.seed(2)
    model = Unet(3, 2, bilinear=bilinear, base_channels=4)
    model.eval()
    (got,), (ref,) = run_bundle(model, (mx.random.normal((1, 16, 16, 3)),), tmp_path / "unet.aimodel", ["image"])
    check(f"u-net ({'bilinear' if bilinear else 'transposed conv'}) scores", got, ref)


@pytest.mark.parametrize("activation", ["int8", "float"])
def test_ternary_bitlinear_lm_logits(tmp_path, activation):
    model, _ = ternary_lm(activation)
    (got,), (ref,) = run_bundle(model, (TOKENS,), tmp_path / "ternary.aimodel", ["input_ids"])
    check(f"ternary BitLinear LM ({activation} activations) logits", got, ref)


def test_mlx_q4_logits_are_the_quantized_models(tmp_path):
    """MLX-affine 4-bit weights exported as MLX's own codes, scales and biases: the logits are the
    quantized model's at float32 rounding, far closer than the float model it was quantized from."""
    model = mlx_q(4, 32)
    (got,), (ref,) = run_bundle(model, (TOKENS,), tmp_path / "q4.aimodel", ["input_ids"])
    check("mlx-q4 LM logits", got, ref)
    assert rel_error(np.array(tiny_lm()(TOKENS)), ref) > 1e3 * REL_OF_MAX  # re-quantizing would show


# ----------------------------------------------------------------------------- stateful decoders
def hf_make(module: str):
    """``make`` of a ``test_convert_*`` module (tiny random HF checkpoints); skips without torch/transformers."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return importlib.import_module(module).make


def absolute_decoder(folder):
    mx.random.seed(0)
    model = Transformer(num_tokens=64, max_seq_len=CAPACITY, attn_layers=Decoder(dim=32, depth=2, heads=4))
    assert "pos_emb" in model  # learned absolute positions, no rotary
    return model


def llama(folder, case="llama-gqa-untied"):
    return mlx_zeta.from_pretrained(hf_make("test_convert_llama")(case, folder)[1])


def gpt2(folder):
    return mlx_zeta.from_pretrained(hf_make("test_convert_gpt2")(folder)[1])


def bitnet(folder):
    model = mlx_zeta.from_pretrained(hf_make("test_convert_bitnet")("bitlinear-gqa-untied", folder)[1])
    assert sum(isinstance(m, TernaryLinear) for _, m in model.named_modules()) == 2 * 7
    return model


def llama_q4(folder):
    """A converted Llama quantized to 4 bits, saved and loaded back (the layers ``convert --quantize 4`` gives)."""
    model = llama(folder / "hf")
    quantize(model, bits=4, group_size=32)
    model = mlx_zeta.from_pretrained(save_pretrained(model, folder / "q4"))
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    return model


DECODERS = {"decoder (absolute positions)": absolute_decoder, "llama": llama,
            "qwen3": partial(llama, case="qwen3-qk-norm"), "gpt2": gpt2, "bitnet ternary": bitnet,
            "llama mlx-q4": llama_q4}


@pytest.mark.parametrize("family", list(DECODERS))
def test_stateful_decoder_greedy_32_of_32(tmp_path, family):
    model = DECODERS[family](tmp_path / "checkpoint")
    path = export_decoder_coreai(model, tmp_path / "lm.aimodel", capacity=CAPACITY, prefill_lens=LENS,
                                 weights="float32")
    agree, rel = greedy_check(model, path, PROMPT)
    print(f"\ncore ai {family}: max rel err {rel:.2e}, greedy {agree}/{STEPS}")
    assert agree == STEPS and rel <= REL_OF_MAX, (agree, rel)


# ----------------------------------------------------------------------------- three executions
THREE_WAY = {  # family: folder -> (model or function, example inputs, input names)
    "bert": lambda folder: (bert_hidden(tiny_bert()), padded_batch(), ["input_ids", "attention_mask"]),
    "vit": lambda folder: (tiny_vit(), (mx.random.uniform(shape=(2, 16, 16, 3)),), ["image"]),
    "llama logits": lambda folder: (llama(folder), (mx.array([list(PROMPT)]),), ["input_ids"]),
}


@pytest.mark.parametrize("family", list(THREE_WAY))
def test_three_way_core_ai_core_ml_and_mlx_agree(tmp_path, family):
    """One model, three executions: the Core AI bundle under Apple's runtime, the float32 Core ML
    package under our evaluator, MLX. Each pair within REL_OF_MAX."""
    fn, args, names = THREE_WAY[family](tmp_path / "hf")
    (ai,), (ref,) = run_bundle(fn, args, tmp_path / "m.aimodel", names)
    package = export_coreml(fn, args, tmp_path / "m.mlpackage", input_names=names, output_names=["output"],
                            precision="float32")
    ml = evaluate(package, feeds(names, args))["output"]
    check(f"{family} vs MLX", ai, ref)
    check(f"{family} vs core ml evaluator", ai, ml)
    rel = rel_error(ml, ref)
    print(f"core ml evaluator {family} vs MLX: max rel err {rel:.2e}")
    assert rel <= REL_OF_MAX


def test_three_way_stateful_llama_greedy(tmp_path):
    """The stateful decoders of both backends: Core AI (float32 caches) and Core ML (float16 caches,
    evaluated) decode the same 32 greedy tokens as MLX."""
    model = llama(tmp_path / "hf")
    path = export_decoder_coreai(model, tmp_path / "lm.aimodel", capacity=CAPACITY, prefill_lens=LENS,
                                 weights="float32")
    agree, rel = greedy_check(model, path, PROMPT)
    package = export_decoder(model, tmp_path / "lm.mlpackage", capacity=CAPACITY, prefill_lens=(8,),
                             precision="float32")
    ml_tokens, ref_tokens, _, ml_rel = greedy_parity(package, model, mx.array([list(PROMPT)]), lens=(8,), steps=STEPS)
    ml_agree = sum(a == b for a, b in zip(ml_tokens, ref_tokens))
    print(f"\ncore ai llama (three-way): max rel err {rel:.2e}, greedy {agree}/{STEPS}; "
          f"core ml evaluator: max rel err {ml_rel:.2e} (fp16 cache), greedy {ml_agree}/{STEPS}")
    assert agree == STEPS and ml_agree == STEPS  # so the Core AI and Core ML tokens are MLX's, and equal
    assert rel <= REL_OF_MAX and ml_rel <= FP16_RTOL_OF_MAX


# ----------------------------------------------------------------------------- planted wrong lowerings
def test_planted_untransposed_square_weight_is_caught(tmp_path, monkeypatch):
    """Plant: the Matmul emitter ignores ``transpose_y`` where the weight is square (so every shape
    still fits and the export succeeds): ``x W`` instead of ``x W^T``. The runtime's logits leave MLX's."""
    good, planted = EMITTERS["Matmul"], []

    def untransposed(ctx, node):
        shape = node.in_shapes[1]
        if node.attrs.get("transpose_y") and shape[-1] == shape[-2]:
            planted.append(node)
            node = replace(node, attrs={**node.attrs, "transpose_y": False})
        return good(ctx, node)

    monkeypatch.setitem(EMITTERS, "Matmul", untransposed)
    (got,), (ref,) = run_bundle(tiny_lm(), (TOKENS,), tmp_path / "bad.aimodel", ["input_ids"])
    assert planted, "the planted emitter never met a square transposed weight"
    with pytest.raises(AssertionError, match="max rel err"):
        check("lm with untransposed square weights (planted)", got, ref)
    assert rel_error(got, ref) > 1e-2


def test_pack_bits_against_hand_packed_bytes():
    """Low bits first, ``8 // bits`` codes per byte, the last byte zero-padded; 2-D codes row-major."""
    pack = coreai_weights.pack_bits
    assert pack(np.array([1, 2, 3, 4, 5]), 4).tolist() == [0x21, 0x43, 0x05]
    assert pack(np.array([[1, 2, 3], [0, 3, 1]]), 2).tolist() == [0b00111001, 0b0111]
    assert pack(np.array([1, 0, 1, 1, 0, 0, 0, 1, 1]), 1).tolist() == [0b10001101, 0b1]
    assert pack(np.array([15, 0]), 4).dtype == np.uint8


def test_planted_high_nibble_first_is_caught(tmp_path, monkeypatch):
    """Plant: 4-bit codes packed high nibble first (the runtime reads the low nibble first). The
    MLX-q4 model's logits leave MLX's by far more than float32 rounding."""
    good, packed = coreai_weights.pack_bits, []

    def high_first(codes, bits):
        out = good(codes, bits)
        if bits != 4:
            return out
        packed.append(out.size)
        return ((out << 4) | (out >> 4)).astype(np.uint8)

    monkeypatch.setattr(coreai_weights, "pack_bits", high_first)
    (got,), (ref,) = run_bundle(mlx_q(4, 32), (TOKENS,), tmp_path / "bad.aimodel", ["input_ids"])
    assert packed, "no 4-bit codes were packed"
    rel = rel_error(got, ref)
    print(f"\ncore ai mlx-q4 LM with high-nibble-first codes (planted): max rel err {rel:.2e}")
    assert rel > 1e-2
