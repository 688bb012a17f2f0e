"""Transformer (mlx_zeta.structs.transformer): parity of logits and every parameter
gradient with the torch reference (tests/reference/structs.py), KV-cached decoding
against full recomputation at every step, dropout, and argument validation."""

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core loads)
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from parity import assert_close, check_parity
from reference.structs import TorchAttentionLayers, TorchTransformer

from mlx_zeta.structs import CrossAttender, Decoder, Encoder, RotatingKVCache, Transformer

DIM, DEPTH, VOCAB, B, N, MAX_LEN = 32, 2, 50, 2, 12, 80
PRESETS = {"decoder": (Decoder, True), "encoder": (Encoder, False), "cross": (CrossAttender, False)}


def build(preset: str, layer_kw: dict, **tf_kw):
    """The MLX Transformer and its torch twin (same options; weights copied by check_parity)."""
    cls, causal = PRESETS[preset]
    layer_kw = dict(dim=DIM, depth=DEPTH, heads=4, **layer_kw)
    model = Transformer(num_tokens=VOCAB, max_seq_len=MAX_LEN, attn_layers=cls(**layer_kw), **tf_kw)
    if preset == "cross":
        layer_kw.update(cross_attend=True, only_cross=True)
    tf_kw.pop("emb_dropout", None)
    ref = TorchTransformer(VOCAB, MAX_LEN, TorchAttentionLayers(causal=causal, **layer_kw), DIM,
                           use_abs_pos_emb="pos_emb" in model, **{k: v for k, v in tf_kw.items() if k != "use_abs_pos_emb"})
    return model, ref


def tokens(rng, n=N, b=B):
    return rng.integers(0, VOCAB, (b, n)).astype(np.int32)


# Parameter gradients of a whole model reach |g| ~ 20 (sums over 2 x 12 positions through
# the 50-way head), so an element near 0 carries an absolute error of a few eps x 20
# (summation order in float32, rounding in float16): gradient tolerances are widened x5
# in both dtypes; outputs keep the stated tolerances.
GRAD_SCALE = 5
ALL_ON = dict(rotary_pos_emb=True, attn_kv_heads=2, attn_qk_norm=True, use_rmsnorm=True, ff_glu=True)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16], ids=str)
def test_decoder_all_options_on_parity(rng, dtype):
    """Rotary + GQA + qk-norm + RMSNorm + GLU together, logits and all parameter gradients."""
    model, ref = build("decoder", ALL_ON)
    assert "pos_emb" not in model  # rotary disables the absolute embedding (x-transformers' rule)
    check_parity(model, ref, [tokens(rng)], dtype=dtype, grad_scale=GRAD_SCALE)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16], ids=str)
def test_encoder_t5_relative_bias_parity(rng, dtype):
    """One T5 bias table shared by both layers (bidirectional buckets), with key padding."""
    model, ref = build("encoder", dict(rel_pos_bias=True, rel_pos_num_buckets=8, rel_pos_max_distance=16))
    assert [k for k in dict(model.attn_layers.parameters()) if k == "rel_pos"] == ["rel_pos"]
    pad = np.ones((B, N), bool)
    pad[1, -4:] = False
    check_parity(model, ref, [tokens(rng), pad], dtype=dtype, grad_scale=GRAD_SCALE,
                 mlx_call=lambda m, x, p: m(x, mask=p), torch_call=lambda m, x, p: m(x, mask=p))


