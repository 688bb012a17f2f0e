"""AutoregressiveWrapper (mlx_zeta.structs.autoregressive): the loss against torch's
cross entropy (value and gradient) and a float64 finite difference, generation against
hand-written greedy loops, KV-cached decoding against full recomputation at every step
(per-step logits), eos handling per row, stream vs generate, keys and seeds, prefix
arguments (prepend_embeds, prompt mask, cross-attention context), and errors."""

from typing import List

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core loads)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlx.utils import tree_flatten, tree_map
from parity import assert_close

from mlx_zeta.structs import AutoregressiveWrapper, Decoder, Encoder, RotatingKVCache, Transformer

DIM, VOCAB, B = 32, 48, 2


def lm(max_seq_len: int = 128, **layer_kw) -> Transformer:
    """A small decoder LM in eval mode."""
    kw = dict(dim=DIM, depth=2, heads=4)
    kw.update(layer_kw)
    net = Transformer(num_tokens=VOCAB, max_seq_len=max_seq_len, attn_layers=Decoder(**kw))
    net.eval()
    return net


def prompt_tokens(rng, n: int = 5, b: int = B) -> mx.array:
    return mx.array(rng.integers(0, VOCAB, (b, n)).astype(np.int32))


class Recorder(nn.Module):
    """The net, with each call's last-position logits and input length appended to ``log``."""

    def __init__(self, net: Transformer, log: List):
        super().__init__()
        self.net, self.max_seq_len = net, net.max_seq_len
        self._log = log.append

    def make_cache(self):
        return self.net.make_cache()

    def __call__(self, x, **kw):
        out = self.net(x, **kw)
        self._log((x.shape[1], out[:, -1]))
        return out


def greedy_by_hand(net, prompt: mx.array, steps: int, window: int = None, **kw) -> np.ndarray:
    """argmax of a full forward over everything so far (last ``window`` tokens), appended each step."""
    seq = prompt
    for _ in range(steps):
        ctx = seq if window is None else seq[:, -window:]
        nxt = mx.argmax(net(ctx, **kw)[:, -1], axis=-1).astype(mx.int32)
        seq = mx.concatenate([seq, nxt[:, None]], axis=1)
    return np.array(seq[:, prompt.shape[1]:])


# ------------------------------------------------------------------ loss


class FixedLogits(nn.Module):
    """A 'net' whose output is the given logits (b, n, V), to differentiate the loss w.r.t. them."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.max_seq_len = logits, logits.shape[1]

    def make_cache(self):
        return []

    def __call__(self, x, **kw):
        return self.logits


def test_loss_and_logit_gradient_match_torch_cross_entropy(rng):
    """loss = torch's F.cross_entropy(net(x[:, :-1]), x[:, 1:], ignore_index=-100) on the same
    logits; d loss / d logits equals torch's (1/|K|)(softmax - onehot) on kept rows."""
    net = lm(rotary_pos_emb=True, attn_kv_heads=2)
    tokens = rng.integers(0, VOCAB, (B, 11)).astype(np.int32)
    tokens[0, 4] = tokens[1, 9] = tokens[1, 10] = -100  # ignored targets (and one ignored input)
    model = AutoregressiveWrapper(net, ignore_index=-100, pad_value=3)
    loss = model(mx.array(tokens))
    inputs = np.where(tokens[:, :-1] == -100, 3, tokens[:, :-1])  # the wrapper feeds pad_value there
    logits = net(mx.array(inputs))
    ref_logits = torch.tensor(np.array(logits), dtype=torch.float64, requires_grad=True)
    ref = F.cross_entropy(ref_logits.reshape(-1, VOCAB), torch.tensor(tokens[:, 1:], dtype=torch.long).reshape(-1),
                          ignore_index=-100)
    ref.backward()
    assert_close(loss, ref, what="loss")
    grad = mx.grad(lambda z: AutoregressiveWrapper(FixedLogits(z))(mx.array(tokens)))(logits)
    assert_close(grad, ref_logits.grad, what="d loss / d logits")
    assert np.abs(np.array(grad[0, 3])).max() == 0  # the ignored target's row gets no gradient


