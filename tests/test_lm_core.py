"""mlx_zeta.lm's generation core: penalties and logprobs in the decoding loop, generation defaults,
stop strings, prompt-cache reuse, and bad input. Independent references: transformers' logits
processors and ``generate`` on the same random checkpoint, numpy loops written from the math."""

import importlib
import json

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core loads)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_zeta.lm import PromptCache, Tokenizer, generation_defaults, load, stream_generate
from mlx_zeta.lm.generate import _StopScan
from mlx_zeta.structs.decoding import decode_steps
from mlx_zeta.structs.sampling import penalize, token_counts

VOCAB = 48


def test_token_counts_equal_bincount():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 7, (3, 20))
    want = np.stack([np.bincount(r, minlength=7) for r in ids])
    np.testing.assert_array_equal(np.array(token_counts(mx.array(ids), 7)), want)


@pytest.mark.parametrize("penalty", [0.7, 1.3])
def test_repetition_penalty_equals_transformers(penalty):
    import torch
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, 10)).astype(np.float32) * 3
    context = rng.integers(0, 10, (2, 6))
    want = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(context), torch.tensor(logits)).numpy()
    got = penalize(mx.array(logits), token_counts(mx.array(context), 10), repetition=penalty)
    np.testing.assert_allclose(np.array(got), want, rtol=1e-6)


def test_presence_frequency_and_bias_follow_openai_definitions():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((1, 6)).astype(np.float32)
    counts = np.array([[0, 1, 3, 0, 2, 0]])
    bias = np.array([0, 0, 0, 5.0, 0, -5.0], np.float32)
    want = logits - 0.5 * (counts > 0) - 0.25 * counts + bias
    got = penalize(mx.array(logits), mx.array(counts), presence=0.5, frequency=0.25, bias=mx.array(bias))
    np.testing.assert_allclose(np.array(got), want, rtol=1e-6)


def test_decode_loop_with_penalty_and_logprobs_equals_a_numpy_loop():
    """A 'model' whose next logits are a fixed row of a random table per token; the loop with a
    repetition penalty must pick what a numpy loop written from the definition picks."""
    rng = np.random.default_rng(3)
    table = rng.standard_normal((VOCAB, VOCAB)).astype(np.float32)
    prompt = [3, 5, 3]
    logits0 = table[prompt[-1]][None]

    def processor(lg, counts):
        return penalize(lg, counts, repetition=1.8)

    got = list(decode_steps(lambda t: mx.array(table)[t], mx.array(logits0), 12, mx.random.key(0), temperature=0,
                            processor=processor, counts=token_counts(mx.array([prompt]), VOCAB), logprobs=True))
    seen, row, want = list(prompt), logits0[0], []
    for _ in range(12):
        lg = row.copy()
        for v in set(seen):
            lg[v] = lg[v] / 1.8 if lg[v] > 0 else lg[v] * 1.8
        tok = int(np.argmax(lg))
        lp = lg[tok] - np.log(np.exp(lg - lg.max()).sum()) - lg.max()
        want.append((tok, lp))
        seen.append(tok)
        row = table[tok]
    assert [t.item() for t, _ in got] == [t for t, _ in want]
    np.testing.assert_allclose([lp.item() for _, lp in got], [lp for _, lp in want], atol=1e-5)


def test_stop_scan_cuts_at_a_stop_string_split_across_pieces():
    scan = _StopScan(("END", "\n\n"))
    out = [scan.push(p) for p in ["abc E", "N", "x yz\n", "\nmore"]]
    assert out == [("abc ", False), ("", False), ("ENx yz", False), ("", True)]  # "\n\n" found, cut before it
    scan = _StopScan(("END",))
    assert scan.push("wE") == ("w", False) and scan.flush() == "E"


# ----------------------------------------------------------------------------- a tiny checkpoint


