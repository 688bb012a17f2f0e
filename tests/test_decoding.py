"""decode_steps (structs/decoding.py), the loop AutoregressiveWrapper and T5Model.generate share,
checked on hand-made "models" whose next logits are a known function of the last token."""

import mlx_zeta  # noqa: F401  (before mlx.core: fast BLAS)
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mlx_zeta.structs import decode_steps, sample
from mlx_zeta.structs.decoding import check_token_ids

V = 6


def successor(tok: mx.array) -> mx.array:
    """Logits whose argmax is (token + 1) mod V."""
    return mx.eye(V)[(tok + 1) % V] * 5.0


def test_greedy_tokens_and_end_tokens_by_hand():
    # rows start at 0 and 3: greedy successors are 1, 2, 3, ... and 4, 5, 0, ...
    first = successor(mx.array([0, 3]))
    toks = [t.tolist() for t in decode_steps(successor, first, 5, mx.random.key(0), temperature=0)]
    assert toks == [[1, 4], [2, 5], [3, 0], [4, 1], [5, 2]]
    # end token 5: row 1 ends at step 2, row 0 at step 5 (the last token that ends every row stops the loop)
    toks = [t.tolist() for t in decode_steps(successor, first, 9, mx.random.key(0), temperature=0, eos=[5],
                                             pad_value=-1)]
    assert toks == [[1, 4], [2, 5], [3, -1], [4, -1], [5, -1]]
    # two end tokens: either one ends a row
    toks = [t.tolist() for t in decode_steps(successor, first, 9, mx.random.key(0), temperature=0, eos=[2, 5],
                                             pad_value=-1)]
    assert toks == [[1, 4], [2, 5]]


def test_sampled_draws_use_one_key_split_per_step():
    """Each step draws with the second half of a split of the running key (what AutoregressiveWrapper
    documents); recomputed here with sample() and mx.random.split by hand."""
    logits = mx.array(np.random.default_rng(0).normal(size=(3, V)).astype(np.float32))
    key = mx.random.key(7)
    got = [t.tolist() for t in decode_steps(lambda t: logits, logits, 6, key, temperature=1.3, top_k=4)]
    want = []
    for _ in range(6):
        key, sub = mx.random.split(key)
        want.append(sample(logits, temperature=1.3, top_k=4, key=sub).tolist())
    assert got == want
    assert len({tuple(t) for t in got}) > 1  # really sampled, not one repeated draw


def test_step_is_called_once_per_further_token():
    calls = []

    def step(tok):
        calls.append(tok.tolist())
        return successor(tok)

    toks = list(decode_steps(step, successor(mx.array([0])), 4, mx.random.key(0), temperature=0))
    assert [t.tolist() for t in toks] == [[1], [2], [3], [4]]
    assert calls == [[1], [2], [3]]  # the model is fed each token but the last


def test_finished_rows_feed_the_model_their_drawn_token_not_the_pad():
    """After a row ends, callers get pad_value, but the model is fed the sampled token (a valid id):
    a pad such as -1 or vocab + 1 would index outside an embedding table."""
    calls = []

    def step(tok):
        calls.append(tok.tolist())
        return successor(tok)

    toks = [t.tolist() for t in decode_steps(step, successor(mx.array([0, 3])), 5, mx.random.key(0), temperature=0,
                                             eos=[5], pad_value=-1)]
    assert toks == [[1, 4], [2, 5], [3, -1], [4, -1], [5, -1]]
    assert calls == [[1, 4], [2, 5], [3, 0], [4, 1]]  # row 1 keeps drawing successors of its own tokens


# ------------------------------------------------------------------ check_token_ids

INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32]


@settings(max_examples=150, deadline=None)
@given(ids=hnp.arrays(st.sampled_from(INT_DTYPES), hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=5)),
       vocab=st.integers(1, 300))
def test_token_ids_accepted_iff_every_id_is_in_range(ids, vocab):
    """Any integer array of any dtype: accepted exactly when every id is in [0, vocab); otherwise the
    message names the first bad id in row-major order (found here with numpy), its position and vocab."""
    wide = ids.astype(np.int64)
    bad = np.argwhere((wide < 0) | (wide >= vocab))
    if len(bad) == 0:
        assert check_token_ids("Owner", "prompt", mx.array(ids), vocab) is not None
        return
    r, c = bad[0]
    with pytest.raises(ValueError) as info:
        check_token_ids("Owner", "prompt", mx.array(ids), vocab)
    assert str(info.value) == f"[Owner] expected prompt token ids in [0, {vocab}), got {wide[r, c]} at ({r}, {c})"


@settings(max_examples=60, deadline=None)
@given(ids=hnp.arrays(st.sampled_from([np.float16, np.float32, np.bool_, np.int32]),
                      hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=3)))
def test_token_ids_of_other_dtypes_ranks_or_empty_axes_are_refused(ids):
    """Only an integer (batch, n) array with batch, n >= 1 passes the shape check (with no vocabulary given)."""
    ok = ids.ndim == 2 and ids.size > 0 and ids.dtype == np.int32
    if ok:
        check_token_ids("Owner", "ids", mx.array(ids), None)
        return
    with pytest.raises(ValueError, match=r"^\[Owner\] expected ids as integer token ids of shape \(batch, n\) with "
                                         r"batch, n >= 1, got shape .* and dtype "):
        check_token_ids("Owner", "ids", mx.array(ids), None)


def test_token_ids_edge_cases():
    huge = np.array([[3, 2**64 - 1]], np.uint64)  # beyond int64: must not wrap into range
    with pytest.raises(ValueError, match=rf"got {2**64 - 1} at \(0, 1\)$"):
        check_token_ids("Owner", "prompt", mx.array(huge), 512)
    small = mx.array([[255]], mx.uint8)  # the bound 512 does not fit uint8: compared in int64, so accepted
    assert check_token_ids("Owner", "prompt", small, 512) is small
    with pytest.raises(ValueError, match=r"expected prompt as integer token ids .* got list$"):
        check_token_ids("Owner", "prompt", [[1, 2]], 512)