def test_loss_all_ignored_is_zero_and_prepend_positions_dropped(rng):
    net = lm(alibi_pos_bias=True)
    model = AutoregressiveWrapper(net)
    assert model(mx.full((B, 6), -100, mx.int32)).item() == 0.0
    # with 3 prepended positions the loss only scores the token positions
    tokens = rng.integers(0, VOCAB, (B, 8)).astype(np.int32)
    prefix = mx.array(rng.standard_normal((B, 3, DIM)).astype(np.float32))
    logits = np.array(net(mx.array(tokens[:, :-1]), prepend_embeds=prefix)[:, 3:], dtype=np.float64)
    ref = F.cross_entropy(torch.tensor(logits).reshape(-1, VOCAB), torch.tensor(tokens[:, 1:], dtype=torch.long).reshape(-1))
    assert_close(model(mx.array(tokens), prepend_embeds=prefix), ref, what="loss with prefix")
    # a (b, n) mask over the tokens is cropped to the inputs
    pad = np.ones((B, 8), bool)
    pad[1, -3:] = False
    masked = np.array(net(mx.array(tokens[:, :-1]), mask=mx.array(pad[:, :-1])), dtype=np.float64)
    ref = F.cross_entropy(torch.tensor(masked).reshape(-1, VOCAB), torch.tensor(tokens[:, 1:], dtype=torch.long).reshape(-1))
    assert_close(model(mx.array(tokens), mask=mx.array(pad)), ref, what="loss with mask")


def test_loss_parameter_gradient_finite_difference_float64(rng):
    """<grad, d> against (L(theta + eps d) - L(theta - eps d)) / (2 eps) in float64, for a
    random unit direction d over every parameter.

    MLX's CPU exp/softmax/logsumexp are accurate to ~1e-8 even in float64 (measured against
    numpy), so the loss carries ~1e-8 of noise: eps = 1e-2 keeps that noise at ~1e-6 of the
    difference quotient, and the truncation error is ~eps^2 * L''' ~ 1e-6 too (measured:
    |numeric - analytic| ~ 1e-6 for |analytic| ~ 2e-2). A wrong gradient is off by far more."""
    net = lm(depth=1, rotary_pos_emb=True, attn_kv_heads=2, use_rmsnorm=True, ff_swiglu=True)
    net.set_dtype(mx.float64)
    model = AutoregressiveWrapper(net)
    tokens = mx.array(rng.integers(0, VOCAB, (B, 9)).astype(np.int32))
    params = model.trainable_parameters()
    grads = nn.value_and_grad(model, lambda t: model(t))(tokens)[1]
    direction = tree_map(lambda p: mx.array(rng.standard_normal(p.shape)).astype(mx.float64), params)
    norm = sum((d * d).sum() for _, d in tree_flatten(direction)).item() ** 0.5
    analytic = sum((g * d).sum() for (_, g), (_, d) in zip(tree_flatten(grads), tree_flatten(direction))).item() / norm

    def loss_at(eps):
        model.update(tree_map(lambda p, d: p + eps / norm * d, params, direction))
        return model(tokens).item()

    eps = 1e-2
    numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    model.update(params)
    assert abs(analytic) > 1e-3
    assert abs(numeric - analytic) <= 2e-3 * abs(analytic), (numeric, analytic)


