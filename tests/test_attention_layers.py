"""AttentionLayers / Encoder / Decoder / CrossAttender and RotatingKVCache: parity with
the torch reference (tests/reference/structs.py) on float inputs (input and parameter
gradients), the sliding window's receptive field from the Jacobian, cached decoding
with key padding, the rotating cache by hand, option routing and validation."""

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core loads)
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from parity import assert_close, check_parity
from reference.structs import TorchAttentionLayers

from mlx_zeta.nn import KVCache, RMSNorm, ScaleNorm
from mlx_zeta.structs import AttentionLayers, CrossAttender, Decoder, Encoder, RotatingKVCache

DIM, B, N = 32, 2, 10
# Stack gradients (sums over 2 x 10 positions, |g| up to ~10) differ by summation order:
# gradient tolerance x3 in float32, x5 in float16; outputs keep the stated tolerances.
GRAD_SCALE = {mx.float32: 3, mx.float16: 5}

# name: layer options (dim, depth, heads added), extra call inputs
CASES = {
    "decoder_rotary_gqa_qknorm_rms_glu_mask": (dict(causal=True, rotary_pos_emb=True, attn_kv_heads=2, attn_qk_norm=True,
                                                    use_rmsnorm=True, ff_glu=True), ("mask",)),
    "encoder_t5_mask": (dict(rel_pos_bias=True, rel_pos_num_buckets=8, rel_pos_max_distance=16), ("mask",)),
    "decoder_alibi_post_norm": (dict(causal=True, alibi_pos_bias=True, pre_norm=False), ()),
    "encoder_scalenorm_relu2_attn_bias": (dict(use_scalenorm=True, ff_relu_squared=True, attn_bias=True), ()),
    "decoder_window_cross_swiglu": (dict(causal=True, sliding_window=3, cross_attend=True, ff_swiglu=True,
                                         ff_glu_mult_bias=True), ("context",)),
    "only_cross_post_norm": (dict(cross_attend=True, only_cross=True, pre_norm=False, attn_kv_heads=1), ("context",)),
}


def inputs(rng, extras):
    names, xs = ["x"], [rng.standard_normal((B, N, DIM)).astype(np.float32)]
    if "mask" in extras:  # the second sequence pads its last 3 positions
        pad = np.ones((B, N), bool)
        pad[1, -3:] = False
        names.append("mask")
        xs.append(pad)
    if "context" in extras:
        cmask = np.ones((B, 6), bool)
        cmask[0, -2:] = False
        names += ["context", "context_mask"]
        xs += [rng.standard_normal((B, 6, DIM)).astype(np.float32), cmask]
    return names, xs


@pytest.mark.parametrize("case", list(CASES))
def test_attention_layers_parity(rng, case):
    kw, extras = CASES[case]
    kw = dict(dim=DIM, depth=2, heads=4, **kw)
    names, xs = inputs(rng, extras)
    call = lambda m, *a: m(**dict(zip(names, a)))  # noqa: E731
    check_parity(AttentionLayers(**kw), TorchAttentionLayers(**kw), xs, mlx_call=call, torch_call=call,
                 grad_scale=GRAD_SCALE[mx.float32])


def test_attention_layers_parity_float16(rng):
    kw = dict(dim=DIM, depth=2, heads=4, causal=True, rotary_pos_emb=True, rotary_xpos=True, attn_kv_heads=2,
              use_rmsnorm=True, ff_swiglu=True)
    check_parity(AttentionLayers(**kw), TorchAttentionLayers(**kw), [rng.standard_normal((B, N, DIM)).astype(np.float32)],
                 dtype=mx.float16, grad_scale=GRAD_SCALE[mx.float16])


