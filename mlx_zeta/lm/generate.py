"""Text in, text out: :func:`load` a checkpoint with its tokenizer, :func:`generate` text or
:func:`stream_generate` it piece by piece.

Every causal LM the converters read (Llama, Mistral, Qwen2/3, GPT-2, BitNet: a
:class:`~mlx_zeta.structs.Transformer`) and T5 (:class:`~mlx_zeta.models.T5Model`, the prompt
goes to the encoder) decode through the one loop,
:func:`~mlx_zeta.structs.decoding.decode_steps`. Sampling settings left at ``None`` come from
the checkpoint's ``generation_config.json``: greedy unless it says ``do_sample: true`` (then
its ``temperature``, ``top_k``, ``top_p``, ``min_p``), its ``repetition_penalty``, and its
``eos_token_id`` (an id or a list) together with the tokenizer's end token.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from itertools import islice
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.common import check_int
from mlx_zeta.converters.pretrained import from_pretrained
from mlx_zeta.models.t5 import T5Model
from mlx_zeta.structs.decoding import check_token_ids, decode_steps, global_key
from mlx_zeta.structs.sampling import check_penalties, check_sampling_args, penalize, token_counts

from .adapters_hf import load_any_adapters
from .cache import PromptCache, fill_caches
from .speculative import SpeculativeStats, check_draft_model, speculative_steps
from .tokenizer import Tokenizer, check_tokenizer, load_tokenizer

__all__ = ["GenerationResponse", "generate", "generation_defaults", "load", "prompt_ids", "stream_generate"]

Prompt = Union[str, Sequence[int], Sequence[Mapping[str, Any]]]
PREFILL_CHUNK = 512  # prompt positions per forward pass (bounds the attention scores' memory)
_SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


@dataclass(frozen=True)
class GenerationResponse:
    """One step of :func:`stream_generate`.

    Attributes:
        text: the new text of this step (``""`` while a character is incomplete or a possible stop
            string is held back; the pieces concatenate to the whole answer).
        token: the token id drawn. logprob: its log-probability under the (penalised) model distribution.
        from_draft: whether a draft model proposed it (speculative decoding).
        finish_reason: ``None``; on the last step ``"stop"`` (an end token or a stop string) or ``"length"``.
        prompt_tokens, prompt_tps: prompt tokens run through the model (a prompt cache's reused prefix not
            counted) and their rate. generation_tokens, generation_tps: tokens so far and their rate.
        peak_memory: MLX's peak memory in GB since the call began.
    """

    text: str
    token: int
    logprob: float
    finish_reason: Optional[str]
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    from_draft: bool = False


def load(path_or_repo: str, dtype: Any = None, *, adapter_path: Optional[Union[str, Path]] = None,
         revision: Optional[str] = None, allow_nonfinite: bool = False) -> Tuple[nn.Module, Tokenizer]:
    """A checkpoint (folder or Hub repo id) as ``(model, tokenizer)``: the model through
    :func:`~mlx_zeta.from_pretrained` (``dtype``, ``revision``, ``allow_nonfinite`` as there), the
    tokenizer from the same folder (:func:`~mlx_zeta.lm.tokenizer.load_tokenizer`). ``adapter_path``:
    a folder of LoRA/DoRA adapters applied to the model, ours (``save_adapters``, ``mlx-zeta lora``)
    or PEFT's (``adapter_model.safetensors``), told apart by its ``adapter_config.json``
    (:func:`~mlx_zeta.lm.adapters_hf.load_any_adapters`)."""
    model = from_pretrained(path_or_repo, dtype=dtype, revision=revision, allow_nonfinite=allow_nonfinite)
    if adapter_path is not None:
        load_any_adapters(model, adapter_path)
    return model, load_tokenizer(model.pretrained.source)


def generation_defaults(model: nn.Module, tokenizer: Optional[Tokenizer] = None) -> Dict[str, Any]:
    """The sampling defaults of ``model``'s checkpoint (see the module docstring) and ``eos_token_ids``."""
    info = getattr(model, "pretrained", None)
    source = getattr(info, "source", None)
    file = None if source is None else source / "generation_config.json"
    config: Dict[str, Any] = {}
    if file is not None and file.is_file():
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"[generate] {file} is not valid JSON ({e})") from e
        if not isinstance(config, dict):
            raise ValueError(f"[generate] expected {file} to hold a JSON object, got {type(config).__name__}")
    out: Dict[str, Any] = {"temperature": 0.0}
    if config.get("do_sample") is True:
        out.update({k: config[k] for k in ("temperature", "top_k", "top_p", "min_p") if config.get(k) is not None})
    if config.get("repetition_penalty") not in (None, 1, 1.0):
        out["repetition_penalty"] = config["repetition_penalty"]
    eos: List[int] = []
    for where in (config.get("eos_token_id"), getattr(info, "config", {}).get("eos_token_id") if info else None):
        eos += [where] if isinstance(where, int) else [e for e in where or () if isinstance(e, int)]
    eos += list(tokenizer.eos_token_ids) if tokenizer is not None else []
    out["eos_token_ids"] = tuple(dict.fromkeys(eos))
    return out


