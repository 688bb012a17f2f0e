"""Speculative decoding (mlx_zeta/lm/speculative.py): the output is the target's own decoding, token
for token, whatever the draft (the same model, a perturbed copy, an unrelated one), at temperature 0
against greedy decoding and at temperature > 0 against plain decoding with the same key; logprobs
against a full forward of the target; penalties against a cache-free loop written here."""

import mlx_zeta  # noqa: F401  (before mlx.core: fast BLAS)
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

from mlx_zeta.nn import KVCache
from mlx_zeta.structs import AutoregressiveWrapper, Decoder, Transformer
from mlx_zeta.lm.speculative import SpeculativeStats, speculative_steps

V = 48
# A (k + 1)-position forward and a 1-position one sum in different orders (with MKL routed, as in
# make test): logprobs measured up to 1.4e-5 apart on these models with AVX-512, 2.8e-4 (of a logprob of
# -3.2, 9e-5 relative) on an AVX2-only CPU, whose MKL kernels sum in other orders.
LOGP_ATOL = 5e-4
PROMPT = mx.array([[3, 17, 5, 40, 9, 22]])


def tiny(seed: int, depth: int = 2, vocab: int = V, **kw) -> Transformer:
    mx.random.seed(seed)
    layers = Decoder(dim=32, depth=depth, heads=4, **({"rotary_pos_emb": True} | kw.pop("layers", {})))
    model = Transformer(num_tokens=vocab, max_seq_len=kw.pop("max_seq_len", 256), attn_layers=layers, **kw)
    model.update(tree_map(lambda p: p * 3.0, model.parameters()))  # sharper logits: few near-ties
    model.eval()
    mx.eval(model.parameters())
    return model


def perturbed(model: Transformer, scale: float = 0.05, seed: int = 5) -> Transformer:
    """A copy of ``model`` with N(0, scale^2)-relative noise on every weight (a "close" draft)."""
    copy = tiny(0)
    mx.random.seed(seed)
    copy.update(tree_map(lambda p: p * (1 + scale * mx.random.normal(p.shape)), model.parameters()))
    mx.eval(copy.parameters())
    return copy


TARGET = tiny(0)
DRAFTS = {"same": TARGET, "perturbed": perturbed(TARGET), "random": tiny(1, depth=1)}


def run(draft, n=24, prompt=PROMPT, target=TARGET, **kw):
    stats = SpeculativeStats()
    out = list(speculative_steps(target, draft, prompt, target.make_cache(), draft.make_cache(), n, stats=stats,
                                 **kw))
    return [t for t, _, _ in out], [lp for _, lp, _ in out], [f for _, _, f in out], stats


def greedy(n=24, prompt=PROMPT, target=TARGET):
    return AutoregressiveWrapper(target).generate(prompt, n, temperature=0)[0].tolist()


def target_logprobs(tokens, prompt=PROMPT, target=TARGET, processor=None, counts=None):
    """log softmax of one full (cache-free) forward over prompt + tokens, at each new token."""
    seq = mx.concatenate([prompt, mx.array([tokens])], axis=1)
    logits = target(seq)[0, prompt.shape[1] - 1 : -1]  # (n, V): the logits that chose each token
    if processor is not None:
        logits = mx.concatenate([processor(logits[i : i + 1], counts_before(counts, tokens[:i]))
                                 for i in range(len(tokens))])
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return np.array(mx.take_along_axis(logp, mx.array(tokens)[:, None], axis=-1)[:, 0]).tolist()


def counts_before(counts, tokens):
    c = np.array(counts).copy()
    for t in tokens:
        c[0, t] += 1
    return mx.array(c)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("kind", list(DRAFTS))