# name: preset, layer options, transformer options, extra inputs
CASES = {
    "alibi": ("decoder", dict(alibi_pos_bias=True), {}, ()),
    "absolute_post_norm_scalenorm": ("decoder", dict(pre_norm=False, use_scalenorm=True), {}, ()),
    "xpos_interpolated": ("decoder", dict(rotary_pos_emb=True, rotary_xpos=True, rotary_xpos_scale_base=4,
                                          rotary_base=100, rotary_interpolation_factor=2.0, rotary_emb_dim=8), {}, ()),
    "sliding_window_rotary": ("decoder", dict(sliding_window=4, rotary_pos_emb=True, attn_kv_heads=1), {}, ()),
    "sliding_window_encoder_relu2": ("encoder", dict(sliding_window=3, ff_relu_squared=True, ff_mult=2), {}, ()),
    "cross_attend": ("decoder", dict(cross_attend=True, rotary_pos_emb=True, ff_swiglu=True, ff_post_act_ln=True),
                     {}, ("context",)),
    "cross_attender_tied_post_emb_norm": ("cross", dict(attn_bias=True, ff_no_bias=True),
                                          dict(tie_embedding=True, post_emb_norm=True), ("context",)),
    "emb_dim_logits_dim_prepend": ("decoder", dict(alibi_pos_bias=True, ff_swish=True),
                                   dict(emb_dim=24, logits_dim=7), ("prepend",)),
    "absolute_prepend_mask": ("decoder", dict(attn_dim_head=12), {}, ("prepend", "mask")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_option_parity(rng, case):
    preset, layer_kw, tf_kw, extras = CASES[case]
    model, ref = build(preset, layer_kw, **tf_kw)
    names, xs = ["x"], [tokens(rng)]
    if "context" in extras:  # 5 context positions, the second sequence pads the last 2
        names += ["context", "context_mask"]
        cmask = np.ones((B, 5), bool)
        cmask[1, -2:] = False
        xs += [rng.standard_normal((B, 5, DIM)).astype(np.float32), cmask]
    if "prepend" in extras:
        names.append("prepend_embeds")
        xs.append(rng.standard_normal((B, 3, tf_kw.get("emb_dim", DIM))).astype(np.float32))
    if "mask" in extras:
        names.append("mask")
        pad = np.ones((B, N), bool)
        pad[0, -5:] = False
        xs.append(pad)
    call = lambda m, *a: m(**dict(zip(names, a)))  # noqa: E731
    check_parity(model, ref, xs, mlx_call=call, torch_call=call, grad_scale=GRAD_SCALE)


def test_return_embeddings_equals_stack_output(rng):
    model, ref = build("decoder", dict(alibi_pos_bias=True), post_emb_norm=True, tie_embedding=True)
    x = tokens(rng)
    check_parity(model, ref, [x], mlx_call=lambda m, x: m(x, return_embeddings=True),
                 torch_call=lambda m, x: m(x, return_embeddings=True), grad_scale=GRAD_SCALE)
    emb = model(mx.array(x), return_embeddings=True)
    assert_close(emb @ model.token_emb.weight.T, model(mx.array(x)), what="tied logits = embeddings @ E^T")


@pytest.mark.parametrize("kw", [dict(layer=dict(rotary_pos_emb=True, attn_kv_heads=2)),
                                dict(layer=dict(alibi_pos_bias=True), tie_embedding=True, prefix=True)])
def test_last_only_equals_the_last_row(rng, kw):
    """``last_only=True`` gives the last row of the full output (logits or embeddings), with and
    without a cache, with a prefix; the cache then holds every position as after a full call."""
    kw = dict(kw)
    layer, prefix = kw.pop("layer"), kw.pop("prefix", False)
    model = Transformer(num_tokens=VOCAB, max_seq_len=MAX_LEN, attn_layers=Decoder(dim=DIM, depth=DEPTH, heads=4,
                                                                                    **layer), **kw)
    x = mx.array(tokens(rng))
    extra = dict(prepend_embeds=mx.array(rng.standard_normal((B, 3, DIM)).astype(np.float32))) if prefix else {}
    for out in (dict(), dict(return_embeddings=True)):
        full = model(x, **extra, **out)
        got = model(x, **extra, **out, last_only=True)
        assert got.shape == (B, 1, full.shape[-1])
        assert_close(got, full[:, -1:], what=f"last_only {out}")
    cache, whole = model.make_cache(), model.make_cache()
    assert_close(model(x, cache=cache, last_only=True, **extra), model(x, cache=whole, **extra)[:, -1:], what="cached")
    step = x[:, :1]
    assert_close(model(step, cache=cache), model(step, cache=whole), what="step after a last_only prefill")


# ------------------------------------------------------------------ KV-cached decoding

DECODE_CASES = {
    "rotary": dict(rotary_pos_emb=True, attn_kv_heads=2, attn_qk_norm=True),
    "rotary_xpos": dict(rotary_pos_emb=True, rotary_xpos=True, rotary_xpos_scale_base=16),
    "alibi": dict(alibi_pos_bias=True),
    "t5": dict(rel_pos_bias=True, rel_pos_num_buckets=8, rel_pos_max_distance=32),
    "absolute": dict(),
    "sliding_window_rotary": dict(sliding_window=8, rotary_pos_emb=True, attn_kv_heads=2),
    "sliding_window_t5": dict(sliding_window=5, rel_pos_bias=True, rel_pos_num_buckets=8, rel_pos_max_distance=32),
    "sliding_window_alibi_absolute": dict(sliding_window=6, alibi_pos_bias=True),
}


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_kv_cache_decoding_equals_full_recompute_every_step(rng, case):
    """Prefill 12 tokens (longer than every window), then feed 52 tokens one at a time:
    at every step the cached logits equal the last row of a full forward over the
    whole prefix (which applies the same sliding-window mask), max |diff| <= 1e-4."""
    model = Transformer(num_tokens=VOCAB, max_seq_len=MAX_LEN,
                        attn_layers=Decoder(dim=DIM, depth=DEPTH, heads=4, **DECODE_CASES[case]))
    model.eval()
    seq, prompt = mx.array(tokens(rng, 64)), 12
    cache = model.make_cache()
    window = DECODE_CASES[case].get("sliding_window")
    assert all(isinstance(c, RotatingKVCache) for c in cache) == (window is not None)
    got = model(seq[:, :prompt], cache=cache)
    assert np.abs(np.array(got - model(seq[:, :prompt]))).max() <= 1e-4
    for t in range(prompt, 64):
        step = model(seq[:, t : t + 1], cache=cache)[:, -1]
        full = model(seq[:, : t + 1])[:, -1]
        assert np.abs(np.array(step - full)).max() <= 1e-4, f"step {t}"
        if window is not None:
            assert cache[0].size == window  # only the window is kept
    assert all(c.offset == 64 for c in cache)


def test_kv_cache_with_prepend_embeds_and_absolute_positions(rng):
    """Prefix embeddings on the prefill call only; later tokens continue the positions."""
    model = Transformer(num_tokens=VOCAB, max_seq_len=MAX_LEN, attn_layers=Decoder(dim=DIM, depth=DEPTH, heads=4))
    seq = mx.array(tokens(rng, 10))
    prefix = mx.array(rng.standard_normal((B, 3, DIM)).astype(np.float32))
    full = model(seq, prepend_embeds=prefix)
    cache = model.make_cache()
    outs = [model(seq[:, :4], prepend_embeds=prefix, cache=cache)]
    outs += [model(seq[:, t : t + 1], cache=cache) for t in range(4, 10)]
    assert_close(mx.concatenate(outs, axis=1), full, what="cached decode with prefix")


def test_kv_cache_left_padded_batch(rng):
    """A left-padded batch decodes with masks over every position so far and matches the
    full forward with the same padding on the real positions."""
    model = Transformer(num_tokens=VOCAB, max_seq_len=MAX_LEN,
                        attn_layers=Decoder(dim=DIM, depth=DEPTH, heads=4, rotary_pos_emb=True))
    seq = mx.array(tokens(rng, 10))
    pad = np.ones((B, 10), bool)
    pad[0, :3] = False
    pad = mx.array(pad)
    full = model(seq, mask=pad)
    cache = model.make_cache()
    outs = [model(seq[:, :5], mask=pad[:, :5], cache=cache)]
    outs += [model(seq[:, t : t + 1], mask=pad[:, : t + 1], cache=cache) for t in range(5, 10)]
    got = mx.concatenate(outs, axis=1)
    assert_close(got[0, 3:], full[0, 3:], what="padded row")
    assert_close(got[1], full[1], what="unpadded row")


# ------------------------------------------------------------------ dropout and errors


def test_dropout_train_vs_eval(rng):
    kw = dict(dim=DIM, depth=DEPTH, heads=4, rotary_pos_emb=True)
    drop = Transformer(num_tokens=VOCAB, max_seq_len=MAX_LEN, emb_dropout=0.3,
                       attn_layers=Decoder(attn_dropout=0.3, ff_dropout=0.3, **kw))
    plain = Transformer(num_tokens=VOCAB, max_seq_len=MAX_LEN, attn_layers=Decoder(**kw))
    plain.load_weights(tree_flatten(drop.parameters()))
    x = mx.array(tokens(rng))
    drop.train()
    a, b = drop(x), drop(x)
    assert np.abs(np.array(a - plain(x))).max() > 1e-2 and np.abs(np.array(a - b)).max() > 1e-2
    drop.eval()
    assert_close(drop(x), plain(x), what="eval mode = no dropout")


def test_transformer_errors():
    dec = Decoder(dim=DIM, depth=1, heads=4)
    model = Transformer(num_tokens=VOCAB, max_seq_len=16, attn_layers=dec)
    x = mx.zeros((B, 5), dtype=mx.int32)
    with pytest.raises(ValueError, match=r"^\[Transformer\] expected integer tokens of shape \(batch, seq\), got shape \(2, 5, 3\)"):
        model(mx.zeros((B, 5, 3), dtype=mx.int32))
    with pytest.raises(ValueError, match=r"^\[Transformer\] expected integer tokens .* dtype mlx.core.float32"):
        model(mx.zeros((B, 5)))
    with pytest.raises(ValueError, match=r"^\[Transformer\] expected prepend_embeds of shape \(2, prefix_len, 32\), got shape \(2, 3, 8\)"):
        model(x, prepend_embeds=mx.zeros((B, 3, 8)))
    with pytest.raises(ValueError, match=r"^\[Transformer\] expected mask of shape \(2, 5\) over the tokens or \(2, 5\)"):
        model(x, mask=mx.ones((B, 4), dtype=mx.bool_))
    with pytest.raises(ValueError, match=r"^\[Transformer\] expected at most max_seq_len=16 positions .* got 20"):
        model(mx.zeros((B, 20), dtype=mx.int32))
    with pytest.raises(ValueError, match=r"^\[Transformer\] expected emb_dim == dim and logits_dim == num_tokens with tie_embedding"):
        Transformer(num_tokens=VOCAB, max_seq_len=16, attn_layers=dec, tie_embedding=True, emb_dim=16)
    with pytest.raises(ValueError, match=r"^\[Transformer\] expected attn_layers to be an AttentionLayers, got dict"):
        Transformer(num_tokens=VOCAB, max_seq_len=16, attn_layers={})
    with pytest.raises(ValueError, match=r"^\[Transformer\] expected num_tokens to be an int >= 1, got 0"):
        Transformer(num_tokens=0, max_seq_len=16, attn_layers=dec)
    with pytest.raises(ValueError, match=r"^\[Transformer\] expected 0 <= emb_dropout < 1, got 1.0"):
        Transformer(num_tokens=VOCAB, max_seq_len=16, attn_layers=dec, emb_dropout=1.0)
    with pytest.raises(ValueError, match=r"^\[AttentionLayers\] unknown option\(s\) \['ff_bogus', 'rotary_bogus'\]"):
        Transformer(num_tokens=VOCAB, max_seq_len=16,
                    attn_layers=Decoder(dim=DIM, depth=1, rotary_bogus=True, ff_bogus=1))


@pytest.mark.parametrize("kw", [dict(rotary_pos_emb=True, attn_kv_heads=2, attn_qk_norm=True), dict()],
                         ids=["rotary-gqa-qknorm", "absolute"])
def test_static_kv_cache_equals_recompute_and_compiles(kw):
    """StaticKVCache (fixed capacity, position as an array): prefill 5 + decode 7 equals the
    full forward; a decode step compiled once (static shapes, position traced) gives the same
    logits at every step."""
    from mlx_zeta.nn import StaticKVCache

    mx.random.seed(0)
    model = Transformer(num_tokens=50, max_seq_len=64, attn_layers=Decoder(dim=32, depth=2, heads=4, **kw))
    x = mx.random.randint(0, 50, (2, 12))
    full = model(x)
    cache = model.make_cache(capacity=16)
    steps = [model(x[:, :5], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(5, 12)]
    assert_close(mx.concatenate(steps, axis=1), full, what="static cache vs full")
    assert cache[0].offset.item() == 12 and cache[0].keys.shape == (2, 4 if "attn_kv_heads" not in kw else 2, 16, 8)

    cache = model.make_cache(capacity=16)
    model(x[:, :5], cache=cache)
    state = [c.keys for c in cache] + [c.values for c in cache] + [cache[0].offset]

    @mx.compile
    def step(token, k0, k1, v0, v1, offset):
        layers = [StaticKVCache(16, k, v, offset) for k, v in ((k0, v0), (k1, v1))]
        return (model(token, cache=layers), *(c.keys for c in layers), *(c.values for c in layers), layers[0].offset)

    outs = []
    for t in range(5, 12):
        out, *state = step(x[:, t:t + 1], *state)
        outs.append(out)
    assert_close(mx.concatenate(outs, axis=1), full[:, 5:], what="compiled static decode")
    with pytest.raises(ValueError, match=r"no mask with a StaticKVCache"):
        model(x[:, :1], mask=mx.ones((2, 1), mx.bool_), cache=model.make_cache(capacity=16))
    with pytest.raises(ValueError, match=r"static cache \(capacity=\) needs a causal stack without ALiBi"):
        Decoder(dim=32, depth=1, heads=4, alibi_pos_bias=True).make_cache(capacity=8)