def prompt_kind(prompt: Any) -> str:
    """What a prompt is: ``"text"``, ``"chat messages"``, ``"token ids"`` (any other list or tuple),
    else its type's name."""
    if isinstance(prompt, str):
        return "text"
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, Mapping) for m in prompt):
        return "chat messages"
    return "token ids" if isinstance(prompt, (list, tuple)) else type(prompt).__name__


def prompt_ids(tokenizer: Tokenizer, prompt: Prompt) -> List[int]:
    """Token ids of a prompt: text (encoded with the tokenizer's special tokens, e.g. BOS), chat
    messages (rendered with the chat template, ``add_generation_prompt=True``), or ids as they are."""
    kind = prompt_kind(prompt)
    if kind == "text":
        ids = tokenizer.encode(prompt)
    elif kind == "chat messages":
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    elif kind == "token ids" and all(isinstance(t, Integral) and not isinstance(t, bool) for t in prompt):
        ids = [int(t) for t in prompt]  # numpy integers too
    else:
        raise ValueError(f"[generate] expected prompt as text, a list of token ids or a list of chat messages, "
                         f"got {type(prompt).__name__}")
    if not ids:
        raise ValueError("[generate] expected a prompt of at least one token, got an empty one")
    return ids


@dataclass
class _Settings:
    """Checked generation settings, defaults filled in."""

    max_tokens: int
    sampling: Dict[str, Any]
    eos: Tuple[int, ...]
    stop: Tuple[str, ...]
    key: mx.array
    processor: Any


def _bias(logit_bias: Any, vocab: int) -> Optional[mx.array]:
    if logit_bias is None:
        return None
    if not isinstance(logit_bias, Mapping):
        raise ValueError(f"[generate] expected logit_bias as a dict {{token id: bias}}, got {type(logit_bias).__name__}")
    dense = [0.0] * vocab
    for tok, value in logit_bias.items():
        tok = int(tok) if isinstance(tok, str) and tok.isdigit() else tok
        if not isinstance(tok, int) or not 0 <= tok < vocab:
            raise ValueError(f"[generate] expected logit_bias keys to be token ids in [0, {vocab}), got {tok!r}")
        if not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"[generate] expected logit_bias values to be finite numbers, got {value!r} for {tok}")
        dense[tok] = float(value)
    return mx.array(dense)


def _stops(stop: Any) -> Tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"[generate] expected stop as a non-empty string or a list of them, got {stop!r}")
    return stops