def test_greedy_equals_target_alone_and_logprobs_are_the_targets(kind, k):
    toks, logps, from_draft, stats = run(DRAFTS[kind], num_draft_tokens=k, temperature=0)
    assert toks == greedy()
    np.testing.assert_allclose(logps, target_logprobs(toks), atol=LOGP_ATOL)
    assert sum(from_draft) == stats.accepted and stats.tokens == 24
    assert stats.tokens == stats.rounds + stats.accepted  # each round: its accepted drafts and one target token
    if kind == "same":
        assert stats.accepted == stats.drafted  # the draft is the target: everything accepted
        assert stats.rounds == -(-24 // (k + 1))
    if kind == "random":
        assert stats.acceptance_rate < 0.3


def test_acceptance_rate_orders_the_drafts():
    rates = {kind: run(d, 40, num_draft_tokens=4, temperature=0)[3].acceptance_rate for kind, d in DRAFTS.items()}
    assert rates["same"] == 1.0 > rates["perturbed"] > rates["random"], rates


def test_sampling_is_the_targets_own_draws_with_the_same_key():
    """Temperature > 0: token t is drawn with decode_steps' t-th key, so it equals plain decoding's draw."""
    key = mx.random.key(11)
    kw = dict(temperature=0.9, top_k=20, top_p=0.95)
    ref = AutoregressiveWrapper(TARGET).generate(PROMPT, 30, key=key, **kw)[0].tolist()
    for kind, draft in DRAFTS.items():
        for k in (1, 3):
            toks, logps, _, stats = run(draft, 30, key=key, num_draft_tokens=k, **kw)
            assert toks == ref, (kind, k)
            np.testing.assert_allclose(logps, target_logprobs(toks), atol=LOGP_ATOL)
            if kind == "same":  # the draft draws with the same key: the coupled draws agree
                assert stats.acceptance_rate == 1.0
    assert len(set(ref)) > 5  # really sampled
    other = run(DRAFTS["random"], 30, key=mx.random.key(12), **kw)[0]
    assert other != ref


def test_end_tokens_stop_the_run_after_the_first_one():
    ref = greedy(24)
    for j in (0, 5, 11):
        end = ref[j]
        first = ref.index(end)
        for draft in DRAFTS.values():
            toks, _, _, _ = run(draft, 24, num_draft_tokens=3, temperature=0, eos=(999, end))
            assert toks == ref[: first + 1]


def frequency_processor(logits, counts):
    return logits - 4.0 * counts.astype(logits.dtype)


def reference_loop(n, key, temperature, processor, counts, prompt=PROMPT):
    """Plain decoding without caches: full forward, processor(logits, counts so far), draw with key t."""
    from mlx_zeta.structs import sample

    seq, out = prompt, []
    for _ in range(n):
        logits = processor(TARGET(seq)[:, -1], counts_before(counts, out))
        key, sub = mx.random.split(key)
        tok = sample(logits, temperature=temperature, key=sub).item()
        out.append(tok)
        seq = mx.concatenate([seq, mx.array([[tok]])], axis=1)
    return out


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_a_processor_sees_the_history_of_each_verified_position(temperature):
    counts = counts_before(mx.zeros((1, V), mx.int32), PROMPT[0].tolist())  # the prompt counts too
    key = mx.random.key(3)
    ref = reference_loop(20, key, temperature, frequency_processor, counts)
    assert temperature or ref != greedy(20)  # the penalty changes the greedy text
    for draft in DRAFTS.values():
        toks, logps, _, _ = run(draft, 20, key=key, temperature=temperature, num_draft_tokens=3,
                                processor=frequency_processor, counts=counts)
        assert toks == ref
        np.testing.assert_allclose(logps, target_logprobs(toks, processor=frequency_processor, counts=counts),
                                   atol=LOGP_ATOL)


def test_caches_hold_prompt_and_tokens_but_the_last_even_when_closed_early():
    for draft in DRAFTS.values():
        tc, dc = TARGET.make_cache(), draft.make_cache()
        steps = speculative_steps(TARGET, draft, PROMPT, tc, dc, 20, num_draft_tokens=4, temperature=0)
        got = [next(steps)[0] for _ in range(7)]
        steps.close()
        n = PROMPT.shape[1]
        assert tc[0].offset == n + 6 and dc[0].offset <= n + 6
        # the target's cache is the cache of that sequence: its next logits equal a full forward's
        seq = mx.concatenate([PROMPT, mx.array([got])], axis=1)
        step = TARGET(mx.array([[got[-1]]]), cache=tc)[0, -1]
        np.testing.assert_allclose(np.array(step), np.array(TARGET(seq)[0, -1]), atol=1e-4)


def test_caches_holding_a_prefix_prefill_only_the_rest_in_chunks():
    """A prompt cache: the target's caches hold 4 prompt positions, the draft's none."""
    draft = DRAFTS["perturbed"]
    for held, step in ((4, 512), (0, 2), (5, 1)):
        tc, dc = TARGET.make_cache(), draft.make_cache()
        if held:
            TARGET(PROMPT[:, :held], cache=tc)
        stats = SpeculativeStats()
        out = [t for t, _, _ in speculative_steps(TARGET, draft, PROMPT, tc, dc, 16, temperature=0, stats=stats,
                                                  prefill_step=step)]
        assert out == greedy(16)
        assert stats.prompt_tokens == PROMPT.shape[1] - held and stats.prompt_time > 0


def test_absolute_positions_use_the_room_left_to_max_seq_len():
    # 6 prompt + 10 new tokens = 16 positions, exactly max_seq_len: drafts must not run past it
    target = tiny(0, layers={"rotary_pos_emb": False}, max_seq_len=16)
    draft = tiny(1, depth=1, layers={"rotary_pos_emb": False}, max_seq_len=16)
    for d in (target, draft):
        toks = run(d, 10, target=target, num_draft_tokens=5, temperature=0)[0]
        assert toks == greedy(10, target=target)


def test_window_caches_work_while_they_hold_the_run_and_are_refused_after():
    target = tiny(0, layers={"sliding_window": 40})
    draft = tiny(1, depth=1, layers={"sliding_window": 40})
    toks = run(draft, 35, target=target, num_draft_tokens=3, temperature=0)[0]  # 6 + 35 - 1 = 40 positions
    assert toks == greedy(35, target=target)
    with pytest.raises(ValueError, match=r"\[speculative_steps\] expected target_caches to hold the whole run.*"
                                         r"max_size=40\) drops positions after 40, the run needs up to 41"):
        run(draft, 36, target=target, num_draft_tokens=3, temperature=0)


def test_bad_inputs_one_line_errors():
    d, tc, dc = DRAFTS["random"], TARGET.make_cache(), DRAFTS["random"].make_cache()
    cases = [
        ((TARGET, tiny(2, vocab=V + 1), PROMPT, tc, dc, 4), {}, "draft model with the target's vocabulary"),
        ((TARGET, d, mx.concatenate([PROMPT, PROMPT]), tc, dc, 4), {}, "batch size 1"),
        ((TARGET, d, mx.array([[V]]), tc, dc, 4), {}, f"prompt token ids in \\[0, {V}\\)"),
        ((TARGET, d, PROMPT, tc, dc, 0), {}, "max_tokens"),
        ((TARGET, d, PROMPT, tc, dc, 4), {"num_draft_tokens": 0}, "num_draft_tokens"),
        ((TARGET, d, PROMPT, tc, dc, 4), {"temperature": -1.0}, "temperature"),
        ((TARGET, d, PROMPT, TARGET.make_cache(capacity=64), dc, 4), {}, "target_caches that can forget.*StaticKVCache"),
        ((TARGET, d, PROMPT, tc, [], 4), {}, "draft_caches as a non-empty list"),
        ((TARGET, d, PROMPT, tc, [KVCache()], 4), {"processor": 3}, "processor"),
        ((TARGET, d, PROMPT, tc, dc, 4), {"counts": mx.zeros((1, V - 1), mx.int32)}, f"counts .* shape \\(1, {V}\\)"),
        ((TARGET, d, PROMPT, tc, dc, 4), {"eos": 5}, "eos as a list or tuple"),
        ((TARGET, d, PROMPT, tc, dc, 4), {"stats": {}}, "stats"),
    ]
    for args, kw, match in cases:
        with pytest.raises(ValueError, match=r"^\[speculative_steps\] expected .*" + match) as err:
            speculative_steps(*args, **kw)
        assert "\n" not in str(err.value)
    filled = TARGET.make_cache()
    TARGET(PROMPT, cache=filled)
    with pytest.raises(ValueError, match=r"target_caches to hold a prefix of the prompt shorter than it \(at most "
                                         r"5 of its 6 positions\), got 6 positions"):
        speculative_steps(TARGET, d, PROMPT, filled, dc, 4)
    with pytest.raises(ValueError, match=r"^\[speculative_steps\] expected prefill_step"):
        speculative_steps(TARGET, d, PROMPT, tc, dc, 4, prefill_step=0)


def test_converted_llama_with_a_smaller_draft_equals_transformers_greedy(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from hf_tiny import lift_init, save_hf, seeded

    base = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                vocab_size=120, max_position_embeddings=256)
    folders = {}
    for name, layers in (("target", 3), ("draft", 1)):
        seeded(layers)
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_hidden_layers=layers, **base)).eval()
        lift_init(hf)
        folders[name] = (hf, save_hf(hf, tmp_path / name))
    target = mlx_zeta.from_pretrained(folders["target"][1], dtype="float32")
    draft = mlx_zeta.from_pretrained(folders["draft"][1], dtype="float32")
    prompt = np.random.default_rng(3).integers(0, 120, (1, 7))
    with torch.no_grad():
        ref = folders["target"][0].generate(torch.tensor(prompt), max_new_tokens=20, min_new_tokens=20,
                                            do_sample=False, pad_token_id=0)[0, 7:].tolist()
    for k in (2, 4):
        toks, _, _, stats = run(draft, 20, prompt=mx.array(prompt), target=target, num_draft_tokens=k, temperature=0)
        assert toks == ref
        assert stats.rounds < 20 or stats.accepted == 0


