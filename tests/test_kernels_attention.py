"""Fused attention kernels: the shipped Metal text (and its CUDA twin), run on the CPU by the
emulator, against the pure-MLX reference of mlx_zeta.kernels.attention; gradients through the
custom function; planted bugs that the comparison must catch; FlashAttention's routing.

Tolerances (max |kernel - reference|, both in float32 from the same inputs): float32 1e-5;
float16 and bfloat16 1 unit in the last place of the output (rtol = atol = 1e-3 / 8e-3)."""

import contextlib

import numpy as np
import pytest

import mlx.core as mx

from mlx_zeta.kernels import KernelSource, load_source, t5_relative_buckets, use_kernels
from mlx_zeta.kernels import attention as fa
from mlx_zeta.kernels.emulate import compiler, concurrent_groups, emulate
from mlx_zeta.nn.attention import FlashAttention
from mlx_zeta.nn.positional import AlibiPositionalBias, RelativePositionBias

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C++ compiler (g++) to run the kernel emulator")

TOL = {mx.float32: (1e-5, 1e-5), mx.float16: (1e-3, 1e-3), mx.bfloat16: (8e-3, 8e-3)}  # (rtol, atol)


def make_qkv(b, hq, hkv, lq, lk, d, dtype=mx.float32, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(mx.array(rng.standard_normal(s).astype(np.float32)).astype(dtype)
                 for s in ((b, hq, lq, d), (b, hkv, lk, d), (b, hkv, lk, d)))


def features(name, b, hq, lq, lk, seed=1):
    """Keyword arguments of fused_attention exercising one feature (or all of them)."""
    rng = np.random.default_rng(seed)
    keep = rng.random((b, 1, lq, lk)) > 0.3
    keep[:, :, 0] = False  # a row with no visible key
    additive = rng.standard_normal((1, hq, lq, lk)).astype(np.float32)
    additive[:, :, :, 0] = -np.inf
    t5 = dict(t5_table=mx.array(rng.standard_normal((8, hq)).astype(np.float32)),
              t5_buckets=t5_relative_buckets(lq, lk, num_buckets=8, max_distance=16))
    table = {
        "plain": {}, "causal": dict(causal=True), "window": dict(window=4), "causal_window": dict(causal=True, window=3),
        "softcap": dict(softcap=1.5, scale=0.5), "alibi": dict(alibi_slopes=mx.array(AlibiPositionalBias._get_slopes(hq))),
        "t5": t5, "bool_mask": dict(mask=mx.array(keep)), "add_mask": dict(mask=mx.array(additive)),
        "key_pad": dict(mask=mx.array(rng.random((b, 1, 1, lk)) > 0.2)),
    }
    if name == "all":
        return dict(causal=True, window=6, softcap=3.0, **table["alibi"], **t5, mask=mx.array(additive))
    return table[name]


@contextlib.contextmanager
def emulated_kernels(monkeypatch):
    """Select the emulated kernels process-wide (``use_kernels("emulate")``, as a user would on a
    machine without a GPU) and record the keyword arguments of every call routed to fused_attention."""
    calls = []
    real = fa.fused_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(fa, "fused_attention", spy)  # observes the routing; selects nothing
    with use_kernels("emulate"):
        yield calls


def check(q, k, v, mode="emulate", **kw):
    got = fa.fused_attention(q, k, v, use_kernel=mode, **kw)
    want = fa.fused_attention(q, k, v, use_kernel=False, **kw)
    assert got.dtype == q.dtype and got.shape == q.shape
    g, w = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
    assert np.isfinite(g).all()
    rtol, atol = TOL[q.dtype]
    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)
    return g, w


FEATURES = ["plain", "causal", "window", "causal_window", "softcap", "alibi", "t5", "bool_mask", "add_mask", "key_pad"]
HEADS = [(1, 2, 1), (2, 4, 2), (1, 2, 2), (2, 4, 1)]  # (B, Hq, Hkv)
SWEEP = [(*HEADS[(n + (d == 80)) % 4], lq, lk, d, FEATURES[(3 * n + (d == 80) * 4) % len(FEATURES)])
         for n, (lq, lk) in enumerate((lq, lk) for lq in (1, 3, 17) for lk in (1, 5, 33)) for d in (64, 80)]


@pytest.mark.parametrize("b,hq,hkv,lq,lk,d,feature", SWEEP)
def test_float32_sweep(b, hq, hkv, lq, lk, d, feature):
    check(*make_qkv(b, hq, hkv, lq, lk, d, seed=lq * lk), **features(feature, b, hq, lq, lk))