def resolve_settings(model: nn.Module, tokenizer: Tokenizer, vocab: int, max_tokens: Any,
                     options: Dict[str, Any]) -> _Settings:
    """The checked settings of one call: ``options`` (``None``: the checkpoint's default), eos ids,
    stop strings, the key of the draws and the logits processor (penalties, bias), if any."""
    check_int("generate", "max_tokens", max_tokens, 1)
    defaults = generation_defaults(model, tokenizer)
    sampling = {k: defaults.get(k) if options.get(k) is None else options[k] for k in _SAMPLING}
    check_sampling_args("generate", sampling["temperature"], sampling["top_k"], sampling["top_p"], sampling["min_p"],
                        None)
    repetition = sampling.pop("repetition_penalty")
    presence, frequency = options.get("presence_penalty"), options.get("frequency_penalty")
    check_penalties("generate", repetition, presence, frequency)
    bias = _bias(options.get("logit_bias"), vocab)
    eos = options.get("eos_token_ids")
    if eos is None:  # the checkpoint's: an id the model cannot produce cannot end anything
        eos = tuple(e for e in defaults["eos_token_ids"] if 0 <= e < vocab)
    else:
        eos = (eos,) if isinstance(eos, int) else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        for e in eos:
            check_int("generate", "eos_token_ids", e, 0, vocab - 1,
                      says=f"expected eos_token_ids to be token ids in [0, {vocab}) (an int or a list)")
    seed = options.get("seed")
    check_int("generate", "seed", seed, 0, optional=True)
    processor = None
    if repetition not in (None, 1, 1.0) or presence or frequency or bias is not None:
        def processor(logits, counts):
            return penalize(logits, counts, repetition, presence, frequency, bias)
    key = mx.random.key(seed) if seed is not None else global_key()
    return _Settings(max_tokens, sampling, eos, _stops(options.get("stop")), key, processor)


class _StopScan:
    """Cuts the text at the first stop string, holding back a tail that may begin one."""

    def __init__(self, stops: Tuple[str, ...]):
        self.stops, self.held = stops, ""

    def push(self, piece: str) -> Tuple[str, bool]:
        text = self.held + piece
        hits = [text.find(s) for s in self.stops if s in text]
        if hits:
            self.held = ""
            return text[:min(hits)], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


class TextSteps:
    """The text of one generated sequence, token by token: streaming detokenization, end tokens
    (left out of the text) and stop strings (the text is cut before the first)."""

    def __init__(self, tokenizer: Tokenizer, s: _Settings):
        self.detok, self.scan, self.s = tokenizer.detokenizer(), _StopScan(s.stop), s

    def push(self, token: int, n: int) -> Tuple[str, Optional[str]]:
        """The new text after the ``n``-th token (from 1) and the finish reason (None, "stop", "length")."""
        end = token in self.s.eos
        piece = "" if end else self.detok.add(token)
        finish = "stop" if end else ("length" if n == self.s.max_tokens else None)
        if finish:
            piece += self.detok.flush()
        text, stopped = self.scan.push(piece)
        if stopped:
            finish = "stop"
        elif finish:
            text += self.scan.flush()
        return text, finish


def _prefill(model: nn.Module, caches: list, ids: List[int]) -> mx.array:
    """Run ``ids`` through the model; the last position's logits (1, V). All but the last id fill the
    caches (:func:`~mlx_zeta.lm.cache.fill_caches`, :data:`PREFILL_CHUNK` at a time); the last id goes
    alone, as a decoding step."""
    if len(ids) > 1:
        fill_caches(model, caches, mx.array([ids[:-1]]), PREFILL_CHUNK)
    return model(mx.array([ids[-1:]]), cache=caches)[:, -1]


def _causal_steps(model: nn.Module, ids: List[int], s: _Settings, cache: PromptCache, timing: Dict[str, float],
                  draft: Optional[nn.Module] = None, num_draft_tokens: int = 3) -> Iterator[Tuple[int, float, bool]]:
    """(token, logprob, from_draft) of a causal LM, prefilling what ``cache`` does not hold."""
    todo = cache.reuse(ids)
    limit = getattr(model, "max_seq_len", None)
    if "pos_emb" in model and len(ids) + s.max_tokens - 1 > limit:
        raise ValueError(f"[generate] the prompt ({len(ids)} tokens) and max_tokens={s.max_tokens} need "
                         f"{len(ids) + s.max_tokens - 1} positions, but the model has {limit} (absolute positions)")
    if draft is not None:
        yield from _speculative(model, draft, num_draft_tokens, ids, s, cache, timing)
        return
    start = time.perf_counter()
    logits = _prefill(model, cache.caches, todo)
    mx.eval(logits)
    timing.update(prompt_tokens=len(todo), prompt_time=time.perf_counter() - start)
    made: List[int] = []

    def step(tok: mx.array) -> mx.array:
        return model(tok[:, None], cache=cache.caches)[:, -1]

    counts = token_counts(mx.array([ids]), logits.shape[-1]) if s.processor else None
    try:
        # no pending=: each step's logits depend on every layer's cache update, so evaluating the token
        # evaluates the caches (slicing their states each step only added 2 ops per layer)
        for tok, lp in decode_steps(step, logits, s.max_tokens, s.key, **s.sampling, eos=s.eos, logprobs=True,
                                    processor=s.processor, counts=counts):
            made.append(tok.item())
            yield made[-1], lp.item(), False
    finally:
        cache.tokens = (ids + made)[:cache.offset]


