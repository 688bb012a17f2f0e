r"""Batched generation: several prompts of different lengths decoded together, one forward pass
of the whole batch per token, each row the same as its own :func:`~mlx_zeta.lm.stream_generate`.

Rows are **left padded** to the longest prompt, so every row's newest token sits in the last
column and one step feeds one token per row. Row :math:`r` with :math:`p_r` pad positions is
masked by a key-padding mask over every position so far, ``(B, offset + n)`` (pads are never
attended to), and, for a model with learned absolute positions (``"pos_emb" in model``, e.g.
GPT-2), its tokens get their own positions :math:`t - p_r` (the ``positions`` argument of
:class:`~mlx_zeta.structs.Transformer`). Rotary, ALiBi and T5 positions depend only on position
differences, which the shift :math:`p_r` leaves unchanged. A row finishes at its own end token,
stop string or ``max_tokens``; afterwards it yields nothing (the batch keeps its shape until
every row has finished).

At ``temperature=0`` each row equals its single-prompt run token for token (log-probabilities
to float rounding: the padded matrix products sum in another order). Sampled rows draw from
one key for the whole batch, so they differ from single runs with the same seed.
"""

from __future__ import annotations

import time
from typing import Any, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.lm.cache import make_caches
from mlx_zeta.lm.generate import (PREFILL_CHUNK, GenerationResponse, Prompt, TextSteps, prompt_ids, prompt_kind,
                                  resolve_settings)
from mlx_zeta.lm.tokenizer import Tokenizer, check_tokenizer
from mlx_zeta.structs.decoding import check_token_ids, decode_steps
from mlx_zeta.structs.sampling import token_counts

__all__ = ["batch_generate", "batch_stream_generate", "left_pad"]


def left_pad(rows: Sequence[Sequence[int]], pad: int = 0) -> Tuple[mx.array, mx.array, mx.array]:
    r"""Token id rows of different lengths as one left-padded batch.

    Returns ``(ids, mask, positions)``, each :math:`(B, L)` with :math:`L` the longest row:
    ``ids`` int32 (``pad`` before each row), ``mask`` bool (True on real tokens), ``positions``
    int32 (each row's own, :math:`t - p_r` from 0 at its first real token; 0 on pads).

    Example:
        >>> from mlx_zeta.lm.batch import left_pad
        >>> ids, mask, pos = left_pad([[5, 6, 7], [8]])
        >>> ids.tolist(), mask.tolist(), pos.tolist()
        ([[5, 6, 7], [0, 0, 8]], [[True, True, True], [False, False, True]], [[0, 1, 2], [0, 0, 0]])
    """
    width = max(len(r) for r in rows)
    pads = mx.array([width - len(r) for r in rows], mx.int32)[:, None]  # (B, 1)
    ids = mx.array([[pad] * (width - len(r)) + list(r) for r in rows], mx.int32)
    col = mx.arange(width, dtype=mx.int32)[None]
    return ids, col >= pads, mx.maximum(col - pads, 0)


def _rows(tokenizer: Tokenizer, prompts: Any) -> List[List[int]]:
    """Token ids of every prompt, all of one kind (text, token ids or chat messages)."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        got = "an empty list" if isinstance(prompts, (list, tuple)) else type(prompts).__name__
        raise ValueError(f"[batch_generate] expected prompts as a non-empty list of prompts, got {got}")
    kinds = [prompt_kind(p) for p in prompts]
    if len(set(kinds)) > 1:
        raise ValueError(f"[batch_generate] expected prompts of one kind (all text, all token ids or all chat "
                         f"messages), got {sorted(set(kinds))}")
    rows = []
    for i, prompt in enumerate(prompts):
        try:
            rows.append(prompt_ids(tokenizer, prompt))
        except ValueError as err:
            raise ValueError(f"[batch_generate] prompts[{i}]: {str(err).removeprefix('[generate] ')}") from None
    return rows


def _prefill(model: nn.Module, caches: list, ids: mx.array, mask: mx.array,
             positions: Optional[mx.array]) -> mx.array:
    """The padded prompts through the model in chunks of :data:`PREFILL_CHUNK` columns, each with the
    mask over every column so far; the last column's logits (B, V)."""
    width = ids.shape[1]
    for a in range(0, width, PREFILL_CHUNK):
        b = min(a + PREFILL_CHUNK, width)
        logits = model(ids[:, a:b], cache=caches, mask=mask[:, :b], last_only=True,  # no head over the prompt
                       positions=None if positions is None else positions[:, a:b])
        if b < width:
            mx.eval([c.state for c in caches])
    return logits[:, -1]