@pytest.mark.parametrize("lq,lk", [(17, 33), (3, 33)])
def test_all_features_together(lq, lk):
    check(*make_qkv(1, 4, 2, lq, lk, 64), **features("all", 1, 4, lq, lk))


@pytest.mark.parametrize("d,lq", [(96, 17), (128, 17), (192, 17), (256, 17), (256, 2)])
def test_other_head_dims(d, lq):
    check(*make_qkv(1, 2, 1, lq, 21, d), causal=True, **features("alibi", 1, 2, lq, 21))


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("lq", [1, 17])
def test_half_dtypes(dtype, lq):
    check(*make_qkv(2, 2, 1, lq, 33, 64, dtype), **features("all", 2, 2, lq, 33))


def test_decode_split_k_chunks():
    """Several key chunks, some entirely hidden by the window, merged by the combine pass; the
    window also moves the first chunk to k_begin = Lk - Lq - w + 1."""
    q, k, v = make_qkv(1, 4, 1, 3, 33, 64)
    for splits in (5, 33):
        check(q, k, v, num_splits=splits, causal=True, window=9, softcap=2.0)
    check(q, k, v, num_splits=4, **features("bool_mask", 1, 4, 3, 33))
    assert fa._num_chunks(33, 4, 5) == (7, 5) and fa._num_chunks(1, 4, 4) == (1, 1)
    assert fa._num_chunks(2048, 32, None) == (256, 8)


def test_rows_without_visible_keys_are_zero():
    q, k, v = make_qkv(1, 2, 1, 17, 5, 64)
    for lq in (17, 8):  # prefill and decode
        got, _ = check(q[:, :, :lq], k, v, causal=True)
        np.testing.assert_array_equal(got[:, :, : lq - 5], 0.0)  # causal, q_len > k_len
    got, _ = check(q, k, v, mask=mx.zeros((17, 5), dtype=mx.bool_))
    np.testing.assert_array_equal(got, 0.0)


@pytest.mark.parametrize("lq,dtype,feature", [(17, mx.float32, "all"), (3, mx.bfloat16, "all"), (17, mx.float32, "t5")])
def test_cuda_twin(lq, dtype, feature):
    check(*make_qkv(1, 4, 2, lq, 33, 80 if lq > 8 else 64, dtype), mode="emulate-cuda", num_splits=3,
          **features(feature, 1, 4, lq, 33))


@pytest.mark.parametrize("mode", ["emulate", "emulate-cuda"])
def test_groups_run_concurrently(mode):
    """Prefill groups, decode chunks and combine rows write disjoint outputs: run four groups at a
    time in reverse order (concurrent_groups), the results still match the reference."""
    with concurrent_groups(4):
        check(*make_qkv(1, 4, 2, 17, 33, 64), mode=mode, causal=True)  # 2 x 4 prefill groups
        check(*make_qkv(1, 4, 2, 3, 33, 64), mode=mode, num_splits=3, **features("alibi", 1, 4, 3, 33))


def test_cuda_twin_has_the_same_kernels():
    assert sorted(load_source("attention", "cuda").bodies) == sorted(load_source("attention", "metal").bodies)


def test_biases_match_the_positional_modules():
    """The reference's ALiBi and T5 biases are those of AlibiPositionalBias / RelativePositionBias."""
    q, k, v = make_qkv(1, 4, 4, 5, 9, 64)
    alibi = AlibiPositionalBias(heads=4)
    rel = RelativePositionBias(bidirectional=False, num_buckets=8, max_distance=16, num_heads=4)
    buckets = t5_relative_buckets(5, 9, bidirectional=False, num_buckets=8, max_distance=16, step=4)
    bias = alibi(5, 9)[None] + rel.compute_bias(5, 9, step=4)
    got = fa.fused_attention(q, k, v, alibi_slopes=alibi.position_bias().alibi_slopes, t5_table=rel.relative_attention_bias.weight,
                             t5_buckets=buckets, use_kernel=False)
    want = FlashAttention(flash=False)(q, k, v, attn_bias=bias)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)


