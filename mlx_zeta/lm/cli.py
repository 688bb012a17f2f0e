"""The language-model commands of the ``mlx-zeta`` command line (:mod:`mlx_zeta.cli` parses, runs
them and sets the exit status).

    mlx-zeta generate --model M --prompt TEXT [--system S] [--max-tokens N] [--temp T] [--top-p P]
                      [--top-k K] [--min-p P] [--repetition-penalty R] [--seed S] [--stop S ...]
                      [--chat | --no-chat] [--max-kv-size N] [--prompt-cache FILE]
                      [--draft-model D [--num-draft-tokens K]] [--adapter-path A] [--dtype D]

``generate`` loads M (a folder or a Hub repo id, :func:`mlx_zeta.lm.load`) and streams the text of
:func:`mlx_zeta.lm.stream_generate` to stdout piece by piece (each flushed as it comes), then one
line of statistics to stderr: prompt tokens and tok/s, generated tokens and tok/s, peak memory in
GB. With a chat template (``--chat``, the default when the tokenizer has one) the prompt, after an
optional ``--system`` message, is the user's message of a chat; ``--no-chat`` feeds the text as it
is. ``--prompt -`` reads the prompt from stdin. Sampling options left out come from the
checkpoint's ``generation_config.json`` (greedy without one). ``--prompt-cache FILE`` starts from
the prompt cache saved in FILE, or saves one there after the run when FILE does not exist yet.
``--adapter-path A`` applies the LoRA/DoRA adapters in A first (ours from ``mlx-zeta lora``, or a
PEFT adapter folder; ``chat`` takes it too).

    mlx-zeta chat --model M [--system S] [--max-tokens N] [--temp T] [--adapter-path A] [...]

``chat`` is a REPL: each line read from stdin (a terminal or a pipe) is the user's next message,
the answer streams to stdout, and one :class:`~mlx_zeta.lm.PromptCache` lives across the turns,
so a turn runs only the tokens the cache does not hold yet (the statistics line on stderr says
how many came from the cache). ``/reset`` forgets the history, ``/quit`` or end of input ends
it (exit status 0).

    mlx-zeta serve --model M [--host 127.0.0.1] [--port 8080] [--max-queue N] [...]

``serve`` runs the OpenAI-compatible server (:func:`mlx_zeta.lm.server.serve`, the ``serve``
extra) until Ctrl-C.

``lora`` (fine-tuning) and ``fuse`` (adapters into weights) are :mod:`mlx_zeta.lm.tune_cli`'s,
listed in :data:`COMMANDS` here.

Handlers raise ``ValueError`` for bad input (exit status 2) and ``OSError`` for what the system
refused (exit status 1); the options are checked before the model loads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from .tune_cli import COMMANDS as _TUNE_COMMANDS
from .tune_cli import check_adapter_path

__all__ = ["COMMANDS"]

_DTYPES = ("float32", "float16", "bfloat16")


def _count(text: str) -> int:
    """An argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return value


