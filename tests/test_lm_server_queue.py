"""The server's queue, cancellation, shutdown and request checks (mlx_zeta/lm/server.py,
server_requests.py), seen through a scripted generator whose every step is observable, on the
real uvicorn server. Answers of the real model: test_lm_server.py."""

from __future__ import annotations

import concurrent.futures as futures
import json
import socket
import threading
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from test_lm_server import GOOD, MODEL, raw, stream_then_hang_up  # noqa: E402
from mlx_zeta.lm.server import BackgroundServer, make_app  # noqa: E402


class Script:
    """A stand-in for stream_generate: one character per step, each step waiting for ``gate`` and
    then ``delay`` seconds (a model's pace); records the steps it made and whether it was closed early."""

    def __init__(self, delay=0.0):
        self.gate, self.steps, self.closed, self.calls, self.delay = threading.Event(), 0, [], 0, delay

    def __call__(self, model, tokenizer, prompt, max_tokens=16, **options):
        self.calls += 1
        try:
            for i in range(max_tokens):
                if not self.gate.wait(10):
                    raise TimeoutError("gate never opened")
                time.sleep(self.delay)
                self.steps += 1
                yield SimpleNamespace(text="ab"[i % 2], token=97 + i % 2, logprob=-1.0, generation_tokens=i + 1,
                                      finish_reason="length" if i == max_tokens - 1 else None)
        except GeneratorExit:
            self.closed.append(self.steps)
            raise


