"""decode_steps (structs/decoding.py), the loop AutoregressiveWrapper and T5Model.generate share,
checked on hand-made "models" whose next logits are a known function of the last token."""

import mlx_zeta  # noqa: F401  (before mlx.core: fast BLAS)
import mlx.core as mx
import numpy as np

from mlx_zeta.structs import decode_steps, sample

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