def _batch_steps(model: nn.Module, rows: List[List[int]], s: Any, max_kv_size: Optional[int],
                 timing: dict) -> Iterator[Tuple[List[int], List[float]]]:
    """(tokens, logprobs) of every row per step: left-padded prefill, then one column per step."""
    caches = make_caches(model, max_kv_size)
    ids, mask, positions = left_pad(rows)
    absolute = "pos_emb" in model
    start = time.perf_counter()
    logits = _prefill(model, caches, ids, mask, positions if absolute else None)
    mx.eval(logits)
    timing.update(prompt_time=time.perf_counter() - start)
    grown = {"mask": mask, "next": positions[:, -1:] + 1}  # (B, offset) mask, (B, 1) next positions

    def step(tok: mx.array) -> mx.array:
        grown["mask"] = mx.concatenate([grown["mask"], mx.ones((len(rows), 1), mx.bool_)], axis=1)
        pos = grown["next"]
        grown["next"] = pos + 1
        return model(tok[:, None], cache=caches, mask=grown["mask"], positions=pos if absolute else None)[:, -1]

    counts = None
    if s.processor is not None:  # each row's own prompt tokens (not the pads)
        counts = mx.concatenate([token_counts(mx.array([r]), logits.shape[-1]) for r in rows])
    for tok, lp in decode_steps(step, logits, s.max_tokens, s.key, **s.sampling, eos=s.eos, logprobs=True,
                                processor=s.processor, counts=counts,
                                pending=lambda: [grown["mask"], *(a for c in caches for a in c.state if a is not None)]):
        yield tok.tolist(), lp.tolist()