# ------------------------------------------------------------------ greedy generation


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no_cache"])
def test_greedy_equals_hand_written_loop(rng, cache):
    net = lm(rotary_pos_emb=True, attn_kv_heads=2)
    prompt = prompt_tokens(rng)
    want = greedy_by_hand(net, prompt, 12)
    model = AutoregressiveWrapper(net)
    out = model.generate(prompt, 12, top_k=1, cache=cache, key=mx.random.key(5))
    assert out.dtype == mx.int32 and out.shape == (B, 12)
    np.testing.assert_array_equal(np.array(out), want)
    np.testing.assert_array_equal(np.array(model.generate(prompt, 12, temperature=0, cache=cache)), want)
    assert (want[0] != want[1]).any()  # the two rows really differ


def test_no_cache_crops_to_max_seq_len_and_cache_explains_the_limit(rng):
    """Absolute positions, max_seq_len 16: without a cache every step sees the last 16 tokens;
    with a cache the 10 + 12 - 1 = 21 positions needed are refused up front."""
    net = lm(max_seq_len=16)
    assert "pos_emb" in net
    prompt = prompt_tokens(rng, n=10)
    model = AutoregressiveWrapper(net)
    np.testing.assert_array_equal(np.array(model.generate(prompt, 12, temperature=0, cache=False)),
                                  greedy_by_hand(net, prompt, 12, window=16))
    with pytest.raises(ValueError, match=r"^\[AutoregressiveWrapper\] cannot decode 12 tokens with cache=True: the "
                                         r"prompt \(10 tokens\) and the new tokens need 21 positions, but the net's "
                                         r"absolute position embedding has max_seq_len=16\. .*cache=False"):
        model.generate(prompt, 12)
    assert model.generate(prompt, 7, temperature=0).shape == (B, 7)  # 16 positions: fits exactly


# ------------------------------------------------------------------ KV cache vs recomputation

CACHE_CASES = {
    "rotary_gqa": dict(rotary_pos_emb=True, attn_kv_heads=2),
    "sliding_window_rotary": dict(sliding_window=8, rotary_pos_emb=True, attn_kv_heads=1),
}


def record_generation(net, prompt, steps, cache, **kw):
    log = []
    out = AutoregressiveWrapper(Recorder(net, log)).generate(prompt, steps, cache=cache, **kw)
    return np.array(out), log


@pytest.mark.parametrize("case", list(CACHE_CASES))
def test_kv_cache_logits_equal_recompute_every_step(rng, case):
    """64 sampled tokens (T = 1, same key): at every step the cached last-position logits equal
    those of the full forward over the whole sequence so far, max |diff| <= 1e-4 (float32),
    and both runs draw the same tokens."""
    net = lm(**CACHE_CASES[case])
    prompt = prompt_tokens(rng, n=6)
    key = mx.random.key(1)
    toks_c, log_c = record_generation(net, prompt, 64, True, key=key)
    toks_f, log_f = record_generation(net, prompt, 64, False, key=key)
    np.testing.assert_array_equal(toks_c, toks_f)
    assert [n for n, _ in log_c] == [6] + [1] * 63  # prefill, then one token per step
    assert [n for n, _ in log_f] == list(range(6, 70))  # the whole sequence each step
    for step, ((_, a), (_, b)) in enumerate(zip(log_c, log_f)):
        assert np.abs(np.array(a - b)).max() <= 1e-4, f"step {step}"
    assert len(set(toks_c[0].tolist())) > 5  # sampling really explored


def test_sliding_window_cache_stays_bounded(rng):
    net = lm(sliding_window=8, rotary_pos_emb=True)
    made = []
    net.make_cache = lambda: made.append(net.attn_layers.make_cache()) or made[-1]
    AutoregressiveWrapper(net).generate(prompt_tokens(rng), 20, temperature=0)
    assert all(isinstance(c, RotatingKVCache) and c.size == 8 and c.offset == 5 + 19 for c in made[0])


def test_filters_cache_and_no_cache_identical(rng):
    net = lm(alibi_pos_bias=True)
    prompt = prompt_tokens(rng)
    kw = dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, key=mx.random.key(9))
    model = AutoregressiveWrapper(net)
    np.testing.assert_array_equal(np.array(model.generate(prompt, 24, cache=True, **kw)),
                                  np.array(model.generate(prompt, 24, cache=False, **kw)))


