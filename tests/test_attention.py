"""Attention family: parity with the torch reference (tests/reference/attention.py), with
transformers' Llama / Qwen3 attention, hand-computed values, KV-cache self-consistency,
dropout statistics and argument validation."""

import math

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core loads)
import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from parity import assert_close, check_parity
from mlx.utils import tree_flatten
from reference.attention import RefAttention, RefFlashAttention, RefMultiGroupedQueryAttn, attention, causal_mask

from mlx_zeta.nn.attention import (Attention, FlashAttention, KVCache, MultiGroupedQueryAttn, MultiheadAttention,
                                   MultiQueryAttention)

DTYPES = [mx.float32, mx.float16, mx.bfloat16]
B = 2


def keywords(names):
    """Call a module with positional parity inputs given as keywords."""
    return lambda m, *xs: m(**dict(zip(names, xs)))


# ---------------------------------------------------------------- FlashAttention

# name: heads, kv_heads, q_len, k_len, causal, mask kind, attn_bias kind
CORE_CASES = {
    "mha": (4, 4, 8, 8, False, None, None),
    "causal": (4, 4, 8, 8, True, None, None),
    "causal_q<k": (4, 4, 3, 8, True, None, None),
    "causal_one_query": (4, 2, 1, 9, True, None, None),  # a decoding step: no mask is built, every key seen
    "causal_long_cached": (4, 2, 150, 170, True, None, None),  # on the CPU: query blocks of 64 (_causal_blocks)
    "causal_q>k": (4, 4, 8, 5, True, None, None),  # first 3 query rows see no key: zeros
    "gqa_causal_padding": (4, 2, 6, 9, True, "padding", None),
    "mqa_bool": (4, 1, 8, 8, False, "bool", None),
    "gqa_additive": (4, 2, 5, 7, False, "additive", None),
    "padding_additive": (4, 4, 6, 6, False, "padding_additive", None),
    "alibi_causal": (4, 4, 8, 8, True, None, "alibi"),
    "all_at_once": (4, 2, 5, 9, True, "bool3d", "full"),
}


def core_inputs(rng, heads, kv_heads, q_len, k_len, mask_kind, bias_kind, dim=8):
    names = ["q", "k", "v"]
    xs = [rng.standard_normal((B, heads, q_len, dim)), rng.standard_normal((B, kv_heads, k_len, dim)),
          rng.standard_normal((B, kv_heads, k_len, dim))]
    if mask_kind == "padding":  # batch 1 pads its last 3 keys
        mask = np.ones((B, k_len), bool)
        mask[1, -3:] = False
    elif mask_kind == "padding_additive":  # -30: finite (so gradients are defined) and fp16-safe
        mask = np.zeros((B, k_len))
        mask[0, :2] = -30.0
    elif mask_kind == "bool":
        mask = rng.random((B, 1, q_len, k_len)) < 0.7
    elif mask_kind == "bool3d":
        mask = rng.random((1, q_len, k_len)) < 0.7
    elif mask_kind == "additive":
        mask = 2.0 * rng.standard_normal((B, heads, q_len, k_len))
    else:
        mask = None
    if mask is not None:
        names.append("mask")
        xs.append(mask)
    if bias_kind == "alibi":  # ALiBi: -slope_h * |i - j|, slopes 2^-(h+1)
        slopes = 2.0 ** -(np.arange(heads) + 1.0)
        dist = np.abs(np.arange(q_len)[:, None] - np.arange(k_len)[None])
        names.append("attn_bias")
        xs.append(-slopes[:, None, None] * dist)
    elif bias_kind == "full":
        names.append("attn_bias")
        xs.append(rng.standard_normal((B, heads, q_len, k_len)))
    return names, [x.astype(np.float32) if x.dtype != bool else x for x in xs]


