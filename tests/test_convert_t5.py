"""T5 checkpoints (v1 relu tied, v1.1 gated-gelu untied) through from_pretrained vs transformers.

Every checkpoint is tiny, random and made here with transformers' ``save_pretrained``. The
decoder is deeper than the encoder, ``num_heads * d_kv != d_model``, and the bucket settings
(8 buckets, max distance 20) put the 13 source / 9 target positions into the log-spaced buckets.
"""

import json

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mlx_zeta  # noqa: E402
from mlx_zeta.converters import load_state_dict  # noqa: E402
from mlx_zeta.converters import t5 as t5_conv  # noqa: E402
from mlx_zeta.kernels import relative_position_bucket  # noqa: E402
from hf_tiny import assert_close, assert_grads_close, check_sanitize, save_hf, seeded  # noqa: E402

VOCAB, D_MODEL = 120, 64
BASE = dict(vocab_size=VOCAB, d_model=D_MODEL, d_kv=12, d_ff=96, num_layers=2, num_decoder_layers=3, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=20, decoder_start_token_id=0)
CASES = {
    "v1-relu-tied": dict(feed_forward_proj="relu"),
    "v1.1-gated-gelu-untied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "gelu-tied": dict(feed_forward_proj="gelu"),
    "gated-silu-untied": dict(feed_forward_proj="gated-silu", tie_word_embeddings=False),
}
UNTIED = "v1.1-gated-gelu-untied"


def make(case, folder, **overrides):
    """A random T5ForConditionalGeneration saved to ``folder``. T5 scores are not scaled by
    1/sqrt(d), so the weights are lifted by 2 only (more makes float32 itself the limit: at 3x,
    transformers in float32 is 1.4e-4 from float64); norms get noise, the position tables 4x."""
    seeded(0)
    config = transformers.T5Config(**{**BASE, **CASES[case], **overrides})
    model = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        if not getattr(config, "scale_decoder_outputs", config.tie_word_embeddings):
            # transformers >= 5 ties lm_head to shared even for v1.1 unless the checkpoint holds its own
            model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, D_MODEL) * D_MODEL**-0.5)
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.mul_(4.0)
            else:
                p.mul_(2.0)
    return model, save_hf(model, folder)


def inputs(batch=3, src=13, tgt=9, seed=1):
    """Source tokens with a full, a right-padded and a left-padded row; decoder inputs from the start token."""
    rng = np.random.default_rng(seed)
    ids, dec = rng.integers(2, VOCAB, (batch, src)), rng.integers(2, VOCAB, (batch, tgt))
    dec[:, 0] = 0
    mask = np.ones_like(ids)
    mask[1, -5:] = 0
    mask[2, :3] = 0
    ids[mask == 0] = 0
    return ids, dec, mask


def hf_forward(hf, ids, dec, mask):
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), decoder_input_ids=torch.tensor(dec), attention_mask=torch.tensor(mask))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_encoder_states_match_transformers_float32(case, tmp_path):
    hf, path = make(case, tmp_path / case)
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    assert isinstance(model, t5_conv.T5Model)
    assert ("lm_head" in model) == (case in ("v1.1-gated-gelu-untied", "gated-silu-untied"))
    ids, dec, mask = inputs()
    ref = hf_forward(hf, ids, dec, mask)
    enc = model.encode(mx.array(ids), mx.array(mask))
    err_enc = assert_close(enc, ref.encoder_last_hidden_state, what=f"{case} encoder states")
    err = assert_close(model(mx.array(ids), mx.array(dec), mx.array(mask)), ref.logits, what=f"{case} logits")
    print(f"{case}: max |logits diff| {err:.2e}, max |encoder diff| {err_enc:.2e}")
    with torch.no_grad():  # the same model without a mask: padding really is masked above
        unmasked = hf(input_ids=torch.tensor(ids), decoder_input_ids=torch.tensor(dec)).logits
    assert float((unmasked - ref.logits).abs().max()) > 1e-2
    assert_close(model(mx.array(ids), mx.array(dec)), unmasked, what=f"{case} logits without mask")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", ["v1-relu-tied", UNTIED])