def _speculative(model: nn.Module, draft: nn.Module, num_draft_tokens: int, ids: List[int], s: _Settings,
                 cache: PromptCache, timing: Dict[str, float]) -> Iterator[Tuple[int, float, bool]]:
    """(token, logprob, from_draft) through :func:`~mlx_zeta.lm.speculative.speculative_steps`, which
    prefills what ``cache`` does not hold; the draft's caches start empty at every call."""
    stats = SpeculativeStats()
    counts = token_counts(mx.array([ids]), model.num_tokens) if s.processor else None
    steps = speculative_steps(model, draft, mx.array([ids]), cache.caches, draft.make_cache(), s.max_tokens, s.key,
                              num_draft_tokens=num_draft_tokens, **s.sampling, processor=s.processor, counts=counts,
                              eos=s.eos, stats=stats, prefill_step=PREFILL_CHUNK)
    made: List[int] = []
    try:
        for tok, lp, from_draft in steps:
            timing.update(prompt_tokens=stats.prompt_tokens, prompt_time=stats.prompt_time)
            made.append(tok)
            yield tok, lp, from_draft
    finally:
        steps.close()  # its caches forget what was never handed out
        cache.tokens = (ids + made)[:cache.offset]


def _seq2seq_steps(model: T5Model, ids: List[int], s: _Settings,
                   timing: Dict[str, float]) -> Iterator[Tuple[int, float, bool]]:
    """(token, logprob, from_draft) of T5: the prompt is the encoder's input."""
    counts = token_counts(mx.array([[model.start_token]]), model.shared.weight.shape[0]) if s.processor else None
    start = time.perf_counter()
    steps = model.stream(mx.array([ids]), s.max_tokens, eos_token_id=list(s.eos), stop_at_eos=bool(s.eos),
                         key=s.key, **s.sampling, processor=s.processor, counts=counts, logprobs=True)
    first = [(tok.item(), lp.item()) for tok, lp in islice(steps, 1)]  # MLX is lazy: the encoder runs here
    timing.update(prompt_tokens=len(ids), prompt_time=time.perf_counter() - start)
    for tok, lp in first:
        yield tok, lp, False
    for tok, lp in steps:
        yield tok.item(), lp.item(), False


