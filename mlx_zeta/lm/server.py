"""An OpenAI-compatible HTTP server for one model: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``.

Built on Starlette and uvicorn (the ``serve`` extra: ``pip install 'mlx-zeta[serve]'``), both imported
only when an app is made. Answers are whole JSON objects or, with ``"stream": true``, server-sent
events ``data: {...}\\n\\n`` ending with ``data: [DONE]``.

Model passes run one at a time on a single worker thread (an MLX model is not re-entrant across
threads). A request is checked (:mod:`mlx_zeta.lm.server_requests`), tokenized, and put on a bounded
queue (full: HTTP 503); the worker runs ``stream_generate`` for it and hands each
:class:`~mlx_zeta.lm.GenerationResponse` back to the request's event loop. A client that goes away
(mid-stream, or while its request waits) has its generation stopped before the next token; the
server keeps serving. One :class:`~mlx_zeta.lm.PromptCache` is reused from request to request, so a
conversation that grows turn by turn prefills only its new tokens.

It serves a trained checkpoint and blocks until stopped, so this is shown, not run:

.. code-block:: python

    from mlx_zeta.lm import load
    from mlx_zeta.lm.server import make_app, serve

    serve("path/to/model", port=8080)            # blocks; Ctrl-C stops it
    model, tokenizer = load("path/to/model")
    app = make_app(model, tokenizer, "tiny")     # an ASGI app, e.g. for BackgroundServer
"""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import sys
import threading
import time
from typing import Any, Callable, List, Optional

from mlx_zeta.converters.io import materialize
from mlx_zeta.converters.pretrained import task_of
from mlx_zeta.lm.server_requests import (OWNERS, ParsedRequest, RequestError, Tally, chunk, completion,
                                         error_body, parse_request, sse, usage_chunk)

__all__ = ["make_app", "serve", "BackgroundServer"]

_DONE = object()  # the worker's last word for a job


def _require():
    """``(starlette, uvicorn)``, or a one-line ``ValueError`` naming the ``serve`` extra."""
    from mlx_zeta.lm.tokenizer import require

    return require("starlette", "serve"), require("uvicorn", "serve")