def test_presets_and_structure():
    dec = Decoder(dim=DIM, depth=2, heads=4, cross_attend=True)
    assert dec.causal and not Encoder(dim=DIM, depth=1).causal
    names = {k for k, _ in tree_flatten(dec.parameters())}
    assert {"layers.0.attn.to_q.weight", "layers.1.cross_attn.to_k.weight", "layers.0.ff_norm.weight",
            "final_norm.bias"} <= names
    ca = CrossAttender(dim=DIM, depth=2)
    assert ca.make_cache() == [] and not any(k.startswith("layers.0.attn.") for k, _ in tree_flatten(ca.parameters()))
    post = AttentionLayers(dim=DIM, depth=1, pre_norm=False, use_scalenorm=True)
    assert "final_norm" not in post and isinstance(post.layers[0].attn_norm, ScaleNorm)
    assert isinstance(AttentionLayers(dim=DIM, depth=1, use_rmsnorm=True).final_norm, RMSNorm)
    # routed extras reach the blocks: projection biases, post-activation LayerNorm
    routed = AttentionLayers(dim=DIM, depth=1, attn_bias=True, ff_post_act_ln=True, ff_mult=2)
    assert "bias" in routed.layers[0].attn.to_q and "norm" in routed.layers[0].ff
    assert routed.layers[0].ff.inner_dim == 64
    assert [type(c) for c in Decoder(dim=DIM, depth=2).make_cache()] == [KVCache, KVCache]
    windowed = Decoder(dim=DIM, depth=2, sliding_window=5).make_cache()
    assert [type(c) for c in windowed] == [RotatingKVCache] * 2 and windowed[0].max_size == 5


@pytest.mark.parametrize("causal", [True, False])
def test_sliding_window_receptive_field(rng, causal):
    """One layer with window w: output i depends on input j exactly when i - w < j <= i
    (causal) or |i - j| < w; read off the Jacobian of each output row."""
    w, n = 3, 8
    layer = AttentionLayers(dim=DIM, depth=1, heads=4, causal=causal, sliding_window=w)
    x = mx.array(rng.standard_normal((1, n, DIM)).astype(np.float32))
    cot = mx.array(rng.standard_normal((DIM,)).astype(np.float32))  # not all-ones: LayerNorm rows sum to 0
    for i in range(n):
        g = mx.grad(lambda x: (layer(x)[0, i] * cot).sum())(x)
        seen = np.abs(np.array(g[0])).sum(-1) > 0
        j = np.arange(n)
        want = ((j <= i) & (j > i - w)) if causal else np.abs(i - j) < w
        np.testing.assert_array_equal(seen, want, err_msg=f"row {i}")


def test_cached_decoding_with_key_padding(rng):
    """Left-padded batch: a cached decode whose masks cover every position so far equals
    the full forward with the same padding mask. A mask over the new positions only
    counts the cached ones as kept: it agrees on the unpadded row only."""
    layers = Decoder(dim=DIM, depth=2, heads=4, rotary_pos_emb=True, alibi_pos_bias=True)
    n, prompt = 9, 4
    x = mx.array(rng.standard_normal((B, n, DIM)).astype(np.float32))
    pad = np.ones((B, n), bool)
    pad[1, :2] = False  # second sequence starts with 2 padding positions
    pad = mx.array(pad)
    full = layers(x, mask=pad)
    got = {}
    for mask_len in ("all", "new"):
        cache = layers.make_cache()
        outs = [layers(x[:, :prompt], mask=pad[:, :prompt], cache=cache)]
        for t in range(prompt, n):
            m = pad[:, : t + 1] if mask_len == "all" else pad[:, t : t + 1]
            outs.append(layers(x[:, t : t + 1], mask=m, cache=cache))
        got[mask_len] = mx.concatenate(outs, axis=1)
    assert_close(got["all"][0], full[0], what="unpadded row")
    assert_close(got["all"][1, 2:], full[1, 2:], what="padded row, real positions")
    assert_close(got["new"][0], full[0], what="unpadded row, masks over new positions")
    assert np.abs(np.array(got["new"][1, prompt:] - full[1, prompt:])).max() > 1e-3  # padding forgotten