def test_half_precision_logits_within_stated_tolerance(case, dtype, tmp_path):
    hf, path = make(case, tmp_path / "m")
    model = mlx_zeta.from_pretrained(path, dtype=dtype)
    assert all(v.dtype == getattr(mx, dtype) for _, v in tree_flatten(model.parameters()))
    ids, dec, mask = inputs()
    ref = hf_forward(hf, ids, dec, mask)
    err = assert_close(model(mx.array(ids), mx.array(dec), mx.array(mask)), ref.logits, dtype=dtype,
                       what=f"{case} {dtype} logits")
    print(f"{case} {dtype}: max |logits diff| {err:.2e} (max |logit| {float(ref.logits.abs().max()):.2f})")


@pytest.mark.parametrize("case", ["v1-relu-tied", UNTIED])
def test_save_pretrained_reload_is_identical(case, tmp_path):
    hf, path = make(case, tmp_path / "hf")
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    out = mlx_zeta.save_pretrained(model, tmp_path / "ours")
    saved = load_state_dict(out)
    assert ("lm_head.weight" in saved) == (case == UNTIED)
    assert not any(".block." in k for k in saved)  # our names, no conversion on reload
    again = mlx_zeta.from_pretrained(out)
    ids, dec, mask = (mx.array(a) for a in inputs())
    assert mx.array_equal(model(ids, dec, mask), again(ids, dec, mask))
    assert_close(again(ids, dec, mask), hf_forward(hf, *(np.array(a) for a in (ids, dec, mask))).logits,
                 what="reloaded logits")


def test_sanitize_is_pure_and_idempotent(tmp_path):
    _, path = make(UNTIED, tmp_path / "m")
    args = t5_conv.ModelArgs.from_dict(json.loads((path / "config.json").read_text()))
    raw = load_state_dict(path)
    # what older checkpoints also hold: embed_tokens copies of shared, an unused cross-attention table
    raw["encoder.embed_tokens.weight"] = raw["decoder.embed_tokens.weight"] = raw["shared.weight"]
    raw["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = mx.zeros((8, 4))
    once = check_sanitize(t5_conv, path, raw)
    # shared missing: an embed_tokens copy stands in; an untied head missing: shared (as transformers ties it)
    partial = {k: v for k, v in raw.items() if k not in ("shared.weight", "lm_head.weight")}
    fixed = t5_conv.sanitize(partial, args)
    assert fixed["shared.weight"] is raw["encoder.embed_tokens.weight"]
    assert fixed["lm_head.weight"] is fixed["shared.weight"]
    assert set(fixed) == set(once)


def test_layouts_gated_ff_value_first_and_position_table(tmp_path):
    """FeedForward's GLU takes the value half first: proj_in = [wi_1; wi_0], so h = wi_1 x * gelu_new(wi_0 x);
    the relative position tables keep transformers' (num_buckets, heads) layout."""
    hf, path = make(UNTIED, tmp_path / "m")
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    dense = hf.decoder.block[2].layer[2].DenseReluDense
    w = np.array(model.decoder.layers[2].ff.proj_in.weight)
    np.testing.assert_array_equal(w[:96], dense.wi_1.weight.detach().numpy())
    np.testing.assert_array_equal(w[96:], dense.wi_0.weight.detach().numpy())
    for ours, stack in ((model.encoder, hf.encoder), (model.decoder, hf.decoder)):
        table = stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight.detach().numpy()
        np.testing.assert_array_equal(np.array(ours.rel_pos.relative_attention_bias.weight), table)
    assert model.encoder.rel_pos.bidirectional and not model.decoder.rel_pos.bidirectional


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (64, 256), (6, 5)])
def test_relative_position_buckets_equal_transformers(num_buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-600, 601)
    for bidirectional in (True, False):
        ref = T5Attention._relative_position_bucket(torch.tensor(rel), bidirectional, num_buckets, max_distance)
        ours = relative_position_bucket(mx.array(rel), bidirectional, num_buckets, max_distance)
        np.testing.assert_array_equal(np.array(ours), ref.numpy())


