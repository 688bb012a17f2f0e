"""mlx_zeta/lm/cache_file.py and cache.py: prompt-cache files and the bounded (rotating) cache option.

Laws: continuations of a prefix prefilled once, saved and loaded equal greedy decoding by full
recomputation without any cache (tokens exactly, log-probabilities within 1e-4: float32 summation orders differ and MKL picks kernels by shape, measured up to 3.3e-5); a file
round-trips bitwise; with ``max_kv_size`` at least the sequence length decoding equals the
unbounded cache, and below it every step's logits equal a full recomputation by the same
weights built with ``sliding_window=N`` (an independent reference: the stack's own window,
no cache); every damaged or foreign file is refused with a one-line error naming file and field."""

import json

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core loads)
import mlx.core as mx
import numpy as np
import pytest
from lm_blocks import VOCAB, greedy_cached, greedy_reference, same_weights, tiny_lm

from mlx_zeta.lm.cache import WindowedKVCache, make_caches
from mlx_zeta.lm.cache_file import load_caches, save_caches
from mlx_zeta.nn import KVCache, RotatingKVCache

PREFIX = [5, 17, 3, 60, 22, 9, 41, 8, 13, 77, 2, 30]
SUFFIXES = [[4], [50, 51, 52], [17, 3, 60, 22, 9, 1, 88]]
STEPS = 6


def prefill(model, tokens, max_kv_size=None):
    caches = make_caches(model, max_kv_size)
    model(mx.array([tokens]), cache=caches)
    mx.eval([c.state for c in caches])
    return caches


def bits(a: mx.array) -> np.ndarray:
    """The raw bytes of an array (bitwise comparison, whatever the float dtype)."""
    return np.array(a.view(mx.uint8) if a.dtype.size == 1 else a.view({2: mx.uint16, 4: mx.uint32}[a.dtype.size]))


@pytest.mark.parametrize("shape", ["rotary", "absolute"])
def test_saved_prefix_continues_like_no_cache(tmp_path, shape):
    """Prefill PREFIX once and save; for each suffix, a fresh load continued by the suffix decodes
    greedily exactly as full recomputation of PREFIX + suffix with no cache."""
    model = tiny_lm(shape)
    path = save_caches(tmp_path / "p.safetensors", prefill(model, PREFIX), PREFIX, model)
    worst, seen = 0.0, set()
    for suffix in SUFFIXES:
        caches, tokens, _ = load_caches(path, model)
        assert tokens == PREFIX
        got, got_lp = greedy_cached(model, caches, suffix, STEPS)
        want, want_lp = greedy_reference(model, PREFIX + suffix, STEPS)
        assert got == want
        worst = max(worst, float(np.max(np.abs(np.array(got_lp) - np.array(want_lp)))))
        seen.add(tuple(got))
    # float32: cached and recomputed attention sum in different orders (and MKL may pick other kernels
    # for other shapes); measured up to 3.3e-5 on a log-probability of magnitude ~5.
    assert worst < 1e-4, worst
    assert len(seen) == len(SUFFIXES)  # the suffixes lead to different continuations


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
@pytest.mark.parametrize("max_kv_size", [None, 8])
def test_file_round_trips_bitwise(tmp_path, dtype, max_kv_size):
    """Loaded caches hold bitwise the saved keys/values, offsets, kinds and tokens (with max_kv_size=8
    after 12 positions: 8 stored, offset 12), and saving them again writes the same arrays and metadata."""
    model = tiny_lm(dtype=dtype)
    caches = prefill(model, PREFIX, max_kv_size)
    first = save_caches(tmp_path / "a.safetensors", caches, PREFIX, model, max_kv_size, metadata={"who": "test"})
    loaded, tokens, info = load_caches(first, model)
    assert tokens == PREFIX and info["metadata"] == {"who": "test"} and info["max_kv_size"] == max_kv_size
    for a, b in zip(caches, loaded):
        assert type(a) is type(b) and a.offset == b.offset == len(PREFIX)
        for x, y in zip(a.state, b.state):
            assert x.dtype == y.dtype == dtype and np.array_equal(bits(x), bits(y))
    second = save_caches(tmp_path / "b.safetensors", loaded, tokens, model, max_kv_size, metadata={"who": "test"})
    (arr1, meta1), (arr2, meta2) = (mx.load(str(p), return_metadata=True) for p in (first, second))
    assert meta1 == meta2 and arr1.keys() == arr2.keys()
    assert all(np.array_equal(bits(arr1[k]), bits(arr2[k])) for k in arr1)
    if max_kv_size:
        assert all(arr1[f"{i}.keys"].shape[2] == 8 for i in range(2))