def test_rotating_kv_cache_by_hand():
    """Positions 0..9 in chunks of 4, 1, 5 with max_size 3: each fetch returns the kept
    positions then the new ones; afterwards only the last 3 are stored."""
    pos = mx.arange(10, dtype=mx.float32).reshape(1, 1, 10, 1)
    cache = RotatingKVCache(max_size=3)
    seen = []
    for lo, hi in ((0, 4), (4, 5), (5, 10)):
        k, v = cache.update_and_fetch(pos[:, :, lo:hi], -pos[:, :, lo:hi])
        seen.append((np.array(k).ravel().tolist(), cache.offset, cache.size))
        assert np.array_equal(np.array(v), -np.array(k))
    assert seen == [([0, 1, 2, 3], 4, 3), ([1, 2, 3, 4], 5, 3), ([2, 3, 4, 5, 6, 7, 8, 9], 10, 3)]
    assert np.array(cache.state[0]).ravel().tolist() == [7, 8, 9]
    cache.reset()
    assert cache.offset == 0 and cache.size == 0 and cache.state == (None, None)
    with pytest.raises(ValueError, match=r"^\[RotatingKVCache\] expected max_size to be an int >= 1, got 0"):
        RotatingKVCache(0)
    with pytest.raises(ValueError, match=r"^\[RotatingKVCache\] expected keys and values of shape \(batch, kv_heads, seq, dim\)"):
        cache.update_and_fetch(mx.zeros((1, 2, 8)), mx.zeros((1, 2, 8)))
    cache.update_and_fetch(mx.zeros((1, 2, 1, 8)), mx.zeros((1, 2, 1, 8)))
    with pytest.raises(ValueError, match=r"^\[RotatingKVCache\] expected \(batch, kv_heads\), key dim, value dim"):
        cache.update_and_fetch(mx.zeros((1, 2, 1, 4)), mx.zeros((1, 2, 1, 8)))


def test_dropout_in_training_only(rng):
    drop = AttentionLayers(dim=DIM, depth=2, heads=4, attn_dropout=0.4, ff_dropout=0.4)
    plain = AttentionLayers(dim=DIM, depth=2, heads=4)
    plain.load_weights(tree_flatten(drop.parameters()))
    x = mx.array(rng.standard_normal((B, N, DIM)).astype(np.float32))
    drop.train()
    assert np.abs(np.array(drop(x) - plain(x))).max() > 1e-2
    drop.eval()
    assert_close(drop(x), plain(x), what="eval mode = no dropout")


def test_option_errors():
    def err(match, **kw):
        with pytest.raises(ValueError, match=match):
            AttentionLayers(**{"dim": DIM, "depth": 1, **kw})

    err(r"^\[AttentionLayers\] unknown option\(s\) \['attn_bogus', 'use_foo'\]; besides the named arguments, accepted: "
        r"\['attn_bias', 'attn_out_bias', 'attn_qk_norm_eps', 'attn_scale', 'ff_custom_act'", attn_bogus=1, use_foo=True)
    err(r"^\[AttentionLayers\] unknown option\(s\) \['ff_dim_out'\]", ff_dim_out=8)  # would break the residual
    err(r"^\[AttentionLayers\] expected dim to be an int >= 1, got 0", dim=0)
    err(r"^\[AttentionLayers\] expected depth to be an int >= 1, got 0", depth=0)
    err(r"^\[AttentionLayers\] expected sliding_window to be an int >= 1, got 0", sliding_window=0)
    err(r"^\[AttentionLayers\] expected cross_attend=True with only_cross=True", only_cross=True)
    err(r"^\[AttentionLayers\] expected at most one of use_rmsnorm, use_scalenorm", use_rmsnorm=True, use_scalenorm=True)
    err(r"^\[AttentionLayers\] expected at most one of alibi_pos_bias, rel_pos_bias", alibi_pos_bias=True, rel_pos_bias=True)
    err(r"^\[AttentionLayers\] expected alibi_pos_bias=True with alibi_num_heads", alibi_num_heads=2)
    err(r"^\[AttentionLayers\] expected 1 <= alibi_num_heads <= heads=4, got 0", heads=4, alibi_pos_bias=True,
        alibi_num_heads=0)
    err(r"^\[AttentionLayers\] expected rotary_pos_emb=True and causal=True with rotary_xpos", rotary_pos_emb=True,
        rotary_xpos=True)
    err(r"^\[AttentionLayers\] expected an even rotary_emb_dim in \[2, dim_head=4\], got 6", heads=8, rotary_pos_emb=True,
        rotary_emb_dim=6)
    err(r"^\[AttentionLayers\] expected no self-attention position options with only_cross=True", cross_attend=True,
        only_cross=True, rotary_pos_emb=True)
    with pytest.raises(ValueError, match=r"^\[Decoder\] causal is fixed to True, got causal=False"):
        Decoder(dim=DIM, depth=1, causal=False)
    with pytest.raises(ValueError, match=r"^\[Encoder\] causal is fixed to False"):
        Encoder(dim=DIM, depth=1, causal=True)
    with pytest.raises(ValueError, match=r"^\[CrossAttender\] only_cross is fixed to True"):
        CrossAttender(dim=DIM, depth=1, only_cross=False)
    with pytest.raises(ValueError, match=r"^\[FeedForward\] swish=True and relu_squared=True are mutually exclusive"):
        AttentionLayers(dim=DIM, depth=1, ff_swish=True, ff_relu_squared=True)  # the block's own check