@pytest.mark.parametrize("flash", [True, False], ids=["flash", "explicit"])
@pytest.mark.parametrize("case", list(CORE_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_flash_attention_parity(rng, dtype, case, flash):
    heads, kv_heads, q_len, k_len, causal, mask_kind, bias_kind = CORE_CASES[case]
    names, xs = core_inputs(rng, heads, kv_heads, q_len, k_len, mask_kind, bias_kind)
    check_parity(FlashAttention(causal=causal, flash=flash), RefFlashAttention(causal=causal), xs, dtype=dtype,
                 mlx_call=keywords(names), torch_call=keywords(names))


@pytest.mark.parametrize("case", list(CORE_CASES))
def test_flash_and_explicit_paths_agree(rng, case):
    heads, kv_heads, q_len, k_len, causal, mask_kind, bias_kind = CORE_CASES[case]
    names, xs = core_inputs(rng, heads, kv_heads, q_len, k_len, mask_kind, bias_kind)
    xs = [mx.array(x) for x in xs]
    fast, slow = FlashAttention(causal=causal, flash=True), FlashAttention(causal=causal, flash=False)

    def loss(module):
        return lambda q, k, v: (module(q, k, v, **dict(zip(names[3:], xs[3:]))) ** 2).sum()

    assert_close(fast(*xs[:3], **dict(zip(names[3:], xs[3:]))), slow(*xs[:3], **dict(zip(names[3:], xs[3:]))))
    g_fast = mx.grad(loss(fast), argnums=(0, 1, 2))(*xs[:3])
    g_slow = mx.grad(loss(slow), argnums=(0, 1, 2))(*xs[:3])
    for a, b in zip(g_fast, g_slow):
        assert_close(a, b, what="grad")


@pytest.mark.parametrize("case", ["plain", "gqa", "causal", "bool_mask", "additive_mask", "bottom_right"])
def test_reference_matches_torch_sdpa(case):
    """Check the checker: our torch reference against torch's own fused attention."""
    g = torch.Generator().manual_seed(0)
    kv = 2 if case == "gqa" else 4
    lq, lk = (4, 9) if case == "bottom_right" else (7, 7)
    q, k, v = torch.randn(B, 4, lq, 8, generator=g), torch.randn(B, kv, lk, 8, generator=g), torch.randn(B, kv, lk, 8, generator=g)
    kw, ref_kw = {}, {}
    if case == "causal":
        kw, ref_kw = dict(is_causal=True), dict(causal=True)
    elif case == "bool_mask":
        m = torch.rand(B, 1, lq, lk, generator=g) < 0.7
        m[..., 0] = True  # torch's fused kernel gives NaN on fully masked rows; avoid them here
        kw, ref_kw = dict(attn_mask=m), dict(mask=m)
    elif case == "additive_mask":
        m = torch.randn(B, 4, lq, lk, generator=g)
        kw, ref_kw = dict(attn_mask=m), dict(mask=m)
    elif case == "bottom_right":
        kw, ref_kw = dict(attn_mask=causal_mask(lq, lk)), dict(causal=True)
    expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=kv != 4, **kw)
    np.testing.assert_allclose(attention(q, k, v, **ref_kw).numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flash", [True, False])
def test_flash_attention_hand_values(flash):
    # D = 4, scale 1/2: q = (2,0,0,0) against keys (1,0,0,0), (0,0,0,0) scores (1, 0),
    # softmax = (e/(e+1), 1/(e+1)) = (0.731059, 0.268941); values e1, e2 give that as output.
    q = mx.array([2.0, 0, 0, 0]).reshape(1, 1, 1, 4)
    k = mx.array([[1.0, 0, 0, 0], [0, 0, 0, 0]]).reshape(1, 1, 2, 4)
    v = mx.array([[1.0, 0, 0, 0], [0, 1, 0, 0]]).reshape(1, 1, 2, 4)
    p = math.e / (math.e + 1)
    assert_close(FlashAttention(flash=flash)(q, k, v), np.array([p, 1 - p, 0, 0]).reshape(1, 1, 1, 4))
    # Zero queries give uniform weights: causal row i is the mean of v[0..i] (bottom-right, q_len = k_len).
    vs = mx.arange(12, dtype=mx.float32).reshape(1, 1, 4, 3)
    out = FlashAttention(causal=True, flash=flash)(mx.zeros((1, 1, 4, 3)), mx.ones((1, 1, 4, 3)), vs)
    assert_close(out, np.cumsum(np.array(vs), axis=2) / np.arange(1, 5)[:, None])
    out, w = FlashAttention().with_weights(q, k, v)
    assert_close(w, np.array([p, 1 - p]).reshape(1, 1, 1, 2))


@pytest.mark.parametrize("flash", [True, False])
@pytest.mark.parametrize("kind", ["bool", "additive", "causal"])
def test_fully_masked_rows_are_zero_without_nan(rng, flash, kind):
    q, k, v = (mx.array(rng.standard_normal((B, 4, 5, 8)).astype(np.float32)) for _ in range(3))
    mask, causal = None, False
    if kind == "causal":  # 8 queries on 5 keys: rows 0..2 have no key
        q, causal, dead = mx.concatenate([q, q[:, :, :3]], axis=2), True, (slice(None), slice(None), slice(0, 3))
    else:  # batch 0 sees nothing
        m = np.ones((B, 5), bool)
        m[0] = False
        mask = mx.array(m) if kind == "bool" else mx.where(mx.array(m), 0.0, -mx.inf)
        dead = (0,)
    attend = FlashAttention(causal=causal, flash=flash)
    out = attend(q, k, v, mask=mask)
    assert np.all(np.array(out[dead]) == 0)
    assert np.all(np.isfinite(np.array(out)))
    grads = mx.grad(lambda q, k, v: attend(q, k, v, mask=mask).sum(), argnums=(0, 1, 2))(q, k, v)
    assert all(np.all(np.isfinite(np.array(g))) for g in grads)
    assert np.all(np.array(grads[0][dead]) == 0)
    _, w = attend.with_weights(q, k, v, mask=mask)
    assert np.all(np.array(w[dead]) == 0)


@pytest.mark.parametrize("flash", [True, False])
def test_flash_attention_dropout(rng, flash):
    p, n = 0.5, 16
    attend = FlashAttention(dropout=p, flash=flash)
    q, k = (mx.array(rng.standard_normal((B, 4, n, 8)).astype(np.float32)) for _ in range(2))
    v = mx.broadcast_to(mx.eye(n), (B, 4, n, n))  # output row = the (dropped) attention row
    attend.train()
    dropped = np.array(attend(q, k, v))
    assert abs((dropped == 0).mean() - p) < 0.05  # 2048 Bernoulli(0.5) draws: std 0.011
    assert abs(dropped.sum(-1).mean() - 1.0) < 0.1  # inverted dropout keeps rows summing to 1 on average
    attend.eval()
    clean = np.array(attend(q, k, v))
    assert np.abs(dropped - clean).max() > 0.1
    assert_close(clean, np.array(FlashAttention(flash=flash)(q, k, v)))
    assert np.all(clean > 0)


def test_flash_attention_errors():
    q, k = mx.zeros((2, 4, 6, 8)), mx.zeros((2, 2, 10, 8))
    attend = FlashAttention()
    with pytest.raises(ValueError, match=r"^\[FlashAttention\] expected q of shape \(batch, heads, seq, dim\), got shape \(4, 6, 8\)"):
        attend(q[0], k, k)
    with pytest.raises(ValueError, match=r"^\[FlashAttention\] expected k of shape \(2, kv_heads, k_len, 8\)"):
        attend(q, mx.zeros((2, 2, 10, 4)), k)
    with pytest.raises(ValueError, match=r"^\[FlashAttention\] expected v of shape"):
        attend(q, k, mx.zeros((2, 2, 9, 8)))
    with pytest.raises(ValueError, match=r"^\[FlashAttention\] expected kv_heads to divide heads, got heads=4, kv_heads=3"):
        attend(q, mx.zeros((2, 3, 10, 8)), mx.zeros((2, 3, 10, 8)))
    with pytest.raises(ValueError, match=r"^\[FlashAttention\] expected a key-padding mask of shape \(2, 10\)"):
        attend(q, k, k, mask=mx.ones((2, 9), mx.bool_))
    with pytest.raises(ValueError, match=r"^\[FlashAttention\] expected mask of shape \(2, 10\) or broadcastable to \(2, 4, 6, 10\)"):
        attend(q, k, k, mask=mx.ones((2, 3, 6, 10), mx.bool_))
    with pytest.raises(ValueError, match=r"^\[FlashAttention\] expected a boolean or floating mask"):
        attend(q, k, k, mask=mx.ones((2, 10), mx.int32))
    with pytest.raises(ValueError, match=r"^\[FlashAttention\] expected a floating attn_bias broadcastable to \(2, 4, 6, 10\), got shape \(4, 6, 9\)"):
        attend(q, k, k, attn_bias=mx.zeros((4, 6, 9)))
    with pytest.raises(ValueError, match=r"^\[FlashAttention\] expected a floating attn_bias .* dtype mlx.core.bool"):
        attend(q, k, k, attn_bias=mx.zeros((6, 10), mx.bool_))
    with pytest.raises(ValueError, match=r"^\[FlashAttention\] expected 0 <= dropout < 1, got 1.0"):
        FlashAttention(dropout=1.0)
    with pytest.raises(ValueError, match=r"^\[FlashAttention\] expected scale > 0"):
        FlashAttention(scale=0.0)


# ---------------------------------------------------------------- Attention

DIM = 32
ATTN_CASES = {
    "mha": dict(heads=4),
    "causal": dict(heads=4, causal=True),
    "gqa_causal": dict(heads=4, kv_heads=2, causal=True),
    "mqa": dict(heads=4, kv_heads=1),
    "qk_norm_gqa": dict(heads=4, kv_heads=2, qk_norm=True),
    "bias": dict(heads=4, bias=True, causal=True),
    "dim_head": dict(heads=2, dim_head=16, kv_heads=1),
    "cross_padding": dict(heads=4, kv_heads=2, _context=5, _mask="padding"),
    "bool_mask_causal": dict(heads=4, causal=True, _mask="bool"),
    "additive_alibi": dict(heads=4, kv_heads=2, _mask="additive", _bias=True),
}


def attn_inputs(rng, cfg, n=7):
    names, xs = ["x"], [rng.standard_normal((B, n, DIM))]
    s = cfg.get("_context", n)
    if "_context" in cfg:
        names.append("context")
        xs.append(rng.standard_normal((B, s, DIM)))
    if cfg.get("_mask") == "padding":
        m = np.ones((B, s), bool)
        m[1, -2:] = False
        names.append("mask")
        xs.append(m)
    elif cfg.get("_mask") == "bool":
        names.append("mask")
        xs.append(rng.random((B, 1, n, s)) < 0.7)
    elif cfg.get("_mask") == "additive":
        names.append("mask")
        xs.append(rng.standard_normal((B, 1, n, s)))
    if cfg.get("_bias"):
        names.append("attn_bias")
        xs.append(-0.5 * np.abs(np.arange(n)[:, None] - np.arange(s)[None]) * np.ones((cfg["heads"], 1, 1)))
    return names, [x.astype(np.float32) if x.dtype != bool else x for x in xs]


@pytest.mark.parametrize("flash", [True, False], ids=["flash", "explicit"])
@pytest.mark.parametrize("case", list(ATTN_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_parity(rng, dtype, case, flash):
    cfg = ATTN_CASES[case]
    kw = {key: val for key, val in cfg.items() if not key.startswith("_")}
    names, xs = attn_inputs(rng, cfg)
    check_parity(Attention(DIM, flash=flash, **kw), RefAttention(DIM, **kw), xs, dtype=dtype,
                 mlx_call=keywords(names), torch_call=keywords(names))


def _hf_attention(model: str, heads: int, kv_heads: int):
    if model == "llama":
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaAttention as Cls
        config = LlamaConfig(hidden_size=DIM, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=DIM // heads)
    else:
        from transformers import Qwen3Config
        from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention as Cls
        config = Qwen3Config(hidden_size=DIM, num_attention_heads=heads, num_key_value_heads=kv_heads,
                             head_dim=DIM // heads, rms_norm_eps=1e-5)
    config._attn_implementation = "eager"
    return Cls(config, layer_idx=0).eval()


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16], ids=str)
@pytest.mark.parametrize("model,kv_heads", [("llama", 2), ("llama", 1), ("qwen3", 2)])
def test_attention_matches_transformers(rng, dtype, model, kv_heads):
    """Second reference: Llama (GQA) and Qwen3 (qk RMSNorm) attention with RoPE set to the identity
    (cos = 1, sin = 0) and our causal + key padding as their additive mask."""
    heads, n = 4, 7
    hf = _hf_attention(model, heads, kv_heads)
    names = ["q_proj", "k_proj", "v_proj", "o_proj"]
    pmap = {f"to_{a}.weight": f"{b}.weight" for a, b in zip("qkvo", names)}
    pmap["to_out.weight"] = pmap.pop("to_o.weight")
    if model == "qwen3":
        pmap.update({"q_norm.weight": "q_norm.weight", "k_norm.weight": "k_norm.weight"})
    pad = np.ones((B, n), bool)
    pad[0, -2:] = False  # right padding: every query keeps key 0 (HF has no fully-masked-row rule)
    x = rng.standard_normal((B, n, DIM)).astype(np.float32)
    allowed = pad[:, None, None, :] & causal_mask(n, n).numpy()
    additive = np.where(allowed, 0.0, -1e9).astype(np.float32)
    identity_rope = (torch.ones(B, n, DIM // heads), torch.zeros(B, n, DIM // heads))
    check_parity(Attention(DIM, heads=heads, kv_heads=kv_heads, causal=True, qk_norm=model == "qwen3"), hf, [x, pad],
                 dtype=dtype, param_map=pmap, grad_inputs=[0],
                 mlx_call=lambda m, x, pad: m(x, mask=pad),
                 torch_call=lambda m, x, pad: m(x, position_embeddings=identity_rope,
                                                attention_mask=torch.from_numpy(additive))[0])


@pytest.mark.parametrize("flash", [True, False])
@pytest.mark.parametrize("heads,kv_heads,qk_norm", [(4, 4, False), (4, 2, True), (4, 1, False)])
@pytest.mark.parametrize("prefill", [1, 5])
def test_kv_cache_matches_full_causal_forward(rng, flash, heads, kv_heads, qk_norm, prefill):
    attn = Attention(DIM, heads=heads, kv_heads=kv_heads, causal=True, qk_norm=qk_norm, flash=flash)
    x = mx.array(rng.standard_normal((B, 12, DIM)).astype(np.float32))
    full = attn(x)
    cache = KVCache(step=4)  # small step: the cache regrows several times
    for _ in range(2):  # the second pass checks reset()
        outs = [attn(x[:, :prefill], cache=cache)]
        outs += [attn(x[:, t : t + 1], cache=cache) for t in range(prefill, 12)]
        assert cache.offset == 12
        assert_close(mx.concatenate(outs, axis=1), full, what="cached decode")
        cache.reset()
        assert cache.offset == 0 and cache.state == (None, None)


def test_kv_cache_non_causal_decode_equals_causal_forward(rng):
    """Decoding one token at a time, each query only ever sees the past: a non-causal
    layer with a cache computes what the same weights compute with causal=True."""
    causal, plain = Attention(DIM, heads=4, kv_heads=2, causal=True), Attention(DIM, heads=4, kv_heads=2)
    plain.update(causal.parameters())
    x = mx.array(rng.standard_normal((B, 6, DIM)).astype(np.float32))
    cache = KVCache()
    steps = mx.concatenate([plain(x[:, t : t + 1], cache=cache) for t in range(6)], axis=1)
    assert_close(steps, causal(x))


def test_kv_cache_storage(rng):
    cache = KVCache(step=4)
    ks = [mx.array(rng.standard_normal((1, 2, n, 8)).astype(np.float32)) for n in (3, 3, 1)]
    for i, kk in enumerate(ks):
        keys, values = cache.update_and_fetch(kk, 2 * kk)
    assert cache.offset == 7 and keys.shape == (1, 2, 7, 8)
    assert_close(keys, mx.concatenate(ks, axis=2))
    assert_close(values, 2 * mx.concatenate(ks, axis=2))
    with pytest.raises(ValueError, match=r"^\[KVCache\] expected keys and values of shape"):
        cache.update_and_fetch(ks[0][0], ks[0][0])
    with pytest.raises(ValueError, match=r"^\[KVCache\] expected \(batch, kv_heads\), key dim, value dim"):
        cache.update_and_fetch(mx.zeros((1, 3, 1, 8)), mx.zeros((1, 3, 1, 8)))
    with pytest.raises(ValueError, match=r"^\[KVCache\] expected step >= 1"):
        KVCache(step=0)


def test_attention_dropout_train_vs_eval(rng):
    attn = Attention(DIM, heads=4, dropout=0.5)
    ref = Attention(DIM, heads=4)
    ref.update(attn.parameters())
    x = mx.array(rng.standard_normal((B, 8, DIM)).astype(np.float32))
    attn.train()
    assert np.abs(np.array(attn(x) - ref(x))).max() > 1e-2
    attn.eval()
    assert_close(attn(x), ref(x))
    assert MultiheadAttention is Attention


def test_attention_errors():
    attn = Attention(DIM, heads=4, kv_heads=2)
    x = mx.zeros((B, 5, DIM))
    with pytest.raises(ValueError, match=r"^\[Attention\] expected x of shape \(batch, seq, 32\), got shape \(5, 32\)"):
        attn(x[0])
    with pytest.raises(ValueError, match=r"^\[Attention\] expected x of shape \(batch, seq, 32\), got shape \(2, 5, 16\)"):
        attn(mx.zeros((B, 5, 16)))
    with pytest.raises(ValueError, match=r"^\[Attention\] expected context of shape \(batch, seq, 32\)"):
        attn(x, context=mx.zeros((B, 5, 8)))
    with pytest.raises(ValueError, match=r"^\[Attention\] expected cache only for self-attention"):
        attn(x, context=x, cache=KVCache())
    with pytest.raises(ValueError, match=r"^\[FlashAttention\] expected a key-padding mask of shape \(2, 5\)"):
        attn(x, mask=mx.ones((B, 4), mx.bool_))
    with pytest.raises(ValueError, match=r"^\[Attention\] expected heads to divide dim when dim_head is None, got dim=32, heads=5"):
        Attention(DIM, heads=5)
    with pytest.raises(ValueError, match=r"^\[Attention\] expected kv_heads to divide heads, got heads=4, kv_heads=3"):
        Attention(DIM, heads=4, kv_heads=3)
    with pytest.raises(ValueError, match=r"^\[FlashAttention\] expected 0 <= dropout < 1"):
        Attention(DIM, dropout=-0.1)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16], ids=str)
@pytest.mark.parametrize("xpos", [False, True], ids=["rope", "xpos"])
def test_attention_rotary_pos_emb_parity(rng, dtype, xpos):
    """rotary_pos_emb rotates q and k after qk_norm (partial: 4 of 8 features per head),
    keys with the xPos scale ** -1; the reference rotates explicit 2x2 pairs."""
    from reference.positional import rope_angles, xpos_scale
    from reference.structs import TorchSelfAttention

    from mlx_zeta.nn import RotaryEmbedding

    n, rot = 7, 4
    kw = dict(heads=4, kv_heads=2, causal=True, qk_norm=True)
    freqs, scale = RotaryEmbedding(rot, use_xpos=xpos, scale_base=8)(n)
    pos = torch.arange(n)
    t_rot = (rope_angles(rot, pos), xpos_scale(rot, pos, n // 2, 8) if xpos else None)
    check_parity(Attention(DIM, **kw), TorchSelfAttention(DIM, **kw), [rng.standard_normal((B, n, DIM))], dtype=dtype,
                 mlx_call=lambda m, x: m(x, rotary_pos_emb=(freqs, scale)),
                 torch_call=lambda m, x: m(x, rotary=t_rot))


@pytest.mark.parametrize("xpos", [False, True], ids=["rope", "xpos"])
def test_attention_rotary_with_kv_cache(rng, xpos):
    """Keys are rotated before they enter the cache: decoding with the angles of each
    step's positions (one fixed xPos centre) equals the full forward."""
    from mlx_zeta.nn import RotaryEmbedding

    rotary = RotaryEmbedding(8, use_xpos=xpos, scale_base=4)
    attn = Attention(DIM, heads=4, kv_heads=2, causal=True)
    x = mx.array(rng.standard_normal((B, 9, DIM)).astype(np.float32))
    full = attn(x, rotary_pos_emb=rotary(9, center=3))
    cache = KVCache()
    outs = [attn(x[:, :4], cache=cache, rotary_pos_emb=rotary(4, center=3))]
    outs += [attn(x[:, t : t + 1], cache=cache, rotary_pos_emb=rotary(1, offset=t, center=3)) for t in range(4, 9)]
    assert_close(mx.concatenate(outs, axis=1), full, what="cached decode with rotary")
    with pytest.raises(ValueError, match=r"^\[Attention\] expected rotary_pos_emb=\(freqs, scale\) for self-attention"):
        attn(x, context=x, rotary_pos_emb=rotary(9))
    with pytest.raises(ValueError, match=r"^\[Attention\] expected rotary_pos_emb=\(freqs, scale\)"):
        attn(x, rotary_pos_emb=rotary(9)[0])


# ---------------------------------------------------------------- MultiQueryAttention

MQA_CASES = {
    "default_causal": dict(),
    "clip_qkv": dict(clip_qkv=0.3),  # projections have std ~0.6: the clip bites
    "qk_ln": dict(qk_ln=True),
    "softmax_scale": dict(softmax_scale=0.2),
    "non_causal_no_bias": dict(causal=False, bias=False),
}


@pytest.mark.parametrize("flash", [True, False], ids=["flash", "explicit"])
@pytest.mark.parametrize("case", list(MQA_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multiquery_attention_parity(rng, dtype, case, flash):
    kw = MQA_CASES[case]
    mqa = MultiQueryAttention(d_model=DIM, heads=4, flash=flash, **kw)
    assert mqa.to_k.weight.shape == (DIM // 4, DIM)  # one kv head
    ref = RefAttention(DIM, heads=4, kv_heads=1, causal=kw.get("causal", True), qk_norm=kw.get("qk_ln", False),
                       bias=kw.get("bias", True), scale=kw.get("softmax_scale"), clip_qkv=kw.get("clip_qkv"))
    pad = np.ones((B, 7), bool)
    pad[1, :3] = False
    x = rng.standard_normal((B, 7, DIM)).astype(np.float32)
    check_parity(mqa, ref, [x, pad], dtype=dtype, mlx_call=lambda m, x, pad: m(x, mask=pad),
                 torch_call=lambda m, x, pad: m(x, mask=pad))


def test_multiquery_attention_cache_and_errors(rng):
    mqa = MultiQueryAttention(d_model=DIM, heads=4, qk_ln=True, clip_qkv=1.0)
    x = mx.array(rng.standard_normal((B, 6, DIM)).astype(np.float32))
    cache = KVCache()
    steps = mx.concatenate([mqa(x[:, :2], cache=cache)] + [mqa(x[:, t : t + 1], cache=cache) for t in range(2, 6)], axis=1)
    assert_close(steps, mqa(x))
    assert cache.state[0].shape == (B, 1, 6, DIM // 4)
    with pytest.raises(ValueError, match=r"^\[MultiQueryAttention\] unknown keyword argument\(s\) \['attn_impl'\]"):
        MultiQueryAttention(d_model=DIM, heads=4, attn_impl="triton")
    with pytest.raises(ValueError, match=r"^\[MultiQueryAttention\] expected heads to divide dim, got dim=32, heads=5"):
        MultiQueryAttention(d_model=DIM, heads=5)
    for kw, given in ((dict(dim=DIM, d_model=DIM), "both"), (dict(), "neither")):
        with pytest.raises(ValueError, match=rf"^\[MultiQueryAttention\] expected one of dim= or d_model= .*got {given}$"):
            MultiQueryAttention(heads=4, **kw)
    with pytest.raises(ValueError, match=r"^\[MultiQueryAttention\] expected clip_qkv > 0"):
        MultiQueryAttention(d_model=DIM, heads=4, clip_qkv=0.0)
    with pytest.raises(ValueError, match=r"^\[MultiQueryAttention\] expected x of shape \(batch, seq, 32\)"):
        mqa(mx.zeros((B, 6, 8)))


# ---------------------------------------------------------------- MultiGroupedQueryAttn

MGQA_CASES = {
    "gqa": dict(kv_heads=2),
    "mqa_causal": dict(kv_heads=1, _causal=True),
    "mha_no_norm": dict(kv_heads=4, layer_norm=False),
    "no_bias_padding": dict(kv_heads=2, bias=False, _mask="padding"),
    "cross_3d_mask": dict(kv_heads=2, _s=5, _mask="bool3d"),
    "cross_causal_additive": dict(kv_heads=1, _s=9, _causal=True, _mask="additive4d"),
}


def mgqa_inputs(rng, cfg, n=7):
    s = cfg.get("_s", n)
    xs = [rng.standard_normal((B, n, DIM)), rng.standard_normal((B, s, DIM)), rng.standard_normal((B, s, DIM))]
    mask = {"padding": lambda: rng.random((B, s)) < 0.8, "bool3d": lambda: rng.random((B, n, s)) < 0.7,
            "additive4d": lambda: rng.standard_normal((B, 4, n, s))}.get(cfg.get("_mask"), lambda: None)()
    return [x.astype(np.float32) for x in xs], mask


@pytest.mark.parametrize("output", ["out", "weights", "mean_weights"])
@pytest.mark.parametrize("case", list(MGQA_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multi_grouped_query_attn_parity(rng, dtype, case, output):
    cfg = MGQA_CASES[case]
    kw = {key: val for key, val in cfg.items() if not key.startswith("_")}
    causal = cfg.get("_causal", False)
    xs, mask = mgqa_inputs(rng, cfg)
    inputs = xs + ([mask] if mask is not None else [])
    need, avg = output != "out", output == "mean_weights"
    pick = 1 if need else 0

    def mlx_call(m, q, k, v, mask=None):
        return m(q, k, v, need_weights=need, is_causal=causal, average_attn_weights=avg, attn_mask=mask)[pick]

    def torch_call(m, q, k, v, mask=None):
        out, weights = m(q, k, v, attn_mask=mask, is_causal=causal)
        if not need:
            return out
        # 0 * out: v_proj / norm / out_proj get (zero) gradients, as on the MLX side
        return (weights.mean(1) if avg else weights) + 0.0 * out.sum()

    # Low precision: the sub-LayerNorm divides by the small spread of the attention output, so the q/k
    # projection gradients reach ~5 and their rounding error scales with that, not with each entry.
    grad_scale = 1.0 if dtype == mx.float32 else 2.0
    check_parity(MultiGroupedQueryAttn(DIM, heads=4, **kw), RefMultiGroupedQueryAttn(DIM, heads=4, **kw), inputs,
                 dtype=dtype, mlx_call=mlx_call, torch_call=torch_call, grad_scale=grad_scale)


def test_multi_grouped_query_attn_weights_init_and_dropout(rng):
    gqa = MultiGroupedQueryAttn(64, heads=4, kv_heads=2, gamma_init=0.5, dropout=0.5)
    # Xavier normal: std = gain * sqrt(2 / (fan_in + fan_out)); 4096 samples estimate it within ~3%.
    assert abs(np.array(gqa.out_proj.weight).std() / (0.5 * math.sqrt(2 / 128)) - 1) < 0.08
    assert abs(np.array(gqa.q_proj.weight).std() / math.sqrt(2 / 128) - 1) < 0.08
    assert np.all(np.array(gqa.v_proj.bias) == 0)
    x = mx.array(rng.standard_normal((B, 16, 64)).astype(np.float32))
    gqa.eval()
    _, w = gqa(x, x, x, need_weights=True)
    assert_close(w.sum(-1), np.ones((B, 4, 16)))
    _, wm = gqa(x, x, x, need_weights=True, average_attn_weights=True)
    assert_close(wm, w.mean(1))
    assert gqa(x, x, x)[1] is None
    gqa.train()
    _, wd = gqa(x, x, x, need_weights=True)
    assert abs((np.array(wd) == 0).mean() - 0.5) < 0.05


def test_zeta_spellings_build_the_same_layer():
    """zeta's keyword names (MultiQueryAttention's ``dim`` since 2024 and ``d_model`` before; MultiGroupedQueryAttn's
    ``query_heads``) build the same layer as ours: same parameters, loaded from one, same output."""
    x = mx.random.normal((B, 6, DIM))
    pairs = [(MultiQueryAttention(dim=DIM, heads=4), MultiQueryAttention(d_model=DIM, heads=4)),
             (MultiQueryAttention(DIM, 4), MultiQueryAttention(d_model=DIM, heads=4)),
             (MultiGroupedQueryAttn(DIM, heads=4, kv_heads=2), MultiGroupedQueryAttn(dim=DIM, query_heads=4, kv_heads=2))]
    for ours, zetas in pairs:
        zetas.load_weights(list(tree_flatten(ours.parameters())), strict=True)
        out_ours, out_zeta = (m(x) if isinstance(m, MultiQueryAttention) else m(x, x, x)[0] for m in (ours, zetas))
        np.testing.assert_array_equal(np.array(out_zeta), np.array(out_ours))


def test_multi_grouped_query_attn_errors():
    gqa = MultiGroupedQueryAttn(DIM, heads=4, kv_heads=2)
    x = mx.zeros((B, 5, DIM))
    with pytest.raises(ValueError, match=r"^\[MultiGroupedQueryAttn\] unknown keyword argument\(s\) \['device'\]"):
        MultiGroupedQueryAttn(DIM, heads=4, kv_heads=2, device="cuda")
    with pytest.raises(ValueError, match=r"^\[MultiGroupedQueryAttn\] expected linear_groups=1"):
        MultiGroupedQueryAttn(DIM, heads=4, kv_heads=2, linear_groups=2)
    with pytest.raises(ValueError, match=r"^\[MultiGroupedQueryAttn\] expected one of heads= or query_heads= .*got both"):
        MultiGroupedQueryAttn(DIM, heads=4, query_heads=4, kv_heads=2)
    with pytest.raises(ValueError, match=r"^\[MultiGroupedQueryAttn\] expected kv_heads"):
        MultiGroupedQueryAttn(DIM, query_heads=4)
    with pytest.raises(ValueError, match=r"^\[MultiGroupedQueryAttn\] expected kv_heads to divide heads, got heads=4, kv_heads=3"):
        MultiGroupedQueryAttn(DIM, heads=4, kv_heads=3)
    with pytest.raises(ValueError, match=r"^\[MultiGroupedQueryAttn\] expected heads to divide dim, got dim=32, heads=6"):
        MultiGroupedQueryAttn(DIM, heads=6, kv_heads=2)
    with pytest.raises(ValueError, match=r"^\[MultiGroupedQueryAttn\] expected query of shape \(batch, seq, 32\), got shape \(5, 32\)"):
        gqa(x[0], x, x)
    with pytest.raises(ValueError, match=r"^\[MultiGroupedQueryAttn\] expected key and value of shape \(2, k_len, 32\)"):
        gqa(x, x, mx.zeros((B, 4, DIM)))
    with pytest.raises(ValueError, match=r"^\[MultiGroupedQueryAttn\] expected a 3-D attn_mask of shape \(2, 5, 5\)"):
        gqa(x, x, x, attn_mask=mx.ones((B, 5, 4), mx.bool_))


def test_scale_out_bias_and_qk_norm_eps_options(rng):
    """scale=s equals the default scale with W_q multiplied by s*sqrt(d) (scores are linear in q);
    out_bias=False equals bias=True with the output bias zeroed; qk_norm_eps reaches the norms."""
    x = mx.array(rng.standard_normal((2, 5, 32)).astype(np.float32))
    plain = Attention(32, heads=4, bias=True)
    scaled = Attention(32, heads=4, bias=True, scale=1.0)
    scaled.update(plain.parameters())
    plain.to_q.weight = scaled.to_q.weight * math.sqrt(8)
    plain.to_q.bias = scaled.to_q.bias * math.sqrt(8)
    assert_close(scaled(x), plain(x), what="scale=1 vs q scaled by sqrt(d)")
    no_out = Attention(32, heads=4, bias=True, out_bias=False, qk_norm=True, qk_norm_eps=1e-6)
    assert "bias" in no_out.to_q and "bias" not in no_out.to_out
    assert no_out.q_norm.eps == 1e-6 and no_out.k_norm.eps == 1e-6
    ref = Attention(32, heads=4, bias=True, qk_norm=True, qk_norm_eps=1e-6)
    ref.update(no_out.parameters())
    ref.to_out.bias = mx.zeros((32,))
    assert_close(no_out(x), ref(x), what="out_bias=False vs zero output bias")
