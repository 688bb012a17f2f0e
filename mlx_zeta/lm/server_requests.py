"""The OpenAI request bodies the server accepts, checked field by field, and the JSON shapes it answers.

:func:`parse_request` turns a decoded JSON body of ``/v1/chat/completions`` (``kind="chat"``) or
``/v1/completions`` (``kind="text"``) into a :class:`ParsedRequest`: the prompt (chat messages or
text / token ids) and the keyword arguments of :func:`mlx_zeta.lm.stream_generate`. Unknown fields
are ignored (clients send many); a known field of the wrong type or out of range raises
:class:`RequestError`, which the server answers with an OpenAI-style error body::

    {"error": {"message": "[chat.completions] expected temperature to be a number in [0, 2], got 'hot'",
               "type": "invalid_request_error", "param": "temperature", "code": null}}

No HTTP library is imported here, so the checks are testable without a server.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, Dict, List, Optional, Union

from mlx_zeta.common.checks import check_choice, check_int, is_int

__all__ = ["RequestError", "ParsedRequest", "parse_request", "error_body", "completion_id", "chunk", "usage_chunk",
           "completion", "Tally", "sse"]

ROLES = ("system", "developer", "user", "assistant", "tool")
OWNERS = {"chat": "chat.completions", "text": "completions"}

# name -> (low, high, low is open): the OpenAI ranges, and ours for the extensions.
NUMBERS = {
    "temperature": (0.0, 2.0, False),
    "top_p": (0.0, 1.0, True),
    "min_p": (0.0, 1.0, False),
    "presence_penalty": (-2.0, 2.0, False),
    "frequency_penalty": (-2.0, 2.0, False),
    "repetition_penalty": (0.0, math.inf, True),
}


class RequestError(Exception):
    """A request the server refuses: HTTP ``status``, and the fields of the OpenAI error body."""

    def __init__(self, message: str, *, status: int = 400, param: Optional[str] = None,
                 code: Optional[str] = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.kind = message, status, param, code, kind

    def body(self) -> dict:
        return error_body(self.message, kind=self.kind, param=self.param, code=self.code)


def error_body(message: str, *, kind: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    """``{"error": {"message", "type", "param", "code"}}``, the body of every error answer."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def completion_id(kind: str) -> str:
    """A fresh id: ``chatcmpl-...`` for chat, ``cmpl-...`` for text completions."""
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


@dataclass
class ParsedRequest:
    """One checked request.

    Attributes:
        kind: ``"chat"`` or ``"text"``.
        messages: chat messages (``kind="chat"``), each with ``role`` and a string ``content``.
        prompt: the text or token ids (``kind="text"``).
        options: keyword arguments for ``stream_generate`` (only the fields the request set, and
            ``max_tokens``).
        stream, include_usage, logprobs: how to answer.
    """

    kind: str
    model: Optional[str]
    messages: Optional[List[dict]] = None
    prompt: Union[str, List[int], None] = None
    options: Dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = ""


class _Fields:
    """Reads fields of one body; every failure is a :class:`RequestError` naming the field."""

    def __init__(self, body: dict, owner: str):
        self.body, self.owner = body, owner

    def fail(self, name: str, expected: str, value: Any) -> RequestError:
        return RequestError(f"[{self.owner}] expected {name} to be {expected}, got {value!r}", param=name)

    def integer(self, name: str, low: Optional[int] = None, high: Optional[int] = None) -> Optional[int]:
        try:
            return check_int(self.owner, name, self.body.get(name), low, high, optional=True)
        except ValueError as e:
            raise RequestError(str(e), param=name) from None

    def number(self, name: str) -> Optional[float]:
        value = self.body.get(name)
        if value is None:
            return None
        low, high, open_low = NUMBERS[name]
        try:
            x = float(value) if isinstance(value, Real) and not isinstance(value, bool) else math.nan
        except OverflowError:  # an int beyond float's range
            x = math.nan
        if not math.isfinite(x) or not (low < x if open_low else low <= x) or not x <= high:
            what = (f"a number in {'(' if open_low else '['}{low:g}, {high:g}]" if high < math.inf
                    else f"a finite number > {low:g}")
            raise self.fail(name, what, value)
        return x

    def boolean(self, name: str) -> Optional[bool]:
        value = self.body.get(name)
        try:
            return check_choice(self.owner, name, value, (True, False), optional=True)
        except ValueError:
            raise self.fail(name, "true or false", value) from None

    def stop(self) -> Optional[List[str]]:
        value = self.body.get("stop")
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise self.fail("stop", "a non-empty string or a list of them", value)
        return stops or None

    def logit_bias(self, vocab: Optional[int]) -> Optional[Dict[int, float]]:
        value = self.body.get("logit_bias")
        if value is None:
            return None
        expected = "an object of token id -> number in [-100, 100]" + (f" with ids < {vocab}" if vocab else "")
        if not isinstance(value, dict):
            raise self.fail("logit_bias", expected, value)
        bias = {}
        for key, b in value.items():
            tok = int(key) if isinstance(key, str) and key.strip().isdigit() else -1
            good = isinstance(b, Real) and not isinstance(b, bool) and -100 <= b <= 100
            if tok < 0 or (vocab is not None and tok >= vocab) or not good:
                raise self.fail("logit_bias", expected, {key: b})
            bias[tok] = float(b)
        return bias or None


