"""Sampling filters and sample() (mlx_zeta.structs.sampling): hand-computed rows with
their derivation, ties, batches against a plain numpy reference, empirical sampling
frequencies against the filtered softmax, keys, and argument errors."""

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core loads)
import mlx.core as mx
import numpy as np
import pytest

from mlx_zeta.structs import min_p_filter, sample, top_k_filter, top_p_filter

NEG = -np.inf


def kept(filtered: mx.array) -> np.ndarray:
    """Boolean (batch, vocab): which entries survived the filter."""
    return np.isfinite(np.array(filtered))


def check_values(filtered: mx.array, logits: np.ndarray, keep: np.ndarray) -> None:
    """Kept entries are unchanged, the others are -inf."""
    np.testing.assert_array_equal(kept(filtered), keep)
    np.testing.assert_array_equal(np.array(filtered), np.where(keep, logits, NEG))


# ------------------------------------------------------------------ numpy references (plain loops)


def ref_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros(logits.shape, bool)
    for r, row in enumerate(logits):
        kth = sorted(row, reverse=True)[min(k, len(row)) - 1]
        out[r] = row >= kth
    return out


def ref_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    out = np.zeros(logits.shape, bool)
    for r, row in enumerate(logits.astype(np.float64)):
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        mass, last = 0.0, None
        for prob in sorted(probs, reverse=True):  # add tokens until the mass reaches p
            mass += prob
            last = prob
            if mass >= p:
                break
        out[r] = probs >= last
    return out


def ref_min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return probs >= min_p * probs.max(-1, keepdims=True)


def random_logits(rng, b=6, v=40):
    # distinct values and no probability mass sits within float32 rounding of a threshold
    return (rng.standard_normal((b, v)) * 2).astype(np.float32)


# ------------------------------------------------------------------ top-k