class _Job:
    """One request on its way through the worker: prompt ids, generation options, and the asyncio
    queue (owned by the request's loop) its responses come back on."""

    def __init__(self, prompt: List[int], options: dict, loop: asyncio.AbstractEventLoop):
        self.prompt, self.options, self.loop = prompt, options, loop
        self.out: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def emit(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled.set()


def _shutting_down() -> RequestError:
    return RequestError("[server] shutting down", status=503, code="shutting_down", kind="server_error")


class _Worker:
    """The single thread that runs the model, fed by a bounded queue of :class:`_Job`."""

    def __init__(self, generate: Callable, model: Any, tokenizer: Any, max_queue: int, prompt_cache: bool):
        self.generate, self.model, self.tokenizer = generate, model, tokenizer
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.use_cache, self.cache = prompt_cache, None
        self.thread: Optional[threading.Thread] = None
        self.lock, self.stopping = threading.Lock(), False

    def submit(self, job: _Job) -> None:
        with self.lock:
            if self.stopping:
                raise _shutting_down()
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="mlx-zeta-server-worker", daemon=True)
                self.thread.start()
            try:
                self.jobs.put_nowait(job)
            except queue.Full:
                raise RequestError(f"[server] expected at most {self.jobs.maxsize} waiting requests, the queue "
                                   "is full; retry later", status=503, code="queue_full", kind="server_error") from None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the running job at its next token, answer the waiting ones 503, end the thread."""
        with self.lock:
            self.stopping = True
        if self.thread is not None:
            try:
                self.jobs.put(None, timeout=timeout)
            except queue.Full:  # the worker is stuck inside one model pass: it is a daemon thread
                return
            self.thread.join(timeout)

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if self.stopping:
                job.emit(_shutting_down())
            elif not job.cancelled.is_set():
                self._serve(job)

    def _serve(self, job: _Job) -> None:
        options = dict(job.options)
        if self.use_cache:
            if self.cache is None:
                from mlx_zeta.lm import PromptCache

                self.cache = PromptCache(self.model)
            options["prompt_cache"] = self.cache
        failed = True
        try:
            responses = self.generate(self.model, self.tokenizer, job.prompt, **options)
            try:
                for r in responses:
                    job.emit(r)
                    if job.cancelled.is_set() or self.stopping:
                        break
            finally:
                close = getattr(responses, "close", None)
                if close is not None:
                    close()
            job.emit(_DONE)
            failed = False
        except Exception as e:  # noqa: BLE001 - handed to the request, the worker lives on
            job.emit(e)
        if failed:
            self.cache = None  # a pass that raised may leave the caches mid-update: start afresh


def _error(e: Exception):
    from starlette.responses import JSONResponse

    if isinstance(e, RequestError):
        return JSONResponse(e.body(), status_code=e.status)
    if isinstance(e, ValueError):  # stream_generate's refusal of an option
        return JSONResponse(error_body(str(e)), status_code=400)
    return JSONResponse(error_body(f"[server] {type(e).__name__}: {e}", kind="server_error"), status_code=500)


class _Server:
    """The state behind the routes: model, tokenizer, worker, limits."""

    def __init__(self, model, tokenizer, model_id, *, generate, max_queue, max_prompt_tokens, max_tokens_default,
                 prompt_cache):
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.vocab = getattr(model, "num_tokens", None)
        self.limit = max_prompt_tokens if max_prompt_tokens is not None else getattr(model, "max_seq_len", None)
        self.max_tokens_default = max_tokens_default
        causal = callable(getattr(model, "make_cache", None)) and task_of(model) != "seq2seq"
        self.worker = _Worker(generate, model, tokenizer, max_queue, prompt_cache and causal)
        self.created = int(time.time())

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "mlx-zeta"}

    def prompt_ids(self, req: ParsedRequest) -> List[int]:
        """The request's prompt as token ids (chat: through the template), within the length limit."""
        from mlx_zeta.lm import prompt_ids

        owner, param = OWNERS[req.kind], "messages" if req.kind == "chat" else "prompt"
        if req.kind == "chat" and not getattr(self.tokenizer, "has_chat_template", True):
            raise RequestError(f"[{owner}] expected a model with a chat template, {self.model_id!r} has none; "
                               "use /v1/completions", param=param)
        try:
            ids = prompt_ids(self.tokenizer, req.messages if req.kind == "chat" else req.prompt)
        except Exception as e:  # noqa: BLE001 - the template's or the tokenizer's refusal (e.g. roles out of order)
            raise RequestError(f"[{owner}] the prompt could not be tokenized: {e}", param=param) from None
        if self.limit is not None and len(ids) > self.limit:
            raise RequestError(f"[{owner}] expected a prompt of at most {self.limit} tokens, got {len(ids)}",
                               param=param, code="context_length_exceeded")
        return list(ids)

    async def next(self, job: _Job, request: Any) -> Any:
        """The job's next response (or ``_DONE``), polling the client meanwhile: gone -> cancel."""
        while True:
            try:
                item = await asyncio.wait_for(job.out.get(), 0.25)
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    job.cancelled.set()
                    raise ConnectionAbortedError("client went away") from None
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    async def complete(self, request: Any, kind: str):
        from starlette.responses import JSONResponse, StreamingResponse

        try:
            raw = await request.body()
            try:
                body = json.loads(raw)
            except ValueError as e:
                raise RequestError(f"[{OWNERS[kind]}] expected a JSON body, got invalid JSON ({e})") from None
            req = parse_request(body, kind, vocab=self.vocab, max_tokens_default=self.max_tokens_default)
            if req.model is not None and req.model != self.model_id:
                raise RequestError(f"[{OWNERS[kind]}] expected model {self.model_id!r} (the one served here), got "
                                   f"{req.model!r}", status=404, param="model", code="model_not_found")
            req.model = self.model_id
            ids = self.prompt_ids(req)
            job = _Job(ids, req.options, asyncio.get_running_loop())
            self.worker.submit(job)
        except RequestError as e:
            return _error(e)
        try:
            first = await self.next(job, request)
        except BaseException as e:  # noqa: BLE001 - an error is answered as JSON; a cancellation goes on up
            job.cancelled.set()
            if isinstance(e, ConnectionAbortedError):
                return JSONResponse(error_body("[server] client went away"), status_code=499)
            if not isinstance(e, Exception):
                raise
            return _error(e)
        if req.stream:
            return StreamingResponse(self.events(req, job, first, len(ids)), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            return JSONResponse(await self.collect(req, job, first, len(ids), request))
        except ConnectionAbortedError:
            return JSONResponse(error_body("[server] client went away"), status_code=499)
        except Exception as e:  # noqa: BLE001
            return _error(e)
        finally:
            job.cancelled.set()

    async def collect(self, req: ParsedRequest, job: _Job, item: Any, n_prompt: int, request: Any) -> dict:
        tally, pieces = Tally(self.tokenizer, req.logprobs), []
        while item is not _DONE:
            pieces += tally.add(item) or []
            item = await self.next(job, request)
        return completion(req, tally.text, tally.finish or "stop", tally.usage(n_prompt), pieces)

    async def events(self, req: ParsedRequest, job: _Job, item: Any, n_prompt: int):
        tally = Tally(self.tokenizer, req.logprobs)
        try:
            yield sse(chunk(req, first=True))
            while item is not _DONE:
                offset = len(tally.text)
                pieces = tally.add(item)
                if item.text or pieces:
                    yield sse(chunk(req, item.text, None, pieces, offset=offset))
                item = await self.next(job, None)
            yield sse(chunk(req, "", tally.finish or "stop"))
            if req.include_usage:
                yield sse(usage_chunk(req, tally.usage(n_prompt)))
        except Exception as e:  # noqa: BLE001 - headers are sent: the error travels as an event
            yield sse(error_body(f"[server] {type(e).__name__}: {e}", kind="server_error"))
        finally:
            job.cancelled.set()  # the client went away (or we are done): stop before the next token
        yield "data: [DONE]\n\n"


def make_app(model: Any, tokenizer: Any, model_id: str, *, max_queue: int = 16,
             max_prompt_tokens: Optional[int] = None, max_tokens_default: int = 512, prompt_cache: bool = True,
             generate: Optional[Callable] = None):
    """The Starlette (ASGI) app serving one model.

    Args:
        model: a causal LM from :func:`mlx_zeta.lm.load` (``num_tokens`` and ``max_seq_len`` are read
            when present: token ids must be below the first, prompts no longer than the second).
        tokenizer: its :class:`~mlx_zeta.lm.Tokenizer`.
        model_id (str): the name ``/v1/models`` lists; a request naming another model gets 404.
        max_queue (int): requests that may wait while one runs; one more gets HTTP 503. Default: ``16``.
        max_prompt_tokens (int, optional): longest prompt in tokens (longer: HTTP 400). Default:
            ``model.max_seq_len`` if the model has one, else no limit.
        max_tokens_default (int): ``max_tokens`` of a request that sets none. Default: ``512``.
        prompt_cache (bool): keep one prompt cache across requests (a common prefix is prefilled once).
            Default: ``True``.
        generate (callable, optional): the generator run per request, with the signature of
            :func:`mlx_zeta.lm.stream_generate` (the default). Tests put a scripted one here.

    Returns:
        A ``starlette.applications.Starlette``; its lifespan stops the worker thread on shutdown.
    """
    from mlx_zeta.common.checks import check_int

    _require()
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    check_int("make_app", "max_queue", max_queue, 1)
    check_int("make_app", "max_tokens_default", max_tokens_default, 1)
    check_int("make_app", "max_prompt_tokens", max_prompt_tokens, 1, optional=True)
    if not isinstance(model_id, str) or not model_id:
        raise ValueError(f"[make_app] expected model_id to be a non-empty string, got {model_id!r}")
    if generate is None:
        from mlx_zeta.lm import stream_generate as generate
    if callable(getattr(model, "modules", None)):  # the worker thread cannot evaluate arrays left pending here
        materialize(model)
    state = _Server(model, tokenizer, model_id, generate=generate, max_queue=max_queue,
                    max_prompt_tokens=max_prompt_tokens, max_tokens_default=max_tokens_default,
                    prompt_cache=prompt_cache)

    async def models(request):
        return JSONResponse({"object": "list", "data": [state.model_card()]})

    async def one_model(request):
        if request.path_params["name"] != model_id:
            raise RequestError(f"[models] expected model {model_id!r}, got {request.path_params['name']!r}",
                               status=404, param="model", code="model_not_found")
        return JSONResponse(state.model_card())

    async def chat(request):
        return await state.complete(request, "chat")

    async def text(request):
        return await state.complete(request, "text")

    async def http_error(request, exc: HTTPException):
        words = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed on {request.url.path}"}
        body = error_body(f"[server] {words.get(exc.status_code, exc.detail)}", code=str(exc.status_code))
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def refused(request, exc: RequestError):
        return _error(exc)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.get_running_loop().run_in_executor(None, state.worker.stop)

    routes = [Route("/v1/models", models, methods=["GET"]), Route("/v1/models/{name:path}", one_model, methods=["GET"]),
              Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/completions", text, methods=["POST"]),
              Route("/health", lambda request: JSONResponse({"status": "ok"}), methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, RequestError: refused})
    app.state.server = state
    return app


def _bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port`` (``port=0``: a free one), or a one-line error."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)  # clients that connect before uvicorn's loop starts wait in the backlog
    except OSError as e:
        raise RuntimeError(f"[serve] expected to listen on {host}:{port}, got {e}") from None
    return sock


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class BackgroundServer:
    """Run an ASGI app with uvicorn on a daemon thread (tests, notebooks); a context manager.

    Args:
        app: e.g. from :func:`make_app`.
        host (str): Default: ``"127.0.0.1"``.
        port (int): ``0`` picks a free port. Default: ``0``.
        log_level (str): uvicorn's. Default: ``"warning"``.
        timeout (float): seconds to wait for startup. Default: ``30``.

    ``url`` is ``http://host:port``; :meth:`close` stops it (open streams get a second to finish).

    It needs a model and the ``openai`` client, so it is shown, not run:

    .. code-block:: python

        from openai import OpenAI
        from mlx_zeta.lm import load
        from mlx_zeta.lm.server import BackgroundServer, make_app

        model, tok = load("path/to/model")
        with BackgroundServer(make_app(model, tok, "tiny")) as server:
            OpenAI(base_url=server.url + "/v1", api_key="none")
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning",
                 timeout: float = 30.0):
        uvicorn = _require()[1]
        self.app, self.sock = app, _bind(host, port)
        self.port = self.sock.getsockname()[1]
        self.url = _url(host, self.port)
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=1, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="mlx-zeta-server")
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"[BackgroundServer] expected the server to start on {self.url} within "
                                   f"{timeout:g}s, got {'an exit' if not self.thread.is_alive() else 'no start'}")
            time.sleep(0.01)

    def close(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(model_path: str, host: str = "127.0.0.1", port: int = 8080, *, max_queue: int = 16,
          max_tokens_default: int = 512, max_prompt_tokens: Optional[int] = None, model_id: Optional[str] = None,
          dtype: Optional[str] = None, prompt_cache: bool = True, log_level: str = "warning") -> None:
    """Load ``model_path`` and serve it until Ctrl-C (or SIGTERM); blocks.

    Prints ``serving <model> on http://host:port`` to stderr once listening. ``model_id`` (default:
    ``model_path`` as given) is the name clients put in ``model``; the other arguments are
    :func:`make_app`'s and :func:`mlx_zeta.lm.load`'s. The port is taken before the model loads, so a
    busy port fails at once with ``RuntimeError("[serve] expected to listen on host:port, got ...")``.
    """
    uvicorn = _require()[1]
    from mlx_zeta.lm import load

    sock = _bind(host, port)
    try:
        model, tokenizer = load(model_path, dtype=dtype)
        name = model_id or str(model_path)
        app = make_app(model, tokenizer, name, max_queue=max_queue, max_tokens_default=max_tokens_default,
                       max_prompt_tokens=max_prompt_tokens, prompt_cache=prompt_cache)
        server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=3, lifespan="on"))
        print(f"serving {name} on {_url(host, sock.getsockname()[1])}", file=sys.stderr, flush=True)
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # a second Ctrl-C during shutdown
            pass
    finally:
        sock.close()