# ------------------------------------------------------------------ prefix arguments


def test_prepend_embeds_prefill_matches_recomputation(rng):
    """Absolute positions + 3 prepended embeddings: cached decoding (prefix on the prefill only)
    gives the logits of a full forward with the prefix at every step, and the greedy tokens of a
    hand loop."""
    net = lm(max_seq_len=48)
    prompt = prompt_tokens(rng)
    prefix = mx.array(rng.standard_normal((B, 3, DIM)).astype(np.float32))
    toks_c, log_c = record_generation(net, prompt, 16, True, temperature=0, prepend_embeds=prefix)
    toks_f, log_f = record_generation(net, prompt, 16, False, temperature=0, prepend_embeds=prefix)
    np.testing.assert_array_equal(toks_c, greedy_by_hand(net, prompt, 16, prepend_embeds=prefix))
    np.testing.assert_array_equal(toks_c, toks_f)
    for step, ((_, a), (_, b)) in enumerate(zip(log_c, log_f)):
        assert np.abs(np.array(a - b)).max() <= 1e-4, f"step {step}"
    # the prefix changes the result (it is really used)
    assert (toks_c != np.array(AutoregressiveWrapper(net).generate(prompt, 16, temperature=0))).any()


def test_left_padded_prompt_mask_and_cross_attention_context(rng):
    """A prompt mask (row 0 left-padded by 2) is extended for new tokens; a cross-attention
    context goes to every call. Cached logits equal recomputation at every step."""
    net = lm(rotary_pos_emb=True, cross_attend=True)
    prompt = prompt_tokens(rng, n=7)
    pad = np.ones((B, 7), bool)
    pad[0, :2] = False
    context = mx.array(rng.standard_normal((B, 4, DIM)).astype(np.float32))
    cmask = mx.array(np.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool))
    kw = dict(temperature=0, mask=mx.array(pad), context=context, context_mask=cmask)
    toks_c, log_c = record_generation(net, prompt, 12, True, **kw)
    toks_f, log_f = record_generation(net, prompt, 12, False, **kw)
    np.testing.assert_array_equal(toks_c, toks_f)
    for step, ((_, a), (_, b)) in enumerate(zip(log_c, log_f)):
        assert np.abs(np.array(a - b)).max() <= 1e-4, f"step {step}"
    # the padded row equals decoding its unpadded 5 tokens alone
    alone = AutoregressiveWrapper(net).generate(prompt[:1, 2:], 12, temperature=0, context=context[:1],
                                                context_mask=cmask[:1])
    np.testing.assert_array_equal(toks_c[0], np.array(alone[0]))


# ------------------------------------------------------------------ eos, stream, keys


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_eos_pads_each_row_independently(rng, temperature):
    """eos = a token row 0 draws at step j that row 1 never draws: row 0 keeps it then gets
    pad_value; row 1 is unchanged from the run without eos."""
    net = lm(rotary_pos_emb=True)
    model = AutoregressiveWrapper(net, pad_value=VOCAB + 1)  # a pad no model could produce
    prompt = prompt_tokens(rng)
    kw = dict(temperature=temperature, key=mx.random.key(2))
    free = np.array(model.generate(prompt, 16, **kw))
    j, eos = next((j, t) for j, t in enumerate(free[0, 1:8].tolist(), start=1)
                  if t not in free[1] and t not in free[0, :j])
    out = np.array(model.generate(prompt, 16, eos_token=eos, **kw))
    np.testing.assert_array_equal(out[0, : j + 1], free[0, : j + 1])
    assert (out[0, j + 1:] == VOCAB + 1).all()
    np.testing.assert_array_equal(out[1], free[1])
    np.testing.assert_array_equal(out, np.array(model.generate(prompt, 16, eos_token=eos, cache=False, **kw)))