def test_gradients_through_the_kernel_match_torch_autograd():
    """Gradients of the emulated kernel's custom function (q, k, v, the T5 table and the additive
    mask, with a window, softcap and ALiBi) against torch autograd of the torch reference
    written from the math (tests/reference/attention.py), in float64: the VJP is checked against
    an independent derivative, not against the reference's own. Bound: 1e-5 of each gradient's
    largest entry (float32 sums over at most 17 keys)."""
    torch = pytest.importorskip("torch")
    from reference.attention import fused_attention as torch_attention

    q, k, v = make_qkv(1, 2, 1, 17, 9, 64)
    # not causal, window 12: the visible keys of a row span several T5 buckets (with causal and q_len > k_len
    # they share one, and the table's true gradient is 0); query 2's additive mask is all -inf: an empty row
    kw = {**features("all", 1, 2, 17, 9), "causal": False, "window": 12}
    table, buckets, slopes = kw.pop("t5_table"), kw["t5_buckets"], kw["alibi_slopes"]
    mask = np.array(kw.pop("mask"))
    mask[:, :, 2] = -np.inf
    mask = mx.array(mask)

    def f(q, k, v, table, mask):
        out = fa.fused_attention(q, k, v, t5_table=table, mask=mask, use_kernel="emulate", **kw)
        return (out * mx.cos(out)).sum()

    got = mx.grad(f, argnums=(0, 1, 2, 3, 4))(q, k, v, table, mask)
    leaves = [torch.tensor(np.array(x), dtype=torch.float64, requires_grad=True) for x in (q, k, v, table, mask)]
    out = torch_attention(*leaves[:3], t5_table=leaves[3], mask=leaves[4], causal=kw["causal"], window=kw["window"],
                          softcap=kw["softcap"], alibi_slopes=torch.tensor(np.array(slopes), dtype=torch.float64),
                          t5_buckets=torch.tensor(np.array(buckets)))
    (out * torch.cos(out)).sum().backward()
    for name, g, leaf in zip(("q", "k", "v", "t5_table", "mask"), got, leaves):
        want = leaf.grad.numpy()
        assert np.isfinite(np.array(g)).all() and np.abs(want).max() > 0.1, name  # not round-off
        np.testing.assert_allclose(np.array(g), want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=name)
    assert float(mx.abs(got[0][:, :, 2]).max()) == 0  # the row with no visible key: zero gradient


def planted(old, new):
    src = load_source("attention", "metal")
    body = src.bodies["attention_prefill"]
    assert body.count(old) == 1
    return KernelSource(src.path + " (planted bug)", src.header, {**src.bodies, "attention_prefill": body.replace(old, new)})


@pytest.mark.parametrize("bug", ["none", "tile_index", "barrier"])
def test_planted_bugs_are_caught(bug, monkeypatch):
    """Copies of attention_prefill with an off-by-one key index in the tile staging, or without the
    barrier between staging K/V and scoring, must fail the comparison; the unmodified text, launched
    the same way, must pass it (so the harness itself is sound)."""
    q, k, v = make_qkv(1, 2, 1, 17, 33, 64)
    want = np.array(fa.fused_attention(q, k, v, causal=True, use_kernel=False))
    source = {
        "none": load_source("attention", "metal"),
        "tile_index": planted("const int j = k0 + x / D;", "const int j = k0 + x / D + 1;"),
        "barrier": planted("  threadgroup_barrier(mem_flags::mem_threadgroup);\n\n  for (int x = c; x < BK; x += TPQ) {",
                           "\n  for (int x = c; x < BK; x += TPQ) {"),
    }[bug]
    real = fa.Kernel.__call__

    def with_source(self, inputs, *, mode="metal", **kwargs):
        if self is fa._PREFILL:
            return emulate(self, inputs, source=source, **kwargs)
        return real(self, inputs, mode=mode, **kwargs)

    monkeypatch.setattr(fa.Kernel, "__call__", with_source)
    # A race may, rarely, go the right way: any wrong run of three is the signal.
    wrong = any(not np.allclose(np.array(fa.fused_attention(q, k, v, causal=True, use_kernel="emulate")), want,
                                rtol=1e-5, atol=1e-5) for _ in range(3 if bug == "barrier" else 1))
    assert wrong == (bug != "none"), f"planted bug {bug!r}: wrong={wrong}"