def test_call_errors():
    dec = Decoder(dim=DIM, depth=2, heads=4)
    x = mx.zeros((B, 5, DIM))
    with pytest.raises(ValueError, match=r"^\[Decoder\] expected x of shape \(batch, seq, 32\), got shape \(2, 5, 16\)"):
        dec(mx.zeros((B, 5, 16)))
    with pytest.raises(ValueError, match=r"^\[Decoder\] expected a boolean mask of shape \(2, 5\) or \(2, 5\) .* got shape \(2, 4\)"):
        dec(x, mask=mx.ones((B, 4), dtype=mx.bool_))
    with pytest.raises(ValueError, match=r"^\[Decoder\] expected a boolean mask .* dtype mlx.core.int32"):
        dec(x, mask=mx.ones((B, 5), dtype=mx.int32))
    with pytest.raises(ValueError, match=r"^\[Decoder\] expected no context/context_mask without cross_attend=True"):
        dec(x, context=x)
    with pytest.raises(ValueError, match=r"^\[Decoder\] expected a cache list of 2 entries \(make_cache\(\)\), got 1"):
        dec(x, cache=[KVCache()])
    with pytest.raises(ValueError, match=r"^\[CrossAttender\] expected context \(batch, context_len, 32\) with cross_attend=True"):
        CrossAttender(dim=DIM, depth=1)(x)
    with pytest.raises(ValueError, match=r"^\[CrossAttender\] expected no mask with only_cross=True"):
        CrossAttender(dim=DIM, depth=1)(x, context=x, mask=mx.ones((B, 5), dtype=mx.bool_))
    with pytest.raises(ValueError, match=r"^\[Attention\] expected context batch 2"):
        Decoder(dim=DIM, depth=1, cross_attend=True)(x, context=mx.zeros((1, 3, DIM)))


def test_norm_factory_and_rotary_inv_freq(rng):
    """norm_factory builds every norm (eps included); rotary_inv_freq equal to the default
    frequencies reproduces the default stack exactly."""
    import mlx.nn as nn

    layers = Decoder(dim=DIM, depth=2, heads=4, rotary_pos_emb=True, rotary_emb_dim=DIM // 4,
                     norm_factory=lambda d: nn.RMSNorm(d, eps=1e-6))
    norms = [m for _, m in layers.named_modules() if isinstance(m, nn.RMSNorm)]
    assert len(norms) == 2 * 2 + 1 and all(n.eps == 1e-6 for n in norms)
    d = DIM // 4
    inv = 1.0 / 10000.0 ** (np.arange(0, d, 2) / d)
    given = Decoder(dim=DIM, depth=2, heads=4, rotary_pos_emb=True, rotary_emb_dim=d,
                    norm_factory=lambda d: nn.RMSNorm(d, eps=1e-6), rotary_inv_freq=mx.array(inv))
    given.update(layers.parameters())
    x = mx.array(rng.standard_normal((B, N, DIM)).astype(np.float32))
    assert_close(given(x), layers(x), what="explicit default inv_freq")
    with pytest.raises(ValueError, match=r"at most one of use_rmsnorm, use_scalenorm, norm_factory"):
        AttentionLayers(dim=DIM, depth=1, use_rmsnorm=True, norm_factory=nn.LayerNorm)
    with pytest.raises(ValueError, match=r"rotary_pos_emb=True with rotary_inv_freq"):
        AttentionLayers(dim=DIM, depth=1, rotary_inv_freq=mx.array(inv))
    with pytest.raises(ValueError, match=r"inv_freq of shape \(4,\)"):
        Decoder(dim=DIM, depth=1, heads=4, rotary_pos_emb=True, rotary_emb_dim=8, rotary_inv_freq=mx.ones((3,)))