def _messages(f: _Fields) -> List[dict]:
    value = f.body.get("messages")
    if not isinstance(value, list) or not value:
        raise f.fail("messages", "a non-empty list of {role, content} objects", value)
    out = []
    for i, m in enumerate(value):
        name = f"messages[{i}]"
        if not isinstance(m, dict):
            raise f.fail(name, "an object with role and content", m)
        if m.get("role") not in ROLES:
            raise f.fail(f"{name}.role", f"one of {ROLES}", m.get("role"))
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise f.fail(f"{name}.content", "a string or a list of text parts", content)
            content = "".join(p["text"] for p in content)
        elif content is None and m["role"] == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise f.fail(f"{name}.content", "a string or a list of text parts", content)
        out.append({**m, "content": content})
    return out


def _prompt(f: _Fields, vocab: Optional[int]) -> Union[str, List[int]]:
    value = f.body.get("prompt")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and all(is_int(t) and 0 <= t < (vocab or 2**31) for t in value):
        return list(value)
    raise f.fail("prompt", "a non-empty string or a list of token ids" + (f" < {vocab}" if vocab else ""),
                 value)


def parse_request(body: Any, kind: str, *, vocab: Optional[int] = None, max_tokens_default: int = 512
                  ) -> ParsedRequest:
    """Check a decoded JSON body and gather what generation needs.

    Args:
        body: the decoded JSON (anything; a non-object is refused).
        kind (str): ``"chat"`` (``/v1/chat/completions``) or ``"text"`` (``/v1/completions``).
        vocab (int, optional): vocabulary size; token ids in ``prompt`` and ``logit_bias`` must be below it.
        max_tokens_default (int): ``max_tokens`` when the request sets none. Default: ``512``.

    Returns:
        A :class:`ParsedRequest`.

    Raises :class:`RequestError` (HTTP 400) naming the first bad field.
    """
    owner = OWNERS[kind]
    if not isinstance(body, dict):
        raise RequestError(f"[{owner}] expected the body to be a JSON object, got {type(body).__name__}")
    f = _Fields(body, owner)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise f.fail("model", "a string", model)
    if body.get("n") is not None and (not is_int(body["n"]) or body["n"] != 1):
        raise f.fail("n", "1 (one choice per request)", body["n"])
    req = ParsedRequest(kind=kind, model=model, id=completion_id(kind))
    if kind == "chat":
        req.messages = _messages(f)
        req.logprobs = bool(f.boolean("logprobs"))
        if body.get("top_logprobs") not in (None, 0) or isinstance(body.get("top_logprobs"), bool):
            raise f.fail("top_logprobs", "0 or null (only the sampled token's log-probability is given)",
                         body["top_logprobs"])
    else:
        req.prompt = _prompt(f, vocab)
        req.logprobs = f.integer("logprobs", 0, 5) is not None
    req.stream = bool(f.boolean("stream"))
    usage = body.get("stream_options")
    if usage is not None:
        if not isinstance(usage, dict):
            raise f.fail("stream_options", "an object", usage)
        req.include_usage = bool(_Fields(usage, owner).boolean("include_usage"))
    max_tokens, newer = f.integer("max_tokens", 1), f.integer("max_completion_tokens", 1)
    max_tokens = newer if newer is not None else max_tokens
    opts = {"max_tokens": max_tokens_default if max_tokens is None else max_tokens}
    opts.update({name: f.number(name) for name in NUMBERS})
    opts.update(top_k=f.integer("top_k", 0) or None, seed=f.integer("seed", 0, 2**63 - 1), stop=f.stop(),
                logit_bias=f.logit_bias(vocab))
    req.options = {k: v for k, v in opts.items() if v is not None}
    return req


