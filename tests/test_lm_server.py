"""The OpenAI-compatible server (mlx_zeta/lm/server.py): the real uvicorn server on 127.0.0.1, talked
to with the official ``openai`` client and with raw HTTP.

References: every answer is compared with :func:`mlx_zeta.lm.generate` / ``stream_generate`` run
directly on the same tiny checkpoint with the same settings (the server must add nothing and lose
nothing). Queueing, cancellation and the request checks alone: test_lm_server_queue.py."""

from __future__ import annotations

import concurrent.futures as futures
import json
import socket

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from lm_blocks import CHAT_TEMPLATE, hf_checkpoint, tiny_tokenizer  # noqa: E402
from mlx_zeta.lm import generate, load, prompt_ids, stream_generate  # noqa: E402
from mlx_zeta.lm.server import BackgroundServer, make_app  # noqa: E402

MODEL = "tiny"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, 東京 café!"}]


LIMIT = 100  # max_prompt_tokens of the served tiny model


def tiny_folder(folder):
    """A checkpoint folder as convert writes one: a tiny random Llama, a byte-level BPE
    tokenizer.json trained offline, and tokenizer_config.json with the chat template."""
    tok = tiny_tokenizer()
    hf_checkpoint("llama", folder, tok.vocab_size)
    tok.backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>", "chat_template": CHAT_TEMPLATE}))
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def tiny(folder):
    return load(folder)