def _word_tokenizer():
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers

    backend = Backend(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return backend


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random Llama checkpoint (transformers), a word-level tokenizer over its ids, a
    generation_config with a list of end tokens."""
    from lm_tiny import save_peaked_llama

    folder = tmp_path_factory.mktemp("tiny_llama")
    hf = save_peaked_llama(folder, VOCAB, layers=2, seed=0)
    _word_tokenizer().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w1"}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9], "do_sample": False}))
    model, tokenizer = load(str(folder), dtype="float32")
    return folder, hf, model, tokenizer


def _hf_greedy(hf, ids, n, **kw):
    import torch

    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0, **kw)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("penalty", [None, 1.5])
def test_greedy_tokens_equal_transformers_generate(tiny, penalty):
    _, hf, model, tok = tiny
    ids = [2, 11, 5, 30, 4]
    want = _hf_greedy(hf, ids, 16, **({} if penalty is None else {"repetition_penalty": penalty}))
    got = [r.token for r in stream_generate(model, tok, ids, 16, eos_token_ids=[], repetition_penalty=penalty)]
    assert got == want


@pytest.mark.parametrize("chunk", [3, 4, 512])
def test_prefill_in_chunks_equals_one_full_forward(tiny, monkeypatch, chunk):
    """All but the last prompt id in chunks (only the caches evaluated), the last alone: the
    logits equal the last row of one forward over the whole prompt, the caches hold every
    position, and the greedy tokens still equal transformers' (chunk 4 divides the 8 ids before the last)."""
    gen = importlib.import_module("mlx_zeta.lm.generate")  # the module (mlx_zeta.lm.generate is the function)
    _, hf, model, tok = tiny
    ids = [2, 11, 5, 30, 4, 17, 23, 8, 40]
    monkeypatch.setattr(gen, "PREFILL_CHUNK", chunk)
    caches = model.make_cache()
    got = gen._prefill(model, caches, ids)
    want = model(mx.array([ids]))[:, -1]
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5, rtol=1e-5)
    assert [c.offset for c in caches] == [len(ids)] * len(caches)
    tokens = [r.token for r in stream_generate(model, tok, ids, 8, eos_token_ids=[])]
    assert tokens == _hf_greedy(hf, ids, 8)


def test_defaults_come_from_generation_config(tiny):
    folder, _, model, tok = tiny
    d = generation_defaults(model, tok)
    assert d["temperature"] == 0.0 and d["eos_token_ids"][:2] == (7, 9) and 1 in d["eos_token_ids"]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 7, "do_sample": True,
                                                                "temperature": 0.6, "top_p": 0.9}))
    try:
        d = generation_defaults(model, tok)
        assert (d["temperature"], d["top_p"], d["eos_token_ids"][0]) == (0.6, 0.9, 7)
    finally:
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9], "do_sample": False}))


def test_end_token_from_the_list_stops_with_reason_stop(tiny):
    _, hf, model, tok = tiny
    ids = [2, 11, 5, 30, 4]
    free = _hf_greedy(hf, ids, 40)
    ends = [t for t in free if t not in (1,)][:1]  # declare the 1st token generated an end token
    rs = list(stream_generate(model, tok, ids, 40, eos_token_ids=ends))
    assert [r.token for r in rs] == free[:free.index(ends[0]) + 1] and rs[-1].finish_reason == "stop"
    rs = list(stream_generate(model, tok, ids, 3, eos_token_ids=[]))
    assert [r.finish_reason for r in rs] == [None, None, "length"] and rs[-1].generation_tokens == 3
    assert "".join(r.text for r in rs) == tok.decode([r.token for r in rs])


def test_numpy_token_ids_are_ids(tiny):
    _, _, model, tok = tiny
    ids = np.array([2, 11, 5, 30, 4])
    want = [r.token for r in stream_generate(model, tok, ids.tolist(), 4, eos_token_ids=[])]
    assert [r.token for r in stream_generate(model, tok, list(ids), 4, eos_token_ids=[])] == want