def _logprobs(req: ParsedRequest, pieces: Optional[List[tuple]], offset: int = 0) -> Optional[dict]:
    """The ``logprobs`` of a choice from ``(token_text, logprob)`` pairs (``None`` when not asked)."""
    if not req.logprobs or pieces is None:
        return None
    if req.kind == "chat":
        return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                            for t, lp in pieces]}
    starts = [offset + sum(len(t) for t, _ in pieces[:i]) for i in range(len(pieces))]
    return {"tokens": [t for t, _ in pieces], "token_logprobs": [lp for _, lp in pieces],
            "top_logprobs": None, "text_offset": starts}


def _envelope(req: ParsedRequest, obj: str, choices: list) -> dict:
    return {"id": req.id, "object": obj, "created": req.created, "model": req.model, "choices": choices}


def chunk(req: ParsedRequest, text: str = "", finish: Optional[str] = None, pieces: Optional[List[tuple]] = None,
          *, first: bool = False, offset: int = 0) -> dict:
    """One server-sent event of a stream: a ``chat.completion.chunk`` (the first one carries the role)
    or a ``text_completion`` piece; ``finish`` set on the last."""
    lp = _logprobs(req, pieces, offset)
    if req.kind == "chat":
        delta = {"role": "assistant"} if first else {}
        if text or first:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return _envelope(req, "chat.completion.chunk", [choice])
    return _envelope(req, "text_completion", [{"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}])


def usage_chunk(req: ParsedRequest, usage: dict) -> dict:
    """The extra last event of a stream with ``stream_options.include_usage``: no choices, the usage."""
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    return {**_envelope(req, obj, []), "usage": usage}


def completion(req: ParsedRequest, text: str, finish: str, usage: dict, pieces: Optional[List[tuple]] = None) -> dict:
    """The whole answer of a non-streaming request: a ``chat.completion`` or a ``text_completion``."""
    lp = _logprobs(req, pieces)
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                  "finish_reason": finish}
        return {**_envelope(req, "chat.completion", [choice]), "usage": usage}
    choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}
    return {**_envelope(req, "text_completion", [choice]), "usage": usage}


def sse(obj: Any) -> str:
    """One server-sent event: ``data: <json>`` and a blank line."""
    return f"data: {json.dumps(obj)}\n\n"


class Tally:
    """What a request has received so far: text, finish reason, token count, logprob pieces, and
    how many prompt tokens the model actually ran (the rest came from the prompt cache)."""

    def __init__(self, tokenizer: Any, logprobs: bool):
        self.tokenizer, self.want = tokenizer, logprobs
        self.text, self.finish, self.tokens, self.prefilled = "", None, 0, None

    def add(self, r: Any) -> Optional[List[tuple]]:
        self.text += r.text
        self.finish = r.finish_reason or self.finish
        self.tokens = getattr(r, "generation_tokens", self.tokens + 1)
        self.prefilled = getattr(r, "prompt_tokens", self.prefilled)
        if not self.want or getattr(r, "token", None) is None:
            return None
        piece = self.tokenizer.decode([int(r.token)], skip_special_tokens=False)
        return [(piece, float(r.logprob))]

    def usage(self, prompt_tokens: int) -> dict:
        """OpenAI's ``usage``; ``prompt_tokens_details.cached_tokens``: prompt tokens reused from the cache."""
        cached = 0 if self.prefilled is None else max(0, prompt_tokens - self.prefilled)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": self.tokens,
                "total_tokens": prompt_tokens + self.tokens, "prompt_tokens_details": {"cached_tokens": cached}}