def test_cached_decoding_equals_full_decode(tmp_path):
    _, path = make(UNTIED, tmp_path / "m")
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    ids, dec, mask = (mx.array(a) for a in inputs())
    context = model.encode(ids, mask)
    full = model.decode(dec, context, mask)
    cache = model.make_cache()
    steps = [model.decode(dec[:, :4], context, mask, cache)]  # a prefill, then one token at a time
    steps += [model.decode(dec[:, t:t + 1], context, mask, cache) for t in range(4, dec.shape[1])]
    assert_close(mx.concatenate(steps, axis=1), full, what="cached decoding")


def test_greedy_generation_equals_transformers_token_for_token(tmp_path):
    hf, path = make(UNTIED, tmp_path / "m")
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    ids, _, mask = inputs()

    def reference(**kw):  # use_cache=False: transformers' cache is sized by the encoder depth here
        with torch.no_grad():
            return hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=20,
                               do_sample=False, use_cache=False, **kw).numpy()

    ours = np.array(model.generate(mx.array(ids), 20, mx.array(mask)))
    np.testing.assert_array_equal(ours, reference())
    assert len(set(ours[:, 1:].ravel().tolist())) > 10  # a real sequence, not one repeated token
    # an end token met mid-way in the first row: that row is padded afterwards, the others go on
    eos = int(ours[0, 4])
    stopped = np.array(model.generate(mx.array(ids), 20, mx.array(mask), eos_token_id=eos))
    np.testing.assert_array_equal(stopped, reference(eos_token_id=eos))
    first = list(stopped[0]).index(eos, 1)
    assert (stopped[0, first + 1:] == 0).all() and first + 1 < stopped.shape[1]


def test_sampling_and_streaming_share_autoregressive_machinery(tmp_path):
    """T5 decodes through decode_steps: top_k=1 sampling at any temperature is transformers' greedy
    output; stream() yields generate()'s tokens one step at a time; the samplers' argument checks apply."""
    hf, path = make(UNTIED, tmp_path / "m")
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    ids, _, mask = inputs()
    with torch.no_grad():
        greedy = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=12,
                             do_sample=False, use_cache=False).numpy()
    sampled = model.generate(mx.array(ids), 12, mx.array(mask), temperature=1.7, top_k=1, key=mx.random.key(3))
    np.testing.assert_array_equal(np.array(sampled), greedy)
    key = mx.random.key(5)
    whole = np.array(model.generate(mx.array(ids), 12, mx.array(mask), temperature=1.0, key=key))
    steps = np.stack([np.array(t) for t in model.stream(mx.array(ids), 12, mx.array(mask), temperature=1.0, key=key)],
                     axis=1)
    np.testing.assert_array_equal(whole[:, 1:], steps)
    assert not np.array_equal(whole, greedy[:, :whole.shape[1]])  # temperature 1 without filters: really sampled
    with pytest.raises(ValueError, match=r"^\[T5Model\] expected top_p to be a number with 0 < top_p <= 1"):
        model.generate(mx.array(ids), 4, top_p=1.5)


@pytest.mark.parametrize("case", ["v1-relu-tied", UNTIED])
def test_loss_gradients_match_torch_autograd(case, tmp_path):
    """Teacher-forced cross-entropy (labels with ignored -100 positions): loss within 1e-5 and gradients
    within 1e-4 * max(1, max |grad|) of torch autograd through transformers."""
    hf, path = make(case, tmp_path / "m")
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    ids, labels, mask = inputs(seed=2)
    labels[0, -2:] = -100
    loss_ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels)).loss
    loss_ref.backward()
    target, keep = mx.array(np.where(labels < 0, 0, labels)), mx.array(labels >= 0)

    def loss_fn(m):
        logits = m(mx.array(ids), m.shift_right(mx.array(labels)), mx.array(mask))
        return (nn.losses.cross_entropy(logits, target) * keep).sum() / keep.sum()

    loss, grads = nn.value_and_grad(model, loss_fn)(model)
    assert abs(loss.item() - loss_ref.item()) < 1e-5
    g = dict(tree_flatten(grads))
    dense = hf.encoder.block[1].layer[1].DenseReluDense
    wi = torch.cat([dense.wi_1.weight.grad, dense.wi_0.weight.grad]) if case == UNTIED else dense.wi.weight.grad
    pairs = [("shared.weight", hf.shared.weight.grad),  # encoder and decoder inputs (and the tied head)
             ("encoder.rel_pos.relative_attention_bias.weight",
              hf.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.grad),
             ("decoder.rel_pos.relative_attention_bias.weight",
              hf.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.grad),
             ("decoder.layers.1.cross_attn.to_k.weight", hf.decoder.block[1].layer[1].EncDecAttention.k.weight.grad),
             ("encoder.layers.1.ff.proj_in.weight", wi),
             ("decoder.final_norm.weight", hf.decoder.final_layer_norm.weight.grad)]
    if case == UNTIED:
        pairs.append(("lm_head.weight", hf.lm_head.weight.grad))
    assert_grads_close(g, pairs)