def test_eos_in_every_row_stops_early(rng):
    net = lm(rotary_pos_emb=True)
    prompt = mx.tile(prompt_tokens(rng, b=1), (B, 1))  # identical rows: same greedy tokens
    log = []
    model = AutoregressiveWrapper(Recorder(net, log), pad_value=-1)
    free = np.array(model.generate(prompt, 10, temperature=0))
    eos = free[0, 2]
    j = free[0].tolist().index(eos)
    log.clear()
    steps = list(model.stream(prompt, 10, temperature=0, eos_token=int(eos)))
    assert len(steps) == 10  # padded to seq_len, without calling the net again
    assert len(log) <= j + 2  # the loop stopped (one step may be scheduled ahead)
    out = np.array(model.generate(prompt, 10, temperature=0, eos_token=int(eos)))
    np.testing.assert_array_equal(out, np.stack([np.array(s) for s in steps], axis=1))
    np.testing.assert_array_equal(out[:, : j + 1], free[:, : j + 1])
    assert out.shape == (B, 10) and (out[:, j + 1:] == -1).all()


def test_stream_yields_generate_output(rng):
    net = lm(rotary_pos_emb=True)
    model = AutoregressiveWrapper(net)
    prompt = prompt_tokens(rng)
    steps = list(model.stream(prompt, 9, top_p=0.9, key=mx.random.key(4)))
    assert len(steps) == 9 and all(s.shape == (B,) and s.dtype == mx.int32 for s in steps)
    np.testing.assert_array_equal(np.stack([np.array(s) for s in steps], axis=1),
                                  np.array(model.generate(prompt, 9, top_p=0.9, key=mx.random.key(4))))


def test_seeds_and_keys(rng):
    model = AutoregressiveWrapper(lm(rotary_pos_emb=True))
    prompt = prompt_tokens(rng)

    def run(seed=None, key=None):
        if seed is not None:
            mx.random.seed(seed)
        return np.array(model.generate(prompt, 20, key=key))

    np.testing.assert_array_equal(run(seed=3), run(seed=3))
    assert (run(seed=3) != run(seed=4)).any()
    np.testing.assert_array_equal(run(key=mx.random.key(1)), run(seed=99, key=mx.random.key(1)))
    assert (run(key=mx.random.key(1)) != run(key=mx.random.key(2))).any()


def test_generation_uses_eval_mode_and_restores_it(rng):
    net = Transformer(num_tokens=VOCAB, max_seq_len=64, emb_dropout=0.5,
                      attn_layers=Decoder(dim=DIM, depth=2, heads=4, rotary_pos_emb=True, ff_dropout=0.5))
    model = AutoregressiveWrapper(net)
    model.train()
    prompt = prompt_tokens(rng)
    a = np.array(model.generate(prompt, 8, temperature=0))
    assert net.training and net.attn_layers.training
    np.testing.assert_array_equal(a, np.array(model.generate(prompt, 8, temperature=0)))
    net.eval()
    np.testing.assert_array_equal(a, greedy_by_hand(net, prompt, 8))


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("bad", [VOCAB, 600, 100_000, -1, -(2**31)])
def test_prompt_ids_outside_the_vocabulary_raise_before_the_net_runs(rng, bad):
    """An id outside [0, VOCAB) indexes past the embedding table: before the check, 100000 crashed the
    process (segfault) and 600 returned garbage that changed from run to run. Now generate and stream
    refuse it, naming the id, its position (row-major first) and the vocabulary, and the net never runs."""
    log = []
    rec = Recorder(lm(rotary_pos_emb=True), log)
    rec.num_tokens = VOCAB
    model = AutoregressiveWrapper(rec)
    ids = np.array(prompt_tokens(rng))
    ids[1, 3] = ids[1, 4] = bad
    want = rf"^\[AutoregressiveWrapper\] expected prompt token ids in \[0, {VOCAB}\), got {bad} at \(1, 3\)$"
    with pytest.raises(ValueError, match=want):
        model.generate(mx.array(ids), 4, temperature=0)
    with pytest.raises(ValueError, match=want):
        model.stream(mx.array(ids), 4)  # raised by stream() itself, before iterating
    assert log == []
    ids[1, 3:] = VOCAB - 1  # the largest id is fine
    assert model.generate(mx.array(ids), 2, temperature=0).shape == (B, 2)