def test_max_kv_size_covering_everything_equals_unbounded():
    """max_kv_size >= prompt + generated tokens: the same greedy tokens as the unbounded cache."""
    model = tiny_lm()
    total = len(PREFIX) + 2 + STEPS
    for n in (total, total + 5):
        got = greedy_cached(model, make_caches(model, n), PREFIX + [1, 2], STEPS)
        want = greedy_cached(model, make_caches(model), PREFIX + [1, 2], STEPS)
        assert got[0] == want[0]
        assert np.allclose(got[1], want[1], atol=1e-4)


@pytest.mark.parametrize("shape", ["rotary", "absolute"])
@pytest.mark.parametrize("chunks", [[12], [5, 4, 3]])
def test_bounded_cache_equals_sliding_window_recompute(shape, chunks):
    """max_kv_size=N < length: each step's logits (prefill in one or several chunks, then 8 single
    tokens) equal a full recomputation, no cache, by the same weights built with sliding_window=N;
    no layer ever stores more than N positions."""
    n = 5
    model = tiny_lm(shape)
    ref = same_weights(model, tiny_lm(shape, sliding_window=n, seed=1))
    caches = make_caches(model, n)
    assert all(isinstance(c, WindowedKVCache) and c.max_size == n for c in caches)
    seq, start, worst = list(PREFIX), 0, 0.0
    for size in chunks:
        logits = model(mx.array([seq[start:start + size]]), cache=caches)[0]
        want = ref(mx.array([seq[:start + size]]))[0, start:]
        worst = max(worst, mx.abs(logits - want).max().item())
        start += size
    for _ in range(8):
        tok = int(mx.argmax(logits[-1]).item())
        seq.append(tok)
        logits = model(mx.array([[tok]]), cache=caches)[0]
        worst = max(worst, mx.abs(logits[-1] - ref(mx.array([seq]))[0, -1]).max().item())
        assert all(c.size <= n for c in caches)
    assert worst < 1e-4, worst
    unbounded = model(mx.array([seq]))[0, -1]  # the window matters: without it the logits differ
    assert mx.abs(unbounded - ref(mx.array([seq]))[0, -1]).max().item() > 1e-2


def test_own_window_keeps_the_smaller():
    """A model with sliding_window=4 keeps its RotatingKVCache(4) under max_kv_size=8; under
    max_kv_size=3 it gets WindowedKVCache(3) and decodes as the same weights with window 3."""
    model = tiny_lm(sliding_window=4)
    assert all(type(c) is RotatingKVCache and c.max_size == 4 for c in make_caches(model, 8))
    assert all(type(c) is KVCache for c in make_caches(tiny_lm()))
    ref = same_weights(model, tiny_lm(sliding_window=3, seed=1))
    caches = make_caches(model, 3)
    assert all(type(c) is WindowedKVCache and c.max_size == 3 for c in caches)
    got = model(mx.array([PREFIX]), cache=caches)[0]
    got = mx.concatenate([got, model(mx.array([[7]]), cache=caches)[0]])
    want = ref(mx.array([PREFIX + [7]]))[0]
    assert mx.abs(got - want).max().item() < 1e-4


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    model = tiny_lm()
    path = tmp_path_factory.mktemp("good") / "good.safetensors"
    save_caches(path, prefill(model, PREFIX), PREFIX, model)
    return path


def rewrite(src, dst, arrays=None, **fields):
    """A copy of ``src`` with some arrays and metadata fields replaced (None deletes)."""
    arr, meta = mx.load(str(src), return_metadata=True)
    arr = {k: v for k, v in {**arr, **(arrays or {})}.items() if v is not None}
    meta = {k: v for k, v in {**meta, **fields}.items() if v is not None}
    mx.save_safetensors(str(dst), arr, metadata=meta)
    return dst


def caches_field(change):
    entries = [{"kind": "KVCache", "max_size": None, "offset": len(PREFIX)} for _ in range(2)]
    change(entries)
    return json.dumps(entries)