def test_flash_attention_routes_causal_with_mask_to_the_kernel(monkeypatch):
    """With a kernel path live FlashAttention sends causal + mask (and q_len > k_len) to fused_attention;
    here the kernels are emulated (use_kernels("emulate")). Without one (this machine) nothing changes."""
    q, k, v = make_qkv(2, 4, 2, 17, 9, 64)
    pad = mx.array(np.random.default_rng(0).random((2, 9)) > 0.3)
    attend = FlashAttention(causal=True)
    assert not attend._fused_applies(q, k, v, pad, None, True)
    want = [attend(q, k, v, mask=pad), attend(q, k, v)]
    with emulated_kernels(monkeypatch) as calls:
        assert attend._fused_applies(q, k, v, pad, None, True)
        got = [attend(q, k, v, mask=pad), attend(q, k, v)]
        assert len(calls) == 2 and all(c["causal"] for c in calls)  # q_len 17 > k_len 9 routes too
        assert calls[1]["mask"] is None
        for g, w in zip(got, want):
            np.testing.assert_allclose(np.array(g), np.array(w), rtol=1e-5, atol=1e-5)
        attend(q[:, :, :9], k, v)  # plain causal with q_len <= k_len stays on mx.fast
        assert len(calls) == 2
        assert not FlashAttention(causal=True, flash=False)._fused_applies(q, k, v, pad, None, True)
    with use_kernels("off"):
        assert not attend._fused_applies(q, k, v, pad, None, True)


def test_errors_name_the_function_and_expectation():
    q, k, v = make_qkv(1, 2, 1, 3, 5, 64)
    with pytest.raises(ValueError, match=r"\[fused_attention\] expected k of shape"):
        fa.fused_attention(q, k[..., :32], v)
    with pytest.raises(ValueError, match=r"\[fused_attention\] expected q, k, v of one floating dtype"):
        fa.fused_attention(q, k.astype(mx.float16), v)
    with pytest.raises(ValueError, match=r"alibi_slopes of shape \(2,\)"):
        fa.fused_attention(q, k, v, alibi_slopes=mx.ones((3,)))
    with pytest.raises(ValueError, match=r"t5_buckets of shape \(7,\)"):
        fa.fused_attention(q, k, v, t5_table=mx.ones((8, 2)), t5_buckets=mx.zeros((5,), mx.int32))
    with pytest.raises(ValueError, match=r"broadcastable to \(1, 2, 3, 5\)"):
        fa.fused_attention(q, k, v, mask=mx.ones((3, 4), mx.bool_))
    with pytest.raises(ValueError, match=r"window to be an int >= 1"):
        fa.fused_attention(q, k, v, window=0)
    q48, k48, v48 = make_qkv(1, 2, 1, 3, 5, 48)
    with pytest.raises(ValueError, match=r"the kernels expect head dim in \(64, 80"):
        fa.fused_attention(q48, k48, v48, use_kernel="emulate")
    fa.fused_attention(q48, k48, v48)  # use_kernel=None falls back to the reference


@pytest.mark.parametrize("case", ["alibi-partial", "t5-encoder", "t5-decoder"])
def test_attention_layers_send_position_biases_as_o_l_data(case, monkeypatch):
    """With a kernel path live (here emulated), AttentionLayers hands ALiBi slopes or the T5 table and buckets to
    the fused kernel (PositionBias) instead of an (n, k_len) bias; outputs and parameter gradients
    (T5 table included, through the custom VJP) equal the CPU path that materialises the bias."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlx_zeta.structs import Decoder, Encoder

    mx.random.seed(0)
    kw = dict(dim=128, depth=2, heads=2)
    layers = {"alibi-partial": lambda: Decoder(**kw, alibi_pos_bias=True, alibi_num_heads=1),
              "t5-encoder": lambda: Encoder(**kw, rel_pos_bias=True, rel_pos_num_buckets=8, rel_pos_max_distance=16),
              "t5-decoder": lambda: Decoder(**kw, rel_pos_bias=True, rel_pos_num_buckets=8,
                                            rel_pos_max_distance=16)}[case]()
    x = mx.array(np.random.default_rng(0).standard_normal((1, 11, 128)).astype(np.float32))

    def loss(model):
        return (model(x) ** 2).sum()

    want, want_grads = nn.value_and_grad(layers, loss)(layers)
    want_grads = dict(tree_flatten(want_grads))
    with emulated_kernels(monkeypatch) as calls:
        got, grads = nn.value_and_grad(layers, loss)(layers)
    assert len(calls) == 2  # one per layer
    assert all(c["mask"] is None for c in calls)  # no (n, k_len) array went in
    key = "alibi_slopes" if case.startswith("alibi") else "t5_buckets"
    assert all(c[key] is not None and c[key].ndim == 1 for c in calls)
    np.testing.assert_allclose(got.item(), want.item(), rtol=1e-5)
    for name, g in tree_flatten(grads):
        np.testing.assert_allclose(np.array(g), np.array(want_grads[name]), rtol=1e-4, atol=1e-5, err_msg=name)