class ByteTokenizer:
    has_chat_template = True
    eos_token_ids = ()

    def encode(self, text, add_special_tokens=True):
        return list(text.encode())

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode(errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return self.encode(text) if tokenize else text


def wait_until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.fixture
def scripted():
    script = Script()
    with BackgroundServer(make_app(None, ByteTokenizer(), MODEL, max_queue=1, generate=script)) as s:
        yield s, script
        script.gate.set()


def test_full_queue_gets_503_then_serves(scripted):
    server, script = scripted
    body = json.dumps({**GOOD, "max_tokens": 4}).encode()
    with futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(raw, server, "POST", "/v1/chat/completions", body)
        wait_until(lambda: script.calls == 1)
        waiting = pool.submit(raw, server, "POST", "/v1/chat/completions", body)
        wait_until(lambda: server.app.state.server.worker.jobs.qsize() == 1)
        status, answer = raw(server, "POST", "/v1/chat/completions", body)
        assert status == 503 and answer["error"]["code"] == "queue_full"
        script.gate.set()
        assert [f.result()[1]["choices"][0]["message"]["content"] for f in (running, waiting)] == ["abab"] * 2


def test_hang_up_stops_generation_at_next_token(scripted):
    server, script = scripted
    script.delay = 0.01
    script.gate.set()
    stream_then_hang_up(server.port, {**GOOD, "max_tokens": 100000, "stream": True}, events=3)
    wait_until(lambda: script.closed)
    assert script.closed[0] < 500  # stopped long before max_tokens (0.01 s a step)
    status, answer = raw(server, "POST", "/v1/chat/completions", json.dumps({**GOOD, "max_tokens": 3}).encode())
    assert status == 200 and answer["choices"][0]["message"]["content"] == "aba"


def test_hang_up_while_queued_is_never_run(scripted):
    server, script = scripted
    body = json.dumps({**GOOD, "max_tokens": 2}).encode()
    with futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(raw, server, "POST", "/v1/chat/completions", body)
        wait_until(lambda: script.calls == 1)
        data = json.dumps({**GOOD, "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
            jobs = server.app.state.server.worker.jobs
            wait_until(lambda: jobs.qsize() == 1)
        wait_until(lambda: jobs.queue[0].cancelled.is_set())  # the handler polls its client every 0.25 s
        script.gate.set()
        assert running.result()[0] == 200
    status, _ = raw(server, "POST", "/v1/chat/completions", body)
    assert status == 200 and script.calls == 2  # the hung-up request never reached the generator


def test_shutdown_with_a_request_in_flight_is_prompt():
    script = Script(delay=0.01)
    script.gate.set()
    server = BackgroundServer(make_app(None, ByteTokenizer(), MODEL, generate=script))
    body = json.dumps({**GOOD, "max_tokens": 100000}).encode()
    threading.Thread(target=raw, args=(server, "POST", "/v1/chat/completions", body), daemon=True).start()
    wait_until(lambda: script.steps > 0)
    start = time.monotonic()
    server.close()
    assert not server.thread.is_alive() and time.monotonic() - start < 3 and script.closed


def failing(model, tokenizer, prompt, max_tokens=16, seed=None, **options):
    """A generator that refuses (seed 1: ValueError), breaks (seed 2) or breaks after one token (seed 3)."""
    if seed == 1:
        raise ValueError("[generate] expected something else, got this")
    if seed == 2:
        raise RuntimeError("boom")
    yield SimpleNamespace(text="x", token=120, logprob=0.0, generation_tokens=1, finish_reason=None)
    if seed == 3:
        raise RuntimeError("late boom")
    yield SimpleNamespace(text="y", token=121, logprob=0.0, generation_tokens=2, finish_reason="stop")


def test_generator_errors_become_json_and_the_worker_lives_on():
    with BackgroundServer(make_app(None, ByteTokenizer(), MODEL, generate=failing)) as server:
        for seed, status in ((1, 400), (2, 500), (None, 200)):
            got, answer = raw(server, "POST", "/v1/chat/completions", json.dumps({**GOOD, "seed": seed}).encode())
            assert got == status, answer
        assert answer["choices"][0]["message"]["content"] == "xy"
        got, text = raw(server, "POST", "/v1/chat/completions", json.dumps({**GOOD, "seed": 3, "stream": True}).encode())
        events = [json.loads(line[6:]) for line in text.split("\n\n") if line.startswith("data: {")]
        assert got == 200 and text.endswith("data: [DONE]\n\n")
        assert events[1]["choices"][0]["delta"]["content"] == "x" and "late boom" in events[-1]["error"]["message"]
        got, answer = raw(server, "POST", "/v1/completions", json.dumps({"prompt": "a"}).encode())
        assert got == 200 and answer["choices"][0]["text"] == "xy"


def test_make_app_refuses_bad_arguments():
    with pytest.raises(ValueError, match=r"\[make_app\] expected max_queue to be an int >= 1, got 0"):
        make_app(None, ByteTokenizer(), MODEL, max_queue=0, generate=Script())
    with pytest.raises(ValueError, match=r"\[make_app\] expected model_id to be a non-empty string"):
        make_app(None, ByteTokenizer(), "", generate=Script())


def test_parse_request_fields():
    from mlx_zeta.lm.server_requests import RequestError, parse_request

    req = parse_request({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                  {"type": "text", "text": "b"}]}],
                         "max_tokens": 5, "max_completion_tokens": 7, "top_k": 0, "stop": "x", "seed": 3,
                         "logit_bias": {"3": -1}, "frobnicate": {"x": 1}}, "chat")
    assert req.messages == [{"role": "user", "content": "ab"}]
    assert req.options == {"max_tokens": 7, "stop": ["x"], "seed": 3, "logit_bias": {3: -1.0}}  # top_k 0: off
    assert parse_request({"prompt": "a"}, "text", max_tokens_default=9).options == {"max_tokens": 9}
    with pytest.raises(RequestError, match=r"^\[chat.completions\] expected messages\[0\].role to be one of") as e:
        parse_request({"messages": [{"role": "robot", "content": "x"}]}, "chat")
    assert (e.value.status, e.value.param) == (400, "messages[0].role")
    with pytest.raises(RequestError, match=r"^\[completions\] expected temperature to be a number in \[0, 2\], got nan"):
        parse_request({"prompt": "a", "temperature": float("nan")}, "text")
    with pytest.raises(RequestError, match=r"expected max_tokens to be None or an int >= 1, got True"):
        parse_request({"prompt": "a", "max_tokens": True}, "text")



def test_missing_serve_extra_is_one_line(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "uvicorn", None)  # import uvicorn -> ImportError
    with pytest.raises(ValueError, match=r"^\[mlx_zeta.lm\] uvicorn is not installed: pip install 'mlx-zeta\[serve\]'$"):
        make_app(None, ByteTokenizer(), MODEL, generate=Script())


@pytest.mark.parametrize("field,value,says", [
    ("repetition_penalty", float("inf"), "a finite number > 0"), ("repetition_penalty", 10**400, "a finite number > 0"),
    ("top_p", 0, r"a number in \(0, 1\]"), ("seed", 2**64, r"None or an int in \[0, 9223372036854775807\]"),
    ("max_tokens", "x", "None or an int >= 1")])
def test_parse_request_edges(field, value, says):
    """Values JSON can carry that Python would take badly (inf, ints beyond float or uint64); a bad
    max_tokens is refused even when max_completion_tokens (which wins) is set."""
    from mlx_zeta.lm.server_requests import RequestError, parse_request

    with pytest.raises(RequestError, match=rf"^\[completions\] expected {field} to be {says}, got "):
        parse_request({"prompt": "a", field: value, "max_completion_tokens": 3}, "text")