# --------------------------------------------------------------------------- errors


def _with_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_unsupported_configs_are_named(tmp_path):
    _, path = make("v1-relu-tied", tmp_path / "m")
    for proj in ("gated-mish", "relu-gated", "gated-gelu-new"):
        with pytest.raises(ValueError, match=rf"unsupported feed_forward_proj '{proj}'; expected 'relu' .*gated-gelu"):
            mlx_zeta.from_pretrained(_with_config(path, feed_forward_proj=proj))
    with pytest.raises(ValueError, match=r"expected a checkpoint of T5ForConditionalGeneration.*T5EncoderModel"):
        mlx_zeta.from_pretrained(_with_config(path, feed_forward_proj="relu", architectures=["T5EncoderModel"]))
    with pytest.raises(ValueError, match=r"expected model_type in \('t5',\), got 'mt5'"):
        t5_conv.ModelArgs(model_type="mt5")


def test_missing_unexpected_and_inconsistent_weights_are_named(tmp_path):
    _, path = make(UNTIED, tmp_path / "m")
    weights = load_state_dict(path)
    config = json.loads((path / "config.json").read_text())

    def write(ws, name, **changes):
        folder = tmp_path / name
        folder.mkdir()
        mx.save_safetensors(str(folder / "model.safetensors"), ws)
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
        return folder

    dropped = {k: v for k, v in weights.items() if k != "decoder.block.1.layer.1.EncDecAttention.k.weight"}
    with pytest.raises(ValueError, match=r"decoder\.layers\.1\.cross_attn\.to_k\.weight"):
        mlx_zeta.from_pretrained(write(dropped, "missing"))
    extra = {**weights, "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight": mx.zeros((8, 4))}
    with pytest.raises(ValueError, match=r"encoder\.block\.1\.layer\.0\.SelfAttention\.relative_attention_bias"):
        mlx_zeta.from_pretrained(write(extra, "unexpected"))
    half = {k: v for k, v in weights.items() if k != "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"}
    with pytest.raises(ValueError, match=r"encoder\.block\.0\.layer\.1\.DenseReluDense\.wi_0\.weight is missing"):
        mlx_zeta.from_pretrained(write(half, "half"))
    with pytest.raises(ValueError, match=r"lm_head\.weight differs from shared\.weight, but the config ties them"):
        mlx_zeta.from_pretrained(write(weights, "tied", scale_decoder_outputs=True))


def test_call_errors_are_named(tmp_path):
    _, path = make("v1-relu-tied", tmp_path / "m")
    model = mlx_zeta.from_pretrained(path, dtype="float32")
    ids, dec, mask = (mx.array(a) for a in inputs())
    with pytest.raises(ValueError, match=r"expected attention_mask of shape \(3, 13\)"):
        model(ids, dec, mask[:, :5])
    with pytest.raises(ValueError, match=r"expected decoder_input_ids as integer tokens"):
        model(ids, dec.astype(mx.float32))
    with pytest.raises(ValueError, match=r"expected max_new_tokens to be an int >= 1, got 0"):
        model.generate(ids, 0)