def test_top_k_hand_computed_batch_and_ties():
    logits = np.array([[1.0, 3.0, 2.0, 5.0, 4.0],
                       [0.0, 2.0, 2.0, -1.0, 1.0],      # tie at the 2nd place: both 2s kept for k=1 and k=2
                       [7.0, 7.0, 7.0, 7.0, 7.0]], np.float32)  # all tied: everything kept
    check_values(top_k_filter(mx.array(logits), 2), logits,
                 np.array([[0, 0, 0, 1, 1], [0, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool))
    check_values(top_k_filter(mx.array(logits), 1), logits,
                 np.array([[0, 0, 0, 1, 0], [0, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool))
    # k = 3 on row 1: 2, 2, then 1 is the 3rd largest -> {2, 2, 1}
    check_values(top_k_filter(mx.array(logits), 3), logits,
                 np.array([[0, 1, 0, 1, 1], [0, 1, 1, 0, 1], [1, 1, 1, 1, 1]], bool))
    for k in (5, 99):  # k >= vocab keeps all
        np.testing.assert_array_equal(np.array(top_k_filter(mx.array(logits), k)), logits)


@pytest.mark.parametrize("k", [1, 3, 10, 39])
def test_top_k_matches_numpy(rng, k):
    logits = random_logits(rng)
    check_values(top_k_filter(mx.array(logits), k), logits, ref_top_k(logits, k))
    assert (kept(top_k_filter(mx.array(logits), k)).sum(-1) == k).all()  # distinct values: exactly k


def test_top_k_keeps_dtype_and_existing_minus_inf():
    logits = mx.array([[0.5, -np.inf, 0.25, 1.0]]).astype(mx.float16)
    out = top_k_filter(logits, 2)
    assert out.dtype == mx.float16
    np.testing.assert_array_equal(kept(out.astype(mx.float32)), [[1, 0, 0, 1]])


# ------------------------------------------------------------------ top-p


def test_top_p_hand_computed():
    # probabilities 0.5, 0.2, 0.15, 0.1, 0.05 (shuffled). Cumulative from the top:
    # 0.5, 0.7, 0.85, 0.95, 1.0, so p=0.3 keeps {0.5}; p=0.6 keeps {0.5, 0.2};
    # p=0.8 keeps {0.5, 0.2, 0.15}; p=0.9 keeps four; p=0.99 keeps all.
    probs = np.array([0.1, 0.5, 0.05, 0.2, 0.15])
    logits = np.log(probs).astype(np.float32)[None]
    for p, want in [(0.3, [0, 1, 0, 0, 0]), (0.6, [0, 1, 0, 1, 0]), (0.8, [0, 1, 0, 1, 1]),
                    (0.9, [1, 1, 0, 1, 1]), (0.99, [1, 1, 1, 1, 1]), (1.0, [1, 1, 1, 1, 1])]:
        check_values(top_p_filter(mx.array(logits), p), logits, np.array([want], bool))
    # shifting the logits changes nothing (softmax is shift-invariant)
    np.testing.assert_array_equal(kept(top_p_filter(mx.array(logits + 3.0), 0.8)), [[0, 1, 0, 1, 1]])


def test_top_p_ties_and_batch_rows():
    # row 0: 0.3, 0.3, 0.2, 0.2 -> p=0.4 needs both 0.3s (the 2nd is tied with the 1st anyway);
    #        p=0.65: 0.3+0.3 = 0.6 < 0.65, add one 0.2 (0.8) -> its tie, the other 0.2, is kept too.
    # row 1: a dominant token, 0.9 >= 0.65 -> only it.
    logits = np.log(np.array([[0.3, 0.2, 0.3, 0.2], [0.02, 0.9, 0.05, 0.03]])).astype(np.float32)
    np.testing.assert_array_equal(kept(top_p_filter(mx.array(logits), 0.4)), [[1, 0, 1, 0], [0, 1, 0, 0]])
    np.testing.assert_array_equal(kept(top_p_filter(mx.array(logits), 0.65)), [[1, 1, 1, 1], [0, 1, 0, 0]])
    # p tiny: always at least the most likely token
    np.testing.assert_array_equal(kept(top_p_filter(mx.array(logits), 1e-6)), [[1, 0, 1, 0], [0, 1, 0, 0]])


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.97])
def test_top_p_matches_numpy(rng, p):
    logits = random_logits(rng)
    check_values(top_p_filter(mx.array(logits), p), logits, ref_top_p(logits, p))


def test_top_p_bfloat16_logits_use_float32_mass():
    logits = np.log(np.array([[0.1, 0.5, 0.05, 0.2, 0.15]])).astype(np.float32)
    out = top_p_filter(mx.array(logits).astype(mx.bfloat16), 0.8)
    assert out.dtype == mx.bfloat16
    np.testing.assert_array_equal(kept(out.astype(mx.float32)), [[0, 1, 0, 1, 1]])


# ------------------------------------------------------------------ min-p


def test_min_p_hand_computed():
    # max prob 0.5: min_p=0.25 keeps prob >= 0.125 -> {0.5, 0.2, 0.15}; min_p=0.5 keeps >= 0.25 -> {0.5};
    # min_p=0.18 keeps >= 0.09 -> {0.5, 0.2, 0.15, 0.1}; min_p=0 keeps all.
    probs = np.array([[0.1, 0.5, 0.05, 0.2, 0.15]])
    logits = np.log(probs).astype(np.float32)
    for min_p, want in [(0.25, [0, 1, 0, 1, 1]), (0.5, [0, 1, 0, 0, 0]), (0.18, [1, 1, 0, 1, 1]), (0.0, [1] * 5)]:
        check_values(min_p_filter(mx.array(logits), min_p), logits, np.array([want], bool))
    # ties with the maximum survive min_p = 1
    tied = np.array([[2.0, 1.0, 2.0]], np.float32)
    np.testing.assert_array_equal(kept(min_p_filter(mx.array(tied), 1.0)), [[1, 0, 1]])


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.3, 0.8])
def test_min_p_matches_numpy(rng, min_p):
    logits = random_logits(rng)
    check_values(min_p_filter(mx.array(logits), min_p), logits, ref_min_p(logits, min_p))


# ------------------------------------------------------------------ sample


def test_sample_greedy_and_top_k_one_are_argmax(rng):
    logits = random_logits(rng, b=8)
    want = logits.argmax(-1)
    out = sample(mx.array(logits), temperature=0)
    assert out.dtype == mx.int32 and out.shape == (8,)
    np.testing.assert_array_equal(np.array(out), want)
    np.testing.assert_array_equal(np.array(sample(mx.array(logits), temperature=0, top_p=0.1, min_p=0.9)), want)
    np.testing.assert_array_equal(np.array(sample(mx.array(logits), top_k=1, key=mx.random.key(3))), want)