def _port(text: str) -> int:
    """An argparse type: a TCP port, 0 (any free one) to 65535."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 0 to 65535, got {text!r}")
    return int(text)


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="M", help="model folder or Hub repo id ('owner/name')")
    p.add_argument("--dtype", choices=_DTYPES, help="cast floating weights (default: the checkpoint's dtypes)")


def _sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=_count, default=256, metavar="N",
                   help="most tokens to generate (default: 256)")
    p.add_argument("--temp", type=float, metavar="T", help="sampling temperature; 0 is greedy "
                   "(default: generation_config.json's, greedy without one)")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling: keep the top tokens of mass P")
    p.add_argument("--top-k", type=int, metavar="K", help="keep the K most likely tokens")
    p.add_argument("--min-p", type=float, metavar="P", help="drop tokens less likely than P times the top one")
    p.add_argument("--repetition-penalty", type=float, metavar="R", help="penalise tokens already seen (1 = off)")
    p.add_argument("--seed", type=int, metavar="S", help="seed of the random draws")
    p.add_argument("--max-kv-size", type=_count, metavar="N",
                   help="keep at most N positions per layer (a rotating cache for long generations)")


def _sampling(args: argparse.Namespace, command: str) -> Dict[str, Any]:
    """The sampling keywords of :func:`~mlx_zeta.lm.stream_generate`, checked by its own checks."""
    from mlx_zeta.common import check_int
    from mlx_zeta.structs.sampling import check_penalties, check_sampling_args

    temperature = 0.0 if args.temp is None else args.temp  # None: the checkpoint's, checked when read
    check_sampling_args(command, temperature, args.top_k, args.top_p, args.min_p, None)
    check_penalties(command, args.repetition_penalty)
    check_int(command, "seed", args.seed, 0, optional=True)
    return dict(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed)


def _stats(r: Any, cached: Optional[int] = None, drafted: Optional[int] = None) -> str:
    """One line of statistics from the last :class:`~mlx_zeta.lm.GenerationResponse` of a run
    (``cached``: prompt tokens the prompt cache held; ``drafted``: tokens a draft model proposed)."""
    reused = "" if cached is None else f" ({cached} reused from the cache)"
    draft = "" if drafted is None else f"; {drafted} of them from the draft model"
    return (f"prompt: {r.prompt_tokens} tokens{reused}, {r.prompt_tps:.1f} tok/s; generation: "
            f"{r.generation_tokens} tokens{draft}, {r.generation_tps:.1f} tok/s; peak memory: {r.peak_memory:.3f} GB")


def _stream(responses) -> tuple:
    """Write each piece to stdout as it comes (flushed); returns (the whole text, the last response,
    how many tokens came from a draft model)."""
    pieces, last, drafted = [], None, 0
    for last in responses:
        drafted += bool(last.from_draft)
        if last.text:
            sys.stdout.write(last.text)
            sys.stdout.flush()
            pieces.append(last.text)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(pieces), last, drafted


def _adapter_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter-path", type=Path, metavar="A",
                   help="apply the LoRA/DoRA adapters in folder A (ours or PEFT's)")


def _load(args: argparse.Namespace):
    from mlx_zeta.lm import load

    check_adapter_path(args.command, args.adapter_path)
    return load(args.model, dtype=args.dtype, adapter_path=args.adapter_path)


# --------------------------------------------------------------------------- generate


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt, streamed to stdout",
                       description="Load a model with its tokenizer and stream the text it generates after a "
                                   "prompt to stdout; statistics (tok/s, peak memory) go to stderr.")
    _model_options(p)
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the prompt ('-' reads it from stdin)")
    p.add_argument("--system", metavar="S", help="a system message before the prompt (chat only)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="render the prompt with the chat template (default: when the tokenizer has one)")
    _sampling_options(p)
    p.add_argument("--stop", nargs="+", action="extend", metavar="S", help="strings that end the text")
    p.add_argument("--prompt-cache", type=Path, metavar="FILE",
                   help="start from the prompt cache saved in FILE; save one there if FILE does not exist")
    p.add_argument("--draft-model", metavar="D", help="speculative decoding with this smaller model")
    p.add_argument("--num-draft-tokens", type=_count, metavar="K",
                   help="tokens the draft proposes per step (default: 3)")
    _adapter_option(p)
    p.set_defaults(handler=_generate)


def _prompt(args: argparse.Namespace, tokenizer: Any) -> Any:
    """The text or chat messages to generate from."""
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    chat = tokenizer.has_chat_template if args.chat is None else args.chat
    if chat and not tokenizer.has_chat_template:
        raise ValueError(f"[generate] --chat: the tokenizer of {args.model} has no chat template; pass --no-chat")
    if not chat:
        if args.system is not None:
            raise ValueError("[generate] --system needs a chat (the tokenizer has no chat template, or --no-chat)")
        return text
    system = [] if args.system is None else [{"role": "system", "content": args.system}]
    return system + [{"role": "user", "content": text}]


def _generate(args: argparse.Namespace) -> int:
    from mlx_zeta.lm import prompt_ids, stream_generate

    sampling = _sampling(args, "generate")
    if args.draft_model is None and args.num_draft_tokens is not None:
        raise ValueError("[generate] --num-draft-tokens needs --draft-model")
    _check_prompt_cache(args)
    model, tokenizer = _load(args)
    draft = None if args.draft_model is None else _load_draft(args)
    ids = prompt_ids(tokenizer, _prompt(args, tokenizer))
    cache, save_to = _open_prompt_cache(args, model)
    bounded = args.max_kv_size if cache is None else None  # a prompt cache has its own
    kwargs = dict(sampling, stop=args.stop, prompt_cache=cache, max_kv_size=bounded)
    if draft is not None:
        kwargs.update(draft_model=draft, num_draft_tokens=args.num_draft_tokens or 3)
    _, last, drafted = _stream(stream_generate(model, tokenizer, ids, args.max_tokens, **kwargs))
    if save_to is not None:
        _save_prompt_cache(cache, save_to)
    print(_stats(last, None if cache is None else len(ids) - last.prompt_tokens, None if draft is None else drafted),
          file=sys.stderr)
    return 0


def _load_draft(args: argparse.Namespace):
    from mlx_zeta.converters.pretrained import from_pretrained

    return from_pretrained(args.draft_model, dtype=args.dtype)


def _check_prompt_cache(args: argparse.Namespace) -> None:
    """``--prompt-cache`` settings that fail before the model loads."""
    path = args.prompt_cache
    if path is None:
        return
    if path.suffix != ".safetensors":
        raise ValueError(f"[generate] expected --prompt-cache to be a .safetensors file, got {str(path)!r}")
    if path.exists() and args.max_kv_size is not None:
        raise ValueError(f"[generate] --max-kv-size: the prompt cache {path} keeps the size it was made with")


def _open_prompt_cache(args: argparse.Namespace, model: Any) -> tuple:
    """``(PromptCache, file to save it to)``: the one saved in ``--prompt-cache`` if that exists,
    else a fresh one to save there after the run (``(None, None)`` without the option)."""
    from mlx_zeta.lm import PromptCache, load_prompt_cache

    path = args.prompt_cache
    if path is None:
        return None, None
    if path.exists():
        return load_prompt_cache(path, model), None
    return PromptCache(model, args.max_kv_size), path


def _save_prompt_cache(cache: Any, path: Path) -> None:
    from mlx_zeta.lm import save_prompt_cache

    save_prompt_cache(path, cache)
    print(f"saved the prompt cache ({len(cache.tokens)} tokens) to {path}", file=sys.stderr)


# --------------------------------------------------------------------------- chat


def _add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal (keeps history and KV cache)",
                       description="A chat REPL: each line of stdin is your next message; the model's answer "
                                   "streams to stdout. /reset forgets the history, /quit (or end of input) ends.")
    _model_options(p)
    p.add_argument("--system", metavar="S", help="a system message opening the chat")
    _sampling_options(p)
    _adapter_option(p)
    p.set_defaults(handler=_chat)


def _read_line() -> Optional[str]:
    """The next line of stdin without its newline (``None`` at end of input); a prompt on a terminal."""
    if sys.stdin.isatty():
        try:
            return input(">> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line.rstrip("\r\n") if line else None


def _chat(args: argparse.Namespace) -> int:
    from mlx_zeta.converters.pretrained import task_of
    from mlx_zeta.lm import PromptCache, prompt_ids, stream_generate

    sampling = _sampling(args, "chat")
    model, tokenizer = _load(args)
    if not tokenizer.has_chat_template:
        raise ValueError(f"[chat] the tokenizer of {args.model} has no chat template; use mlx-zeta generate --no-chat")
    seq2seq = task_of(model) == "seq2seq"  # T5 runs its encoder anew each turn: no cache to keep
    cache = None if seq2seq else PromptCache(model, args.max_kv_size)
    opening: List[Dict[str, str]] = [] if args.system is None else [{"role": "system", "content": args.system}]
    messages = list(opening)
    if sys.stdin.isatty():
        print("type a message; /reset forgets the history, /quit ends", file=sys.stderr)
    while (line := _read_line()) is not None:
        if line.strip() == "/quit":
            break
        if line.strip() == "/reset":
            messages = list(opening)
            print("(history cleared)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        ids = prompt_ids(tokenizer, messages)
        bounded = args.max_kv_size if cache is None else None  # the prompt cache has its own
        text, last, _ = _stream(stream_generate(model, tokenizer, ids, args.max_tokens, prompt_cache=cache,
                                                max_kv_size=bounded, **sampling))
        messages.append({"role": "assistant", "content": text})
        print(_stats(last, None if cache is None else len(ids) - last.prompt_tokens), file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- serve


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description="Serve a model with OpenAI-compatible /v1/chat/completions, /v1/completions "
                                   "and /v1/models endpoints until Ctrl-C (needs pip install 'mlx-zeta[serve]').")
    _model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8080, help="port to listen on (default: 8080; 0: any free one)")
    p.add_argument("--max-queue", type=_count, default=16, metavar="N",
                   help="requests waiting at most; more get 503 (default: 16)")
    p.add_argument("--max-tokens", type=_count, default=512, metavar="N",
                   help="max_tokens of a request that sets none (default: 512)")
    p.add_argument("--max-prompt-tokens", type=_count, metavar="N", help="refuse longer prompts (default: the model's max_seq_len)")
    p.add_argument("--model-id", metavar="NAME", help="the model's name in the API (default: M as given)")
    p.add_argument("--no-prompt-cache", action="store_true", help="do not reuse the KV cache across requests")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="warning",
                   help="uvicorn's log level (default: warning)")
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from mlx_zeta.lm.server import serve  # starlette and uvicorn load inside (a missing extra: one line)

    try:
        serve(args.model, args.host, args.port, max_queue=args.max_queue, max_tokens_default=args.max_tokens,
              max_prompt_tokens=args.max_prompt_tokens, model_id=args.model_id, dtype=args.dtype,
              prompt_cache=not args.no_prompt_cache, log_level=args.log_level)
    except RuntimeError as e:  # the port could not be taken: the system refused, as an OSError would
        if not str(e).startswith("[serve]"):
            raise
        raise OSError(str(e)) from e
    return 0


# The commands of this module, composed with the converter ones by mlx_zeta.cli.
COMMANDS: Sequence[Callable[[argparse._SubParsersAction], None]] = (_add_generate, _add_chat, _add_serve,
                                                                    *_TUNE_COMMANDS)
