"""mlx_zeta/lm/batch.py (left-padded batched generation) and Transformer's ``positions``.

Law: batched == single. Each row of a left-padded batch equals that prompt run alone: at the
logits level (padded prefill and decoding steps against each row through its own cache,
rotary and learned absolute positions), and end to end (batch_stream_generate against
stream_generate per prompt at temperature 0: tokens, text, finish reasons exactly, logprobs
within 1e-4), with rows ending at their own end token, with penalties counting only each
row's own tokens, and with bounded caches. Bad input gets one-line errors."""

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core loads)
import mlx.core as mx
import numpy as np
import pytest
from lm_blocks import hf_checkpoint, same_weights, tiny_lm, tiny_tokenizer

from mlx_zeta.lm import batch_generate, batch_stream_generate, make_caches, stream_generate
from mlx_zeta.lm.batch import left_pad

ROWS = [[5, 17, 3], [60, 22, 9, 41, 8, 13, 77, 2, 30], [4, 50, 51, 52, 1, 88]]
TEXTS = ["the quick brown", "a cat sat on the mat and looked", "héllo 世界", "numbers 0123"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def model_for(shape, tok, **kw):
    return tiny_lm(shape, vocab=tok.vocab_size, **kw)


@pytest.mark.parametrize("shape", ["rotary", "absolute"])
def test_left_padded_forward_equals_each_row_alone(shape):
    """Logits of the real positions of a left-padded prefill and of 5 decoding steps (the same
    forced tokens per row) equal each row's own cached run within 1e-5 of the largest logit
    (measured 5.9e-6 rotary, where a row's positions are shifted by its pads; 0 absolute)."""
    model = tiny_lm(shape)
    absolute = "pos_emb" in model
    ids, mask, pos = left_pad(ROWS)
    caches = make_caches(model)
    got = [model(ids, cache=caches, mask=mask, positions=pos if absolute else None)]
    forced = mx.array([[7, 11, 13, 17, 19], [23, 29, 31, 37, 41], [43, 47, 53, 59, 61]])
    nxt = pos[:, -1:] + 1
    for t in range(forced.shape[1]):
        mask = mx.concatenate([mask, mx.ones((3, 1), mx.bool_)], axis=1)
        got.append(model(forced[:, t:t + 1], cache=caches, mask=mask, positions=nxt + t if absolute else None))
    got = mx.concatenate(got, axis=1)  # (3, 9 + 5, V)
    worst = 0.0
    for r, row in enumerate(ROWS):
        own = make_caches(model)
        want = [model(mx.array([row]), cache=own)]
        want += [model(forced[r:r + 1, t:t + 1], cache=own) for t in range(forced.shape[1])]
        want = mx.concatenate(want, axis=1)[0]
        worst = max(worst, (mx.abs(got[r, 9 - len(row):] - want).max() / mx.abs(want).max()).item())
    assert worst < 1e-5, worst  # relative to the largest logit: rotary angles of shifted positions round differently
    if absolute:  # without its own positions a padded row is shifted: the law needs them
        shifted = model(ids, mask=left_pad(ROWS)[1])
        assert mx.abs(shifted[0, -1] - model(mx.array([ROWS[0]]))[0, -1]).max().item() > 1e-2


def singles(model, tok, prompts, **kw):
    return [list(stream_generate(model, tok, p, **kw)) for p in prompts]


def batched(model, tok, prompts, **kw):
    """Each row's responses of batch_stream_generate, checking that a row yields nothing after it ended."""
    rows = [[] for _ in prompts]
    for step in batch_stream_generate(model, tok, prompts, **kw):
        assert len(step) == len(prompts)
        for r, resp in enumerate(step):
            if resp is None:
                assert rows[r] and rows[r][-1].finish_reason is not None
            else:
                assert not rows[r] or rows[r][-1].finish_reason is None
                rows[r].append(resp)
    return rows


def assert_rows_equal(got, want, tol=1e-4):
    worst = 0.0
    for g, w in zip(got, want):
        assert [r.token for r in g] == [r.token for r in w]
        assert [r.text for r in g] == [r.text for r in w]
        assert [r.finish_reason for r in g] == [r.finish_reason for r in w]
        assert [r.prompt_tokens for r in g] == [r.prompt_tokens for r in w]
        worst = max(worst, float(np.max(np.abs(np.array([r.logprob for r in g]) - [r.logprob for r in w]))))
    assert worst < tol, worst
    return worst


@pytest.mark.parametrize("shape", ["rotary", "absolute"])
@pytest.mark.parametrize("kind", ["text", "ids", "messages"])
def test_batch_equals_single_runs(tok, shape, kind):
    """Greedy batch == each prompt alone (text, token ids or chat messages; prompts of 3 to 10 tokens)."""
    model = model_for(shape, tok)
    prompts = {"text": TEXTS, "ids": [tok.encode(t) for t in TEXTS],
               "messages": [[{"role": "user", "content": t}] for t in TEXTS]}[kind]
    kw = dict(max_tokens=10, temperature=0.0, eos_token_ids=[])
    got, want = batched(model, tok, prompts, **kw), singles(model, tok, prompts, **kw)
    assert_rows_equal(got, want)
    assert len({tuple(r.token for r in row) for row in want}) > 1  # rows really differ
    assert batch_generate(model, tok, prompts, **kw) == ["".join(r.text for r in row) for row in want]


def test_rows_end_at_their_own_end_token(tok):
    """With an end token that one row produces early and another later, each row stops at its own
    (finish_reason "stop", nothing after), the rest run to max_tokens, all as their single runs."""
    model = model_for("rotary", tok)
    free = singles(model, tok, TEXTS, max_tokens=12, temperature=0.0, eos_token_ids=[])
    end = free[1][3].token  # row 1 ends at its 4th token
    got = batched(model, tok, TEXTS, max_tokens=12, temperature=0.0, eos_token_ids=[end])
    want = singles(model, tok, TEXTS, max_tokens=12, temperature=0.0, eos_token_ids=[end])
    assert_rows_equal(got, want)
    lengths = [len(row) for row in got]
    assert lengths[1] <= 4 and max(lengths) == 12 and got[1][-1].finish_reason == "stop"


def test_penalties_and_stop_strings_per_row(tok):
    """Repetition/presence penalties count each row's own prompt and tokens (not the pads), and a
    stop string cuts only its row: equal to single runs."""
    model = model_for("absolute", tok)
    kw = dict(max_tokens=10, temperature=0.0, eos_token_ids=[], repetition_penalty=1.5, presence_penalty=0.5,
              stop=["e"])
    assert_rows_equal(batched(model, tok, TEXTS, **kw), singles(model, tok, TEXTS, **kw))


def test_bounded_caches_batch_equals_single(tok):
    """max_kv_size=6 (shorter than every row's total): batched rows equal their single runs."""
    model = model_for("rotary", tok)
    kw = dict(max_tokens=8, temperature=0.0, eos_token_ids=[], max_kv_size=6)
    assert_rows_equal(batched(model, tok, TEXTS, **kw), singles(model, tok, TEXTS, **kw))


def test_sampled_rows_are_reproducible(tok):
    """temperature > 0: the same seed gives the same batch (rows differ from single runs by design)."""
    model = model_for("rotary", tok)
    kw = dict(max_tokens=6, temperature=1.0, seed=3, eos_token_ids=[])
    assert batch_generate(model, tok, TEXTS, **kw) == batch_generate(model, tok, TEXTS, **kw)


@pytest.mark.parametrize("prompts, message", [
    ([], "expected prompts as a non-empty list of prompts, got an empty list"),
    ("just text", "expected prompts as a non-empty list of prompts, got str"),
    (["text", [1, 2, 3]], "expected prompts of one kind"),
    ([[1, 2], []], "prompts[1]: expected a prompt of at least one token"),
    ([[1, 2], [1, 10**6]], "expected prompts[1] token ids in [0, 300), got 1000000 at (0, 1)"),
    (["x" * 200], "expected each prompt and max_tokens=4 to fit the model's 96 positions"),
])
def test_bad_input(tok, prompts, message):
    model = model_for("absolute", tok)
    with pytest.raises(ValueError) as err:
        batch_generate(model, tok, prompts, max_tokens=4)
    assert str(err.value).startswith("[batch_generate] ") and message in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_bad_model_or_tokenizer(tok):
    model = model_for("rotary", tok)
    with pytest.raises(ValueError, match=r"^\[batch_generate\] expected a mlx_zeta.lm Tokenizer"):
        batch_generate(model, object(), TEXTS)
    with pytest.raises(ValueError, match=r"^\[batch_generate\] expected a causal LM"):
        batch_generate(object(), tok, TEXTS)


def test_transformer_positions_argument():
    """positions replaces the absolute positions: rows at positions k.. equal the default call of a
    copy whose position table is shifted by k rows; positions equal to the default change nothing;
    a wrong shape or dtype is refused."""
    model = tiny_lm("absolute")
    x, k = mx.array([[5, 17, 9, 2], [8, 8, 1, 60]]), mx.array([[3], [7]])
    got = model(x, positions=mx.arange(4)[None] + k)
    for r in range(2):
        shifted = same_weights(model, tiny_lm("absolute", seed=2))
        table = shifted.pos_emb.emb.weight
        shifted.pos_emb.emb.weight = mx.concatenate([table[k[r, 0].item():], table[:k[r, 0].item()]])
        assert mx.abs(got[r] - shifted(x[r:r + 1])[0]).max().item() < 1e-5
    assert mx.array_equal(model(x, positions=mx.broadcast_to(mx.arange(4), (2, 4))), model(x))
    with pytest.raises(ValueError, match=r"^\[Transformer\] expected integer positions of shape \(1, 3\), got shape"):
        model(mx.array([[5, 17, 9]]), positions=mx.array([[3.0, 4.0, 5.0]]))
    with pytest.raises(ValueError, match=r"^\[Transformer\] expected integer positions of shape \(1, 3\), got list"):
        model(mx.array([[5, 17, 9]]), positions=[[3, 4, 5]])


@pytest.mark.parametrize("case", ["gpt2", "qwen3", "mistral-window"])
def test_converted_checkpoints_batch_equals_single(tok, tmp_path, case):
    """Tiny transformers checkpoints (random weights) through from_pretrained: GPT-2 (learned absolute
    positions), Qwen3 (rotary, qk-norm) and Mistral with its own sliding window of 4 (rotating caches
    under the padding mask): greedy batch == each prompt alone."""
    pytest.importorskip("transformers")
    model = hf_checkpoint(case, tmp_path / case, tok.vocab_size)
    kw = dict(max_tokens=8, temperature=0.0, eos_token_ids=[])
    assert_rows_equal(batched(model, tok, TEXTS, **kw), singles(model, tok, TEXTS, **kw))