BAD_FILES = {
    "other model: vocab": (lambda: tiny_lm(vocab=VOCAB + 1), {}, "'model.num_tokens'"),
    "other model: depth": (lambda: tiny_lm(depth=3), {}, "'model.depth'"),
    "other model: kv heads": (lambda: tiny_lm("absolute"), {}, "'model.kv_shape'"),
    "other cache layout": (lambda: tiny_lm(sliding_window=4), {}, "'caches[0]'"),
    "wrong version": (tiny_lm, dict(version="2"), "'version'"),
    "not a cache file": (tiny_lm, dict(format="something-else"), "'format'"),
    "missing field": (tiny_lm, dict(tokens=None), "'tokens'"),
    "bad json": (tiny_lm, dict(caches="[{"), "'caches'"),
    "token type": (tiny_lm, dict(tokens=json.dumps(PREFIX[:-1] + ["x"])), "'tokens'"),
    "token range": (tiny_lm, dict(tokens=json.dumps(PREFIX[:-1] + [VOCAB])), "'tokens'"),
    "unknown kind": (tiny_lm, dict(caches=caches_field(lambda e: e[1].update(kind="Pickle"))), "'caches[1]'"),
    "offset mismatch": (tiny_lm, dict(caches=caches_field(lambda e: e[0].update(offset=3))), "'caches[0]'"),
    "model field type": (tiny_lm, dict(model=json.dumps({"model_type": None, "num_tokens": "97", "depth": 2,
                                                         "kv_shape": [2, 8]})), "'model'"),
    "metadata type": (tiny_lm, dict(metadata=json.dumps({"a": 1})), "'metadata'"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_load_refuses_foreign_or_damaged_metadata(tmp_path, good_file, case):
    make_model, fields, field = BAD_FILES[case]
    path = rewrite(good_file, tmp_path / "bad.safetensors", **fields) if fields else good_file
    with pytest.raises(ValueError) as err:
        load_caches(path, make_model())
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"[load_caches] {path}: field {field}"), msg


@pytest.mark.parametrize("case", ["missing array", "extra array", "wrong shape", "integer dtype"])
def test_load_refuses_wrong_arrays(tmp_path, good_file, case):
    arr = mx.load(str(good_file))
    change = {"missing array": {"1.values": None}, "extra array": {"2.keys": arr["1.keys"]},
              "wrong shape": {"0.keys": arr["0.keys"][:, :, 1:]},
              "integer dtype": {"0.values": arr["0.values"].astype(mx.int32)}}[case]
    path = rewrite(good_file, tmp_path / "bad.safetensors", arrays=change)
    with pytest.raises(ValueError, match=r"^\[load_caches\] .*bad.safetensors: field '(arrays|0\.keys|0\.values)'"):
        load_caches(path, tiny_lm())


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "absent"])
def test_load_refuses_unreadable_files(tmp_path, good_file, damage):
    path = tmp_path / "bad.safetensors"
    data = good_file.read_bytes()
    content = {"truncated": data[: len(data) - 64], "garbage": b"\x80\x04pickle" * 9, "empty": b"", "absent": None}[damage]
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        load_caches(path, tiny_lm())
    assert "\n" not in str(err.value) and str(err.value).startswith("[load_caches]") and str(path) in str(err.value)


def test_load_without_model_rebuilds_the_kinds(tmp_path):
    model = tiny_lm()
    path = save_caches(tmp_path / "w.safetensors", prefill(model, PREFIX, 8), PREFIX, model, 8)
    caches, _, info = load_caches(path)
    assert [type(c) for c in caches] == [WindowedKVCache] * 2 and info["model"]["kv_shape"] == [2, 8]
    assert [(c.offset, c.size, c.max_size) for c in caches] == [(12, 8, 8)] * 2


def test_save_refuses_bad_input_and_leaves_nothing(tmp_path):
    model = tiny_lm()
    caches = prefill(model, PREFIX)
    cases = [
        (dict(path=tmp_path / "x.npz"), "path ending in .safetensors"),
        (dict(metadata={"a": 1}), "metadata as a dict of str to str"),
        (dict(tokens=PREFIX[:-1]), "expected every cache to hold the 11 tokens, got offset 12 in layer 0"),
        (dict(tokens=PREFIX[:-1] + [1.5]), "tokens as a list of int"),
        (dict(caches=caches[:1]), "expected 2 caches"),
        (dict(model=object()), "expected a decoder Transformer"),
    ]
    for change, message in cases:
        args = {**dict(path=tmp_path / "x.safetensors", caches=caches, tokens=PREFIX, model=model), **change}
        with pytest.raises(ValueError, match=r"^\[save_caches\] " + ".*" + message.replace("(", r"\(").replace(".", r"\.")):
            save_caches(**args)
    batched = make_caches(model)
    model(mx.array([PREFIX, PREFIX]), cache=batched)
    with pytest.raises(ValueError, match=r"^\[save_caches\] expected caches of batch 1"):
        save_caches(tmp_path / "x.safetensors", batched, PREFIX, model)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=r"^\[PromptCache\] expected max_kv_size"):
        make_caches(model, 0)