def test_prompt_cache_prefills_only_the_new_suffix_and_changes_nothing(tiny):
    _, _, model, tok = tiny
    shared = [2, 11, 5, 30, 4, 17, 23, 8]
    pc = PromptCache(model)
    for suffix in ([12, 13], [40], [12, 6, 6]):
        alone = [(r.token, r.logprob) for r in stream_generate(model, tok, shared + suffix, 6, eos_token_ids=[])]
        rs = list(stream_generate(model, tok, shared + suffix, 6, eos_token_ids=[], prompt_cache=pc))
        assert [r.token for r in rs] == [t for t, _ in alone]
        np.testing.assert_allclose([r.logprob for r in rs], [lp for _, lp in alone], atol=1e-5)
        assert pc.tokens == shared + suffix + [r.token for r in rs][:-1]
    rs = list(stream_generate(model, tok, shared + [12, 6, 6, 9], 2, eos_token_ids=[], prompt_cache=pc))
    assert rs[0].prompt_tokens == 1  # everything but the one new token came from the cache


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=3.5), r"^\[generate\] expected prompt as text, a list of token ids or a list of chat messages"),
    (dict(prompt=[]), r"^\[generate\] expected a prompt of at least one token"),
    (dict(prompt=[1, 99]), r"^\[generate\] expected prompt token ids in \[0, 48\), got 99 at \(0, 1\)"),
    (dict(max_tokens=0), r"^\[generate\] expected max_tokens to be an int >= 1"),
    (dict(temperature=-1), r"^\[generate\] expected temperature to be a number >= 0"),
    (dict(stop=["ok", ""]), r"^\[generate\] expected stop as a non-empty string or a list of them"),
    (dict(logit_bias={48: 1.0}), r"^\[generate\] expected logit_bias keys to be token ids in \[0, 48\)"),
    (dict(logit_bias={3: float("nan")}), r"^\[generate\] expected logit_bias values to be finite numbers"),
    (dict(repetition_penalty=0), r"^\[generate\] expected repetition_penalty to be a number > 0"),
    (dict(eos_token_ids=[3, -1]), r"^\[generate\] expected eos_token_ids to be token ids in \[0, 48\)"),
    (dict(eos_token_ids=48), r"^\[generate\] expected eos_token_ids to be token ids in \[0, 48\)"),
    (dict(seed=-2), r"^\[generate\] expected seed to be None or an int >= 0"),
    (dict(prompt_cache="yes"), r"^\[generate\] expected prompt_cache to be a PromptCache, got str"),
    (dict(prompt=[{"role": "user", "content": "hi"}]), r"^\[Tokenizer\] this checkpoint has no chat template"),
])
def test_bad_arguments_raise_one_line_errors(tiny, kwargs, message):
    _, _, model, tok = tiny
    kwargs = {"prompt": [1, 2], **kwargs}
    with pytest.raises(ValueError, match=message) as e:
        list(stream_generate(model, tok, **kwargs))
    assert "\n" not in str(e.value)


def test_bad_tokenizer_and_model_are_refused(tiny, tmp_path):
    _, _, model, tok = tiny
    with pytest.raises(ValueError, match=r"^\[generate\] expected a mlx_zeta.lm Tokenizer \(from load\), got str"):
        stream_generate(model, "tok", [1])
    with pytest.raises(ValueError, match=r"^\[generate\] expected a causal LM or T5 model, got Linear"):
        stream_generate(nn.Linear(2, 2), tok, [1])
    with pytest.raises(ValueError, match=r"^\[Tokenizer\] expected tokenizer files in .* found none"):
        from mlx_zeta.lm import load_tokenizer

        load_tokenizer(tmp_path)
    assert isinstance(tok, Tokenizer)


ARCHS = [("test_convert_llama", "llama-gqa-untied"), ("test_convert_llama", "mistral-window"),
         ("test_convert_llama", "qwen2-qkv-bias"), ("test_convert_llama", "qwen3-qk-norm"),
         ("test_convert_gpt2", "tied-gelu_new"), ("test_convert_bitnet", "bitlinear-gqa-untied")]


@pytest.mark.parametrize("module, case", ARCHS, ids=[c for _, c in ARCHS])
def test_every_causal_architecture_generates_like_transformers(module, case, tmp_path):
    """Each causal-LM converter's tiny checkpoint (the converter tests' own builders, vocabulary 120),
    loaded with its tokenizer by mlx_zeta.lm.load: greedy tokens equal transformers' generate."""
    import importlib

    import torch

    tests = importlib.import_module(module)
    if module == "test_convert_gpt2":
        hf, folder = tests.make(tmp_path / "m", case)
    else:
        hf, folder = tests.make(case, tmp_path / "m")[:2]
    backend = _word_tokenizer()
    backend.add_tokens([f"w{i}" for i in range(VOCAB, 120)])
    backend.save(str(folder / "tokenizer.json"))
    model, tok = load(str(folder), dtype="float32")
    ids = [int(i) for i in np.random.default_rng(3).integers(0, 120, 6)]
    run = tests.eager() if module == "test_convert_bitnet" else torch.no_grad()
    with run, torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                           pad_token_id=0)[0, len(ids):].tolist()
    assert [r.token for r in stream_generate(model, tok, ids, 12, eos_token_ids=[])] == want


def test_a_loaded_model_runs_on_another_thread(tmp_path):
    """from_pretrained leaves no pending array (materialize): a thread that did not load the model can
    run it (a lazy rotary buffer made this fail with "There is no Stream(cpu, 0) in current thread")."""
    import threading

    import test_convert_llama

    _, folder = test_convert_llama.make("llama-gqa-untied", tmp_path / "m")
    model = mlx_zeta.from_pretrained(folder)
    out = {}

    def run():
        try:
            out["logits"] = np.array(model(mx.array([[1, 2, 3]])))
        except Exception as e:  # noqa: BLE001  (reported below)
            out["error"] = e

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert "error" not in out, out.get("error")
    np.testing.assert_allclose(out["logits"], np.array(model(mx.array([[1, 2, 3]]))), atol=1e-6)