# ----------------------------------------------------------------------------- through stream_generate


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A 3-layer random Llama target and a 1-layer draft (transformers checkpoints), one word-level
    tokenizer over their 48 ids."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers

    from lm_tiny import save_peaked_llama
    from mlx_zeta.lm import load

    backend = Backend(models.WordLevel({f"w{i}": i for i in range(V)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")
    out = {}
    for name, layers in (("target", 3), ("draft", 1)):
        folder = tmp_path_factory.mktemp(name)
        save_peaked_llama(folder, V, layers=layers, seed=layers)
        backend.save(str(folder / "tokenizer.json"))
        out[name] = load(str(folder), dtype="float32")
    return out


def responses(model, tok, ids, n, **kw):
    from mlx_zeta.lm import stream_generate

    return list(stream_generate(model, tok, ids, n, eos_token_ids=kw.pop("eos_token_ids", []), **kw))


@pytest.mark.parametrize("options", [dict(), dict(temperature=0.8, top_p=0.9, seed=4),
                                     dict(repetition_penalty=1.6, presence_penalty=0.3, logit_bias={5: 2.0})])
def test_stream_generate_with_a_draft_equals_it_without(checkpoints, options):
    (target, tok), (draft, _) = checkpoints["target"], checkpoints["draft"]
    ids = [2, 11, 5, 30, 4]
    alone = responses(target, tok, ids, 24, **options)
    for d in (draft, target):
        for k in (1, 4):
            rs = responses(target, tok, ids, 24, draft_model=d, num_draft_tokens=k, **options)
            assert [r.token for r in rs] == [r.token for r in alone]
            np.testing.assert_allclose([r.logprob for r in rs], [r.logprob for r in alone], atol=LOGP_ATOL)
            assert "".join(r.text for r in rs) == "".join(r.text for r in alone)
            assert rs[-1].finish_reason == "length" and rs[0].prompt_tokens == len(ids)
            if d is target:  # the target drafting for itself: every round but the last one's bonus token
                assert sum(r.from_draft for r in rs) >= 24 * k // (k + 1) - 1
    assert not any(r.from_draft for r in alone)


def test_stream_generate_with_a_draft_stops_and_fills_the_prompt_cache(checkpoints):
    from mlx_zeta.lm import PromptCache

    (target, tok), (draft, _) = checkpoints["target"], checkpoints["draft"]
    ids = [2, 11, 5, 30, 4, 17, 23, 8]
    free = [r.token for r in responses(target, tok, ids, 30)]
    end = free[9]
    rs = responses(target, tok, ids, 30, draft_model=target, num_draft_tokens=4, eos_token_ids=[end])
    assert [r.token for r in rs] == free[: free.index(end) + 1] and rs[-1].finish_reason == "stop"
    pc = PromptCache(target)
    for suffix in ([12, 13], [12, 13, 40]):
        rs = responses(target, tok, ids + suffix, 10, draft_model=draft, num_draft_tokens=3, prompt_cache=pc)
        assert [r.token for r in rs] == [r.token for r in responses(target, tok, ids + suffix, 10)]
        assert pc.tokens == ids + suffix + [r.token for r in rs][:-1] and pc.offset == len(pc.tokens)
    assert rs[0].prompt_tokens == 1  # the cache held everything but the newest prompt token
    # a stop string in the middle of a round: the cache forgets the rest of the round
    stop = tok.decode([free[6]])
    plain, spec = PromptCache(target), PromptCache(target)
    want = responses(target, tok, ids, 30, stop=stop, prompt_cache=plain)
    got = responses(target, tok, ids, 30, stop=stop, prompt_cache=spec, draft_model=target, num_draft_tokens=4)
    assert [r.token for r in got] == [r.token for r in want] and len(want) % 5 and want[-1].finish_reason == "stop"
    made = ids + [r.token for r in got]
    assert spec.offset == len(spec.tokens) and spec.tokens in (made, made[:-1])  # what the caches really hold
    again = responses(target, tok, ids + [3], 6, prompt_cache=spec, draft_model=draft)
    assert [r.token for r in again] == [r.token for r in responses(target, tok, ids + [3], 6)]


def test_stream_generate_refuses_a_bad_draft_in_one_line(checkpoints):
    from mlx_zeta.lm import stream_generate

    target, tok = checkpoints["target"]
    other = tiny(3, vocab=V + 2)
    for kw, match in ((dict(draft_model=other), r"^\[generate\] expected a draft model with the target's vocabulary "
                                                 r"\(num_tokens 48\), got num_tokens 50"),
                      (dict(draft_model=target, num_draft_tokens=0), r"^\[generate\] expected num_draft_tokens"),
                      (dict(draft_model="small"), r"^\[generate\] expected a causal LM with make_cache\(\) as draft"),
                      (dict(draft_model=target, max_kv_size=8), r"^\[speculative_steps\] expected target_caches to "
                                                                 r"hold the whole run")):
        with pytest.raises(ValueError, match=match) as err:
            list(stream_generate(target, tok, [1, 2, 3], 16, **kw))
        assert "\n" not in str(err.value)
    # a window that holds the whole run (3 + 16 - 1 positions: the last token is never fed) is fine
    fits = [r.token for r in responses(target, tok, [1, 2, 3], 16, draft_model=target, max_kv_size=18)]
    assert fits == [r.token for r in responses(target, tok, [1, 2, 3], 16)]