@pytest.fixture(scope="module")
def server(tiny):
    with BackgroundServer(make_app(*tiny, MODEL, max_queue=16, max_prompt_tokens=LIMIT)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def reference(tiny, prompt, max_tokens, **options):
    """(text, finish_reason, generated tokens, logprobs) of stream_generate run directly."""
    rs = list(stream_generate(*tiny, prompt, max_tokens, **options))
    return "".join(r.text for r in rs), rs[-1].finish_reason, len(rs), [r.logprob for r in rs]


def raw(server, method, path, body=b"", headers=None):
    """(status, decoded JSON or text) of one plain HTTP request."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request(method, path, body, headers or {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    try:
        return resp.status, json.loads(data)
    except ValueError:
        return resp.status, data.decode()


def test_models(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert raw(server, "GET", "/health") == (200, {"status": "ok"})


@pytest.mark.parametrize("stream", [False, True])
def test_chat_equals_generate(tiny, client, stream):
    text, finish, n, _ = reference(tiny, CHAT, 24, temperature=0)
    assert text == generate(*tiny, CHAT, 24, temperature=0)
    kw = dict(model=MODEL, messages=CHAT, max_tokens=24, temperature=0)
    if stream:
        chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
        usage = chunks[-1].usage
        assert chunks[-1].choices == [] and all(c.object == "chat.completion.chunk" for c in chunks)
    else:
        r = client.chat.completions.create(**kw)
        got, usage = r.choices[0].message.content, r.usage
        assert r.choices[0].finish_reason == finish and r.object == "chat.completion" and r.model == MODEL
    assert got == text
    p = len(prompt_ids(tiny[1], CHAT))
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (p, n, p + n)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("prompt", ["The quick brown", [5, 17, 230, 44]])
def test_completion_equals_generate(tiny, client, stream, prompt):
    text, finish, n, _ = reference(tiny, prompt, 20, temperature=0)
    kw = dict(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
    if stream:
        chunks = list(client.completions.create(**kw, stream=True))
        got = "".join(c.choices[0].text for c in chunks)
        assert chunks[-1].choices[0].finish_reason == finish
    else:
        r = client.completions.create(**kw)
        got = r.choices[0].text
        assert (r.choices[0].finish_reason, r.usage.completion_tokens) == (finish, n)
    assert got == text


def test_every_sampling_option_reaches_generate(tiny, client):
    """Seeded sampling with every option set equals generate with the same options (and differs
    from greedy, so the options took effect)."""
    opts = dict(temperature=0.9, top_p=0.95, presence_penalty=0.5, frequency_penalty=0.3, seed=7)
    ext = dict(top_k=50, min_p=0.01, repetition_penalty=1.2)  # not in the OpenAI API: extra_body
    bias = {"17": 5.0, "44": -100}
    want = generate(*tiny, CHAT, 30, **opts, **ext, logit_bias={17: 5.0, 44: -100.0})
    assert want != generate(*tiny, CHAT, 30, temperature=0)
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=30, logit_bias=bias, extra_body=ext,
                                       **opts)
    assert r.choices[0].message.content == want


def test_stop_string_and_end_token(tiny, client):
    full, _, _, _ = reference(tiny, "Hello", 30, temperature=0)
    stop = full[8:11]
    cut = full[:full.index(stop)]
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=30, temperature=0, stop=[stop, "\x00"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    eos = tiny[1].eos_token_ids[0]
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=30, logit_bias={str(eos): 100})
    assert (r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens) == ("", "stop", 1)


def test_logprobs(tiny, client):
    _, _, _, lps = reference(tiny, CHAT, 8, temperature=0)
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0, logprobs=True)
    assert [c.logprob for c in r.choices[0].logprobs.content] == pytest.approx(lps, abs=1e-6)
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0, logprobs=0)
    _, _, _, lps = reference(tiny, "Hello", 8, temperature=0)
    assert r.choices[0].logprobs.token_logprobs == pytest.approx(lps, abs=1e-6)


def test_prompt_cache_reused_across_requests(tiny, client):
    """The same prompt twice: the second request prefills one token (PromptCache.reuse keeps all but
    the last) and still answers as generate does."""
    prompt = "Servers answer requests one at a time, " * 2
    n = len(prompt_ids(tiny[1], prompt))
    want = generate(*tiny, prompt, 6, temperature=0)
    for cached in (None, n - 1):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
        assert r.choices[0].text == want and r.usage.prompt_tokens == n
        if cached is not None:
            assert r.usage.prompt_tokens_details.cached_tokens == cached


def test_eight_concurrent_requests(tiny, client):
    """8 threads at once, chat and text, streamed and not, shared prefixes (the prompt cache in
    play): each answer equals its own generate."""
    jobs = [(i % 2 == 0, i % 3 == 0, [{"role": "user", "content": f"Hello {i} " * (1 + i % 3)}] if i % 2 == 0
             else "The quick brown fox " + "x" * i, 10 + 3 * i) for i in range(8)]
    want = [generate(*tiny, p, n, temperature=0) for _, _, p, n in jobs]

    def ask(chat, stream, prompt, n):
        kw = dict(model=MODEL, max_tokens=n, temperature=0, stream=stream)
        if chat:
            r = client.chat.completions.create(messages=prompt, **kw)
            return "".join(c.choices[0].delta.content or "" for c in r) if stream else r.choices[0].message.content
        r = client.completions.create(prompt=prompt, **kw)
        return "".join(c.choices[0].text for c in r) if stream else r.choices[0].text

    with futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda j: ask(*j), jobs))
    assert got == want


LONG = "The quick brown fox jumps over the lazy dog. " * 40
GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
BAD = [  # (what, method, path, body, status)
    ("malformed JSON", "POST", "/v1/chat/completions", b'{"model": "tiny", "messages": [', 400),
    ("body not an object", "POST", "/v1/chat/completions", [1, 2], 400),
    ("missing messages", "POST", "/v1/chat/completions", {"model": MODEL}, 400),
    ("messages not a list", "POST", "/v1/chat/completions", {**GOOD, "messages": "hi"}, 400),
    ("bad role", "POST", "/v1/chat/completions", {**GOOD, "messages": [{"role": "robot", "content": "x"}]}, 400),
    ("content not text", "POST", "/v1/chat/completions", {**GOOD, "messages": [{"role": "user", "content": 3}]}, 400),
    ("max_tokens -1", "POST", "/v1/chat/completions", {**GOOD, "max_tokens": -1}, 400),
    ("max_tokens 'ten'", "POST", "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": "ten"}, 400),
    ("temperature 'hot'", "POST", "/v1/chat/completions", {**GOOD, "temperature": "hot"}, 400),
    ("top_p 2", "POST", "/v1/chat/completions", {**GOOD, "top_p": 2}, 400),
    ("n=2", "POST", "/v1/chat/completions", {**GOOD, "n": 2}, 400),
    ("stop of wrong type", "POST", "/v1/completions", {"model": MODEL, "prompt": "a", "stop": 5}, 400),
    ("stream not a bool", "POST", "/v1/chat/completions", {**GOOD, "stream": "yes"}, 400),
    ("logit_bias id out of range", "POST", "/v1/chat/completions", {**GOOD, "logit_bias": {"99999": 1}}, 400),
    ("prompt token id out of range", "POST", "/v1/completions", {"model": MODEL, "prompt": [1, 99999]}, 400),
    ("empty prompt", "POST", "/v1/completions", {"model": MODEL, "prompt": ""}, 400),
    ("unknown model", "POST", "/v1/chat/completions", {**GOOD, "model": "gpt-9"}, 404),
    ("over-long prompt", "POST", "/v1/completions", {"model": MODEL, "prompt": LONG}, 400),
    ("unknown model card", "GET", "/v1/models/gpt-9", b"", 404),
    ("unknown route", "POST", "/v1/embeddings", GOOD, 404),
    ("wrong method", "GET", "/v1/chat/completions", b"", 405),
]


@pytest.mark.parametrize("what,method,path,body,status", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_4xx_json_and_server_goes_on(tiny, server, what, method, path, body, status):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, answer = raw(server, method, path, data)
    assert got == status, answer
    err = answer["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"].startswith("[")
    ok, answer = raw(server, "POST", "/v1/chat/completions", json.dumps({**GOOD, "temperature": 0}).encode())
    assert ok == 200 and answer["choices"][0]["message"]["content"] == generate(*tiny, GOOD["messages"], 3,
                                                                                   temperature=0)


def test_unknown_fields_are_ignored(server):
    status, answer = raw(server, "POST", "/v1/chat/completions", json.dumps({**GOOD, "user": 3, "frobnicate": []}).encode())
    assert status == 200 and answer["object"] == "chat.completion"


def stream_then_hang_up(port, body, events=2):
    """Open a streamed request, read ``events`` server-sent events, close the socket."""
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        seen = b""
        while seen.count(b"data: ") < events and not seen.endswith(b"}") and not seen.endswith(b"0\r\n\r\n"):
            seen += s.recv(4096)
    return seen


def test_client_hang_up_mid_stream(tiny, server, client):
    seen = stream_then_hang_up(server.port, {**GOOD, "max_tokens": 100, "stream": True})
    assert seen.startswith(b"HTTP/1.1 200"), seen
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0)
    assert r.choices[0].message.content == generate(*tiny, CHAT, 5, temperature=0)


def test_learned_positions_limit_gpt2(tmp_path):
    """GPT-2 (64 learned positions): the default prompt limit is model.max_seq_len, and a prompt
    that fits but leaves too few positions for max_tokens gets stream_generate's own refusal as 400."""
    tok = tiny_tokenizer()
    model = hf_checkpoint("gpt2", tmp_path, tok.vocab_size)
    with BackgroundServer(make_app(model, tok, "gpt2")) as server:
        status, answer = raw(server, "POST", "/v1/completions", json.dumps({"prompt": LONG}).encode())
        assert status == 400 and answer["error"]["code"] == "context_length_exceeded"
        assert "at most 64 tokens" in answer["error"]["message"]
        status, answer = raw(server, "POST", "/v1/completions", json.dumps({"prompt": "the end", "max_tokens": 80}).encode())
        assert status == 400 and answer["error"]["message"].startswith("[generate] the prompt (")
        status, answer = raw(server, "POST", "/v1/completions",
                             json.dumps({"prompt": "the end", "max_tokens": 20, "temperature": 0}).encode())
        assert status == 200 and answer["choices"][0]["text"] == generate(model, tok, "the end", 20, temperature=0)


# ---- serve() as the CLI runs it ----

def test_serve_prints_its_address_serves_and_stops_on_ctrl_c(folder):
    import re
    import signal
    import subprocess
    import sys

    code = "import sys; from mlx_zeta.lm.server import serve; serve(sys.argv[1], port=0, model_id='tiny')"
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stderr.readline()]
        while lines[-1] and not lines[-1].startswith("serving"):
            lines.append(proc.stderr.readline())
        found = re.fullmatch(r"serving tiny on (http://127\.0\.0\.1:\d+)\n", lines[-1])
        assert found, lines
        client = openai.OpenAI(base_url=found.group(1) + "/v1", api_key="none", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        assert client.completions.create(model="tiny", prompt="Hello", max_tokens=3).choices[0].finish_reason
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_serve_refuses_a_busy_port_before_loading(tmp_path):
    from mlx_zeta.lm.server import serve

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RuntimeError, match=rf"^\[serve\] expected to listen on 127.0.0.1:{port}, got "):
            serve(tmp_path / "no-model-here", port=port)