def stream_generate(model: nn.Module, tokenizer: Tokenizer, prompt: Prompt, max_tokens: int = 256, *,
                    temperature: Optional[float] = None, top_k: Optional[int] = None, top_p: Optional[float] = None,
                    min_p: Optional[float] = None, repetition_penalty: Optional[float] = None,
                    presence_penalty: Optional[float] = None, frequency_penalty: Optional[float] = None,
                    logit_bias: Optional[Mapping[int, float]] = None, seed: Optional[int] = None,
                    stop: Union[str, Sequence[str], None] = None, eos_token_ids: Union[int, Sequence[int], None] = None,
                    prompt_cache: Optional[PromptCache] = None, max_kv_size: Optional[int] = None,
                    draft_model: Optional[nn.Module] = None, num_draft_tokens: int = 3) -> Iterator[GenerationResponse]:
    r"""Generate text after ``prompt``, one :class:`GenerationResponse` per token.

    Args:
        model, tokenizer: from :func:`load`.
        prompt: text (used as it is, with the tokenizer's special tokens), a list of token ids, or
            chat messages ``[{"role": ..., "content": ...}]`` rendered with the checkpoint's chat template.
        max_tokens (int): most tokens to generate. Default: ``256``.
        temperature, top_k, top_p, min_p: see :func:`~mlx_zeta.structs.sample` (``temperature=0``:
            greedy). repetition_penalty, presence_penalty, frequency_penalty, logit_bias ({id: bias}):
            see :func:`~mlx_zeta.structs.sampling.penalize`. ``None``: the checkpoint's defaults.
        seed (int, optional): seed of the draws (``None``: MLX's global random state).
        stop: strings that end the text (left out of it). eos_token_ids: end tokens (default: the
            checkpoint's and the tokenizer's).
        prompt_cache (PromptCache, optional): caches to reuse and leave filled (causal LMs).
        max_kv_size (int, optional): keep at most this many positions per layer (without a prompt_cache).
        draft_model, num_draft_tokens: speculative decoding with a smaller model of the same tokenizer.

    The text pieces concatenate to ``tokenizer.decode`` of the generated tokens (end token left out),
    cut before the first stop string.
    """
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                   repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                   frequency_penalty=frequency_penalty, logit_bias=logit_bias, seed=seed, stop=stop,
                   eos_token_ids=eos_token_ids)
    check_tokenizer("generate", tokenizer)
    ids = prompt_ids(tokenizer, prompt)
    seq2seq = isinstance(model, T5Model)
    if not seq2seq and not callable(getattr(model, "make_cache", None)):
        raise ValueError(f"[generate] expected a causal LM or T5 model, got {type(model).__name__}")
    vocab = model.shared.weight.shape[0] if seq2seq else model.num_tokens
    check_token_ids("generate", "prompt", mx.array([ids]), vocab)
    s = resolve_settings(model, tokenizer, vocab, max_tokens, options)
    if seq2seq and (prompt_cache is not None or draft_model is not None or max_kv_size is not None):
        raise ValueError("[generate] expected no prompt_cache, max_kv_size or draft_model with a T5 (seq2seq) model")
    if prompt_cache is not None and not isinstance(prompt_cache, PromptCache):
        raise ValueError(f"[generate] expected prompt_cache to be a PromptCache, got {type(prompt_cache).__name__}")
    if draft_model is not None:
        check_draft_model("generate", model, draft_model, num_draft_tokens)
    draft = (draft_model, num_draft_tokens) if draft_model is not None else ()
    return _responses(model, tokenizer, ids, s, prompt_cache, max_kv_size, seq2seq, draft)


def _responses(model, tokenizer, ids, s, prompt_cache, max_kv_size, seq2seq, draft=()) -> Iterator[GenerationResponse]:
    """The generator behind :func:`stream_generate` (arguments checked)."""
    mx.reset_peak_memory()
    timing: Dict[str, float] = {}
    if seq2seq:
        steps = _seq2seq_steps(model, ids, s, timing)
    else:
        steps = _causal_steps(model, ids, s, prompt_cache or PromptCache(model, max_kv_size), timing, *draft)
    row = TextSteps(tokenizer, s)
    first = None
    for n, (token, logprob, from_draft) in enumerate(steps, 1):
        if first is None:
            first = time.perf_counter()
        text, finish = row.push(token, n)
        elapsed = time.perf_counter() - first
        yield GenerationResponse(
            text=text, token=token, logprob=logprob, finish_reason=finish, from_draft=from_draft,
            prompt_tokens=int(timing["prompt_tokens"]),
            prompt_tps=timing["prompt_tokens"] / max(timing["prompt_time"], 1e-9),
            generation_tokens=n, generation_tps=(n - 1) / elapsed if n > 1 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9)
        if finish:
            return


def generate(model: nn.Module, tokenizer: Tokenizer, prompt: Prompt, max_tokens: int = 256, *,
             verbose: bool = False, **options: Any) -> str:
    """The text :func:`stream_generate` produces, as one string. ``verbose`` prints it as it
    comes and the speeds at the end."""
    pieces = []
    last = None
    for last in stream_generate(model, tokenizer, prompt, max_tokens, **options):
        pieces.append(last.text)
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print(f"\nprompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s; generation: "
              f"{last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s; peak memory {last.peak_memory:.2f} GB")
    return "".join(pieces)
