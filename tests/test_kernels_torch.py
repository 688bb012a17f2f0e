"""fused_attention's pure-MLX ``_reference`` (the definition of correctness every kernel test
compares with) against PyTorch attention written from the math (tests/reference/attention.py:
softmax(cap(scale q k^T) + bias + mask) v with the causal / window / keep masks materialised,
GQA by repeating kv heads), in float64. Covers what the kernel tests check only against
``_reference`` itself: soft-capping, sliding windows, boolean / additive / broadcast masks, GQA,
ALiBi and T5 biases, and half-precision inputs.

Tolerances: float32 output vs float64 torch, 5e-6 absolute (measured 1.5e-6, |o| <~ 3); float16 / bfloat16 one unit
in the last place of the output (the reference computes in float32 and rounds once)."""

import numpy as np
import pytest

import mlx.core as mx

from mlx_zeta.kernels import attention as fa
from mlx_zeta.kernels import t5_relative_buckets
from mlx_zeta.nn.positional import AlibiPositionalBias

torch = pytest.importorskip("torch")
from reference.attention import fused_attention  # noqa: E402

TOL = {mx.float32: dict(rtol=0, atol=5e-6), mx.float16: dict(rtol=1e-3, atol=1e-3),
       mx.bfloat16: dict(rtol=8e-3, atol=8e-3)}
B, HQ, HKV, LQ, LK, D = 2, 4, 2, 7, 12, 16


def make_inputs(b, hq, hkv, lq, lk, d, dtype, seed):
    rng = np.random.default_rng(seed)
    return [mx.array(rng.standard_normal(s).astype(np.float32) * 1.5).astype(dtype)
            for s in ((b, hq, lq, d), (b, hkv, lk, d), (b, hkv, lk, d))]


def masks(rng, b, hq, lq, lk):
    """Boolean keep-masks and additive masks in every broadcast layout fused_attention takes."""
    keep = rng.random((b, hq, lq, lk)) > 0.35
    keep[0, 1, 2] = False  # a row with no visible key
    add = rng.standard_normal((b, hq, lq, lk)).astype(np.float32)
    add[1, :, :, 3] = -np.inf
    return {
        "bool_4d": keep, "bool_key_padding": keep[:, :1, :1, :], "bool_2d": keep[0, 0],
        "bool_per_head": keep[:1, :, :1, :], "bool_3d": keep[0],
        "add_4d": add, "add_2d": add[0, 0], "add_broadcast_heads": add[:, :1], "add_per_query": add[:1, :, :, :1],
    }


CASES = {
    "plain": {}, "causal": dict(causal=True), "softcap": dict(softcap=1.5, scale=0.7),
    "window": dict(window=4), "window_1": dict(window=1), "causal_window": dict(causal=True, window=3),
    "softcap_window_causal": dict(softcap=0.8, window=5, causal=True),
    **{m: dict(mask=m) for m in ("bool_4d", "bool_key_padding", "bool_2d", "bool_per_head", "bool_3d", "add_4d",
                                 "add_2d", "add_broadcast_heads", "add_per_query")},
    "softcap_add_mask": dict(softcap=1.0, mask="add_4d"), "softcap_alibi": dict(softcap=1.0, bias="alibi"),
    "alibi_window": dict(bias="alibi", window=6), "t5_causal": dict(bias="t5", causal=True),
    "everything": dict(causal=True, window=6, softcap=2.0, bias="alibi+t5", mask="add_broadcast_heads"),
}


def to_torch(x):
    """An mx array as a float64 (floating), bool or int64 torch tensor."""
    if x.dtype == mx.bool_:
        return torch.tensor(np.array(x))
    if mx.issubdtype(x.dtype, mx.integer):
        return torch.tensor(np.array(x), dtype=torch.int64)
    return torch.tensor(np.array(x.astype(mx.float32)), dtype=torch.float64)


def run_both(case, b=B, hq=HQ, hkv=HKV, lq=LQ, lk=LK, dtype=mx.float32, seed=0):
    """(fused_attention's reference output, torch float64 output) for one case of CASES."""
    rng = np.random.default_rng(seed + 7)
    q, k, v = make_inputs(b, hq, hkv, lq, lk, D, dtype, seed)
    kw = dict(CASES[case])
    bias_kind, mask_name = kw.pop("bias", ""), kw.pop("mask", None)
    if "alibi" in bias_kind:
        kw["alibi_slopes"] = mx.array(AlibiPositionalBias._get_slopes(hq))
    if "t5" in bias_kind:
        kw.update(t5_table=mx.array(rng.standard_normal((8, hq)).astype(np.float32)),
                  t5_buckets=t5_relative_buckets(lq, lk, num_buckets=8, max_distance=16))
    if mask_name is not None:
        kw["mask"] = mx.array(masks(rng, b, hq, lq, lk)[mask_name])
    got = fa.fused_attention(q, k, v, use_kernel=False, **kw)
    want = fused_attention(*map(to_torch, (q, k, v)), **{n: to_torch(x) if isinstance(x, mx.array) else x
                                                            for n, x in kw.items()})
    return np.array(got.astype(mx.float32)), want.numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_matches_torch_math(case):
    got, want = run_both(case)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, **TOL[mx.float32])


@pytest.mark.parametrize("hq,hkv", [(4, 1), (4, 4), (6, 2)])
@pytest.mark.parametrize("lq,lk", [(1, 9), (9, 4), (5, 5)])
def test_gqa_and_alignment(hq, hkv, lq, lk):
    """GQA groups (MQA, MHA, 3 queries per kv head) with q_len below, above and equal to k_len."""
    got, want = run_both("softcap_window_causal", hq=hq, hkv=hkv, lq=lq, lk=lk, seed=lq + lk)
    np.testing.assert_allclose(got, want, **TOL[mx.float32])


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("case", ["everything", "bool_key_padding", "softcap_add_mask"])
def test_half_precision(dtype, case):
    got, want = run_both(case, dtype=dtype)
    np.testing.assert_allclose(got, want, **TOL[dtype])


def test_the_cases_exercise_what_they_name():
    """Each feature changes the output (so a reference ignoring it could not pass), and the
    masks leave a row with no visible key, which both sides output as 0."""
    plain, _ = run_both("plain")
    for case in ("softcap", "window", "window_1", "bool_4d", "add_4d", "bool_3d", "alibi_window", "t5_causal"):
        got, _ = run_both(case)
        assert np.abs(got - plain).max() > 1e-2, case
    got, want = run_both("bool_4d")
    assert not got[0, 1, 2].any() and not want[0, 1, 2].any()