def test_prompt_cache_file_serves_many_text_continuations(tmp_path):
    """Text level: a PromptCache filled by stream_generate on a document, saved, then loaded afresh
    for each of three questions: stream_generate with the loaded cache prefills only the question
    and gives the same tokens, text and (within 1e-4) log-probabilities as a run without any cache."""
    from lm_blocks import tiny_tokenizer

    from mlx_zeta.lm import PromptCache, load_prompt_cache, save_prompt_cache, stream_generate

    tok = tiny_tokenizer()
    model = tiny_lm(vocab=tok.vocab_size)
    doc = "the quick brown fox jumps over the lazy dog. a cat sat on the mat."
    pc = PromptCache(model)
    list(stream_generate(model, tok, doc, max_tokens=1, prompt_cache=pc))
    assert pc.tokens == tok.encode(doc)
    path = save_prompt_cache(tmp_path / "doc.safetensors", pc, metadata={"doc": "fox"})
    worst = 0.0
    for question in [" Q: who?", " Q: 世界 où?", " numbers 0123"]:
        loaded = load_prompt_cache(path, model)
        assert loaded.tokens == pc.tokens and loaded.metadata == {"doc": "fox"}
        got = list(stream_generate(model, tok, doc + question, max_tokens=8, temperature=0.0, eos_token_ids=[],
                                   prompt_cache=loaded))
        want = list(stream_generate(model, tok, doc + question, max_tokens=8, temperature=0.0, eos_token_ids=[]))
        assert got[0].prompt_tokens < len(tok.encode(doc + question)) == want[0].prompt_tokens
        assert [r.token for r in got] == [r.token for r in want] and [r.text for r in got] == [r.text for r in want]
        worst = max(worst, max(abs(a.logprob - b.logprob) for a, b in zip(got, want)))
    assert worst < 1e-4, worst
    with pytest.raises(ValueError, match=r"^\[save_prompt_cache\] expected a PromptCache, got list"):
        save_prompt_cache(tmp_path / "x.safetensors", pc.caches)
    with pytest.raises(ValueError, match=r"^\[load_caches\] .*doc.safetensors: field 'model.num_tokens'"):
        load_prompt_cache(path, tiny_lm())


def test_stream_generate_max_kv_size_is_a_sliding_window():
    """Text level: stream_generate(max_kv_size=5) gives the tokens and (within 1e-4) log-probabilities
    of the same weights built with sliding_window=5 and an unbounded run's own caches."""
    from lm_blocks import tiny_tokenizer

    from mlx_zeta.lm import stream_generate

    tok = tiny_tokenizer()
    model = tiny_lm(vocab=tok.vocab_size)
    ref = same_weights(model, tiny_lm(vocab=tok.vocab_size, sliding_window=5, seed=1))
    kw = dict(max_tokens=10, temperature=0.0, eos_token_ids=[])
    got = list(stream_generate(model, tok, "a cat sat on the mat", max_kv_size=5, **kw))
    want = list(stream_generate(ref, tok, "a cat sat on the mat", **kw))
    assert [r.token for r in got] == [r.token for r in want]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(got, want)) < 1e-4
    assert [r.token for r in got] != [r.token for r in stream_generate(model, tok, "a cat sat on the mat", **kw)]


def test_converted_checkpoint_file_records_its_model_type(tmp_path):
    """A Qwen3 checkpoint (from_pretrained): the file records model_type "qwen3"; a saved prefix
    continues like no cache; a Llama of the very same shapes is refused by model_type."""
    pytest.importorskip("transformers")
    from lm_blocks import hf_checkpoint

    qwen3 = hf_checkpoint("qwen3", tmp_path / "qwen3", VOCAB)
    path = save_caches(tmp_path / "q.safetensors", prefill(qwen3, PREFIX), PREFIX, qwen3)
    caches, _, info = load_caches(path, qwen3)
    assert info["model"] == {"model_type": "qwen3", "num_tokens": VOCAB, "depth": 2, "kv_shape": [2, 16]}
    got, got_lp = greedy_cached(qwen3, caches, SUFFIXES[1], STEPS)
    want, want_lp = greedy_reference(qwen3, PREFIX + SUFFIXES[1], STEPS)
    assert got == want and np.max(np.abs(np.array(got_lp) - want_lp)) < 1e-4
    llama = hf_checkpoint("llama", tmp_path / "llama", VOCAB)
    with pytest.raises(ValueError, match=r"field 'model.model_type': the file was made by a model with 'qwen3', "
                                         r"this model has 'llama'"):
        load_caches(path, llama)