def test_sample_frequencies_match_filtered_tempered_softmax():
    """20,000 draws of one row: top-k 4 then top-p 0.9 on the renormalised four, at T = 0.7.

    probabilities 0.35, 0.25, 0.2, 0.1, 0.06, 0.04: top-k keeps the first four (mass 0.9),
    renormalised 0.389, 0.278, 0.222, 0.111; cumulative 0.389, 0.667, 0.889 < 0.9, so top-p
    keeps all four. Then softmax(log pi / 0.7) over them."""
    probs = np.array([0.35, 0.25, 0.2, 0.1, 0.06, 0.04])
    logits = np.log(probs).astype(np.float32)
    n = 20000
    draws = np.array(sample(mx.array(np.tile(logits, (n, 1))), temperature=0.7, top_k=4, top_p=0.9,
                            key=mx.random.key(0)))
    want = np.zeros(6)
    want[:4] = probs[:4] ** (1 / 0.7)
    want /= want.sum()
    freq = np.bincount(draws, minlength=6) / n
    assert freq[4:].sum() == 0  # filtered tokens are never drawn
    np.testing.assert_allclose(freq, want, atol=0.015)  # 4.5 standard errors at p ~ 0.4


def test_sample_min_p_and_top_p_exclude_tokens():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = mx.array(np.tile(np.log(probs).astype(np.float32), (4000, 1)))
    assert set(np.array(sample(logits, top_p=0.7, key=mx.random.key(1)))) == {0, 1}  # 0.5 + 0.3 reaches 0.7
    assert set(np.array(sample(logits, min_p=0.2, key=mx.random.key(1)))) == {0, 1, 2}  # >= 0.1


def test_sample_keys():
    logits = mx.zeros((64, 50))
    a = np.array(sample(logits, key=mx.random.key(7)))
    np.testing.assert_array_equal(a, np.array(sample(logits, key=mx.random.key(7))))
    assert (a != np.array(sample(logits, key=mx.random.key(8)))).any()
    mx.random.seed(11)
    g1 = np.array(sample(logits))
    mx.random.seed(11)
    np.testing.assert_array_equal(g1, np.array(sample(logits)))


def test_sampling_errors():
    x = mx.zeros((2, 5))
    with pytest.raises(ValueError, match=r"^\[top_k_filter\] expected top_k to be an int >= 1, got 0"):
        top_k_filter(x, 0)
    with pytest.raises(ValueError, match=r"^\[top_k_filter\] expected top_k to be an int >= 1, got 2.0"):
        top_k_filter(x, 2.0)
    with pytest.raises(ValueError, match=r"^\[top_p_filter\] expected top_p to be a number with 0 < top_p <= 1, got 0"):
        top_p_filter(x, 0)
    with pytest.raises(ValueError, match=r"^\[top_p_filter\] expected top_p .* got 1.5"):
        top_p_filter(x, 1.5)
    with pytest.raises(ValueError, match=r"^\[min_p_filter\] expected min_p to be a number with 0 <= min_p <= 1, got -0.1"):
        min_p_filter(x, -0.1)
    with pytest.raises(ValueError, match=r"^\[top_k_filter\] expected floating logits of shape \(batch, vocab\), got shape \(5,\)"):
        top_k_filter(mx.zeros((5,)), 2)
    with pytest.raises(ValueError, match=r"^\[sample\] expected floating logits .* dtype mlx.core.int32"):
        sample(mx.zeros((2, 5), dtype=mx.int32))
    with pytest.raises(ValueError, match=r"^\[sample\] expected temperature to be a number >= 0 \(0 = greedy\), got -1"):
        sample(x, temperature=-1)
    with pytest.raises(ValueError, match=r"^\[sample\] expected temperature .* got nan"):
        sample(x, temperature=float("nan"))
    with pytest.raises(ValueError, match=r"^\[sample\] expected top_k to be an int >= 1, got 0"):
        sample(x, temperature=0, top_k=0)  # checked even when greedy ignores it
    with pytest.raises(ValueError, match=r"^\[sample\] expected key to be None or a key from mx.random.key \(shape \(2,\), uint32\), got int"):
        sample(x, key=3)