def batch_stream_generate(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[Prompt], max_tokens: int = 256, *,
                          temperature: Optional[float] = None, top_k: Optional[int] = None,
                          top_p: Optional[float] = None, min_p: Optional[float] = None,
                          repetition_penalty: Optional[float] = None, presence_penalty: Optional[float] = None,
                          frequency_penalty: Optional[float] = None, logit_bias: Optional[Mapping[int, float]] = None,
                          seed: Optional[int] = None, stop: Union[str, Sequence[str], None] = None,
                          eos_token_ids: Union[int, Sequence[int], None] = None,
                          max_kv_size: Optional[int] = None) -> Iterator[List[Optional[GenerationResponse]]]:
    r"""Generate after every prompt at once: per step, one entry per row, a
    :class:`~mlx_zeta.lm.GenerationResponse` or ``None`` once the row has finished.

    Args:
        model, tokenizer: a causal LM and its tokenizer (from :func:`~mlx_zeta.lm.load`).
        prompts (list): :math:`B \ge 1` prompts of one kind: texts, token-id lists or chat-message lists.
        max_tokens, sampling, stop, eos_token_ids: as in :func:`~mlx_zeta.lm.stream_generate`,
            the same for every row.
        max_kv_size (int, optional): bounded caches (see :func:`~mlx_zeta.lm.make_caches`).

    A response's ``prompt_tokens`` is its row's prompt length and ``prompt_tps`` the batch's
    (all rows' prompt tokens over the prefill time); ``generation_tps`` counts that row's tokens.

    Example:
        This needs a trained checkpoint (random weights would print noise), so it is shown, not run:

        .. code-block:: python

            from mlx_zeta.lm import batch_stream_generate, load

            model, tok = load("path/to/model")
            for step in batch_stream_generate(model, tok, ["Once upon", "The capital of France is"], 20):
                print([r.text if r else None for r in step])
    """
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                   repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                   frequency_penalty=frequency_penalty, logit_bias=logit_bias, seed=seed, stop=stop,
                   eos_token_ids=eos_token_ids)
    check_tokenizer("batch_generate", tokenizer)
    if not callable(getattr(model, "make_cache", None)) or not hasattr(model, "num_tokens"):
        raise ValueError(f"[batch_generate] expected a causal LM (make_cache, num_tokens), got {type(model).__name__}")
    rows = _rows(tokenizer, prompts)
    for i, row in enumerate(rows):
        check_token_ids("batch_generate", f"prompts[{i}]", mx.array([row]), model.num_tokens)
    s = resolve_settings(model, tokenizer, model.num_tokens, max_tokens, options)
    longest = max(range(len(rows)), key=lambda i: len(rows[i]))
    if "pos_emb" in model and len(rows[longest]) + s.max_tokens - 1 > model.max_seq_len:
        raise ValueError(f"[batch_generate] expected each prompt and max_tokens={s.max_tokens} to fit the model's "
                         f"{model.max_seq_len} positions (absolute positions), got prompts[{longest}] of "
                         f"{len(rows[longest])} tokens")
    return _responses(model, tokenizer, rows, s, max_kv_size)


def _responses(model: nn.Module, tokenizer: Tokenizer, rows: List[List[int]], s: Any,
               max_kv_size: Optional[int]) -> Iterator[List[Optional[GenerationResponse]]]:
    """The generator behind :func:`batch_stream_generate` (arguments checked)."""
    mx.reset_peak_memory()
    timing: dict = {}
    texts = [TextSteps(tokenizer, s) for _ in rows]
    made = [0] * len(rows)
    first = None
    for tokens, logprobs in _batch_steps(model, rows, s, max_kv_size, timing):
        first = time.perf_counter() if first is None else first
        elapsed = time.perf_counter() - first
        out: List[Optional[GenerationResponse]] = []
        for r, (token, logprob) in enumerate(zip(tokens, logprobs)):
            if texts[r] is None:  # finished at an earlier step
                out.append(None)
                continue
            made[r] += 1
            text, finish = texts[r].push(token, made[r])
            out.append(GenerationResponse(
                text=text, token=token, logprob=logprob, finish_reason=finish, prompt_tokens=len(rows[r]),
                prompt_tps=sum(map(len, rows)) / max(timing["prompt_time"], 1e-9), generation_tokens=made[r],
                generation_tps=(made[r] - 1) / elapsed if made[r] > 1 else 0.0, peak_memory=mx.get_peak_memory() / 1e9))
            if finish:
                texts[r] = None
        yield out
        if all(t is None for t in texts):
            return


def batch_generate(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[Prompt], max_tokens: int = 256,
                   **options: Any) -> List[str]:
    """The text :func:`batch_stream_generate` produces for each prompt, in order.

    Example:
        This needs a trained checkpoint (random weights would print noise), so it is shown, not run:

        .. code-block:: python

            from mlx_zeta.lm import batch_generate, load

            model, tok = load("path/to/model")
            batch_generate(model, tok, ["Once upon", "The capital of France is"], max_tokens=20, temperature=0)
            # [' a time there was', ' Paris.']
    """
    texts = [[] for _ in prompts] if isinstance(prompts, (list, tuple)) else []
    for step in batch_stream_generate(model, tokenizer, prompts, max_tokens, **options):
        for r, response in enumerate(step):
            if response is not None:
                texts[r].append(response.text)
    return ["".join(t) for t in texts]