def test_errors(rng):
    net = lm(rotary_pos_emb=True)
    model = AutoregressiveWrapper(net)
    prompt = prompt_tokens(rng)
    err = r"^\[AutoregressiveWrapper\] "
    with pytest.raises(ValueError, match=err + r"expected a causal net \(attn_layers=Decoder\(\.\.\.\)\), got Encoder"):
        AutoregressiveWrapper(Transformer(num_tokens=VOCAB, max_seq_len=8, attn_layers=Encoder(dim=DIM, depth=1)))
    with pytest.raises(ValueError, match=err + r"expected net to be a Transformer .* got Linear"):
        AutoregressiveWrapper(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=err + r"expected pad_value to be an int, got 0.5"):
        AutoregressiveWrapper(net, pad_value=0.5)
    with pytest.raises(ValueError, match=err + r"expected integer tokens of shape \(batch, seq\) with seq >= 2, got shape \(2, 1\)"):
        model(mx.zeros((B, 1), dtype=mx.int32))
    with pytest.raises(ValueError, match=err + r"expected prompt as integer token ids of shape \(batch, n\) with "
                                                r"batch, n >= 1, got shape \(5,\)"):
        model.generate(prompt[0], 4)
    with pytest.raises(ValueError, match=err + r"expected prompt as integer token ids .* dtype mlx.core.float32"):
        model.generate(prompt.astype(mx.float32), 4)
    with pytest.raises(ValueError, match=err + r"expected seq_len to be an int >= 1, got 0"):
        model.generate(prompt, 0)
    with pytest.raises(ValueError, match=err + r"expected temperature to be a number >= 0 \(0 = greedy\), got -0.5"):
        model.stream(prompt, 4, temperature=-0.5)  # raised by stream() itself, before iterating
    with pytest.raises(ValueError, match=err + r"expected top_p to be a number with 0 < top_p <= 1, got 2"):
        model.generate(prompt, 4, top_p=2)
    with pytest.raises(ValueError, match=err + r"expected top_k to be an int >= 1, got -1"):
        model.generate(prompt, 4, top_k=-1)
    with pytest.raises(ValueError, match=err + r"expected min_p to be a number with 0 <= min_p <= 1, got 3"):
        model.generate(prompt, 4, min_p=3)
    with pytest.raises(ValueError, match=err + r"expected key to be None or a key from mx.random.key"):
        model.generate(prompt, 4, key=mx.zeros((3,)))
    with pytest.raises(ValueError, match=err + r"expected eos_token to be None or an int, got 'x'"):
        model.generate(prompt, 4, eos_token="x")
    with pytest.raises(ValueError, match=err + r"expected cache to be a bool \(the wrapper makes the cache\), got list"):
        model.generate(prompt, 4, cache=net.make_cache())
    with pytest.raises(ValueError, match=err + r"expected a boolean mask of shape \(2, 5\) over the prompt, got shape \(2, 4\)"):
        model.generate(prompt, 4, mask=mx.ones((B, 4), dtype=mx.bool_))
    with pytest.raises(ValueError, match=err + r"expected no return_embeddings when generating"):
        model.generate(prompt, 4, return_embeddings=True)
    with pytest.raises(ValueError, match=err + r"expected fewer than max_seq_len=8 prepended positions with cache=False"):
        AutoregressiveWrapper(lm(max_seq_len=8)).generate(prompt, 2, cache=False, prepend_embeds=mx.zeros((B, 8, DIM)))
