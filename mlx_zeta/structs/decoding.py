"""The one token-by-token decoding loop: sampling, end tokens and the one-step-ahead schedule,
over any model given as a ``step(token) -> logits`` callable.

:class:`~mlx_zeta.structs.AutoregressiveWrapper` (decoder-only nets, with or without a KV
cache) and :meth:`mlx_zeta.models.t5.T5Model.generate` (an encoder-decoder) both decode
through :func:`decode_steps`; what differs between them is only how the next logits are made.
"""

from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx

from mlx_zeta.structs.sampling import sample

__all__ = ["decode_steps", "global_key"]


def global_key() -> mx.array:
    """A fresh ``mx.random.key``-shaped key drawn from MLX's global random state (what the
    generators use when the caller passes ``key=None``)."""
    return mx.random.randint(0, 2**31 - 1, (2,)).astype(mx.uint32)


def decode_steps(step: Callable[[mx.array], mx.array], logits: mx.array, max_tokens: int, key: mx.array, *,
                 temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 min_p: Optional[float] = None, eos: Sequence[int] = (), pad_value: int = 0,
                 pending: Callable[[], Sequence[mx.array]] = tuple) -> Iterator[mx.array]:
    r"""Yield up to ``max_tokens`` tokens, one :math:`(B,)` int32 array per step, as they are produced.

    Each step draws :math:`y_t` = :func:`~mlx_zeta.structs.sample` ``(logits_t)`` with a fresh
    split of ``key`` (``temperature=0`` is greedy), then asks ``step(y_t)`` for the next logits.
    A row that has emitted one of the ``eos`` ids is finished: its later tokens are
    ``pad_value``. The loop ends after ``max_tokens`` tokens, or right after the token that
    finishes the last row (callers that want a fixed length pad the rest themselves).

    The next step is built and scheduled with ``mx.async_eval`` before the current token is
    handed out, so the model runs while the caller consumes the token.

    Args:
        step (callable): the chosen tokens :math:`(B,)` -> next-token logits :math:`(B, V)`
            (it feeds the token to the model, e.g. through a KV cache).
        logits (array): the first step's logits :math:`(B, V)` (e.g. from a prefill).
        max_tokens (int): most tokens to produce, ``>= 1``.
        key (array): ``mx.random.key`` for the draws.
        temperature, top_k, top_p, min_p: see :func:`~mlx_zeta.structs.sample`. Default: ``1.0``, off.
        eos (sequence of int): end-token ids. Default: none (always ``max_tokens`` tokens).
        pad_value (int): token of finished rows. Default: ``0``.
        pending (callable): arrays the model updated in ``step`` (cache contents, grown masks),
            evaluated with each step's token. Default: none.

    Example:
        >>> table = mx.eye(4)  # a "model" whose next token is the last one plus 1
        >>> toks = decode_steps(lambda t: table[(t + 1) % 4], table[None, 1], 3, mx.random.key(0), temperature=0)
        >>> [t.item() for t in toks]
        [1, 2, 3]
    """
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    ends = mx.array(list(eos), mx.int32) if len(eos) else None

    def pick(logits, key, done):
        key, sub = mx.random.split(key)
        tok = sample(logits, key=sub, **sampling)  # (B,)
        if done is not None:
            tok = mx.where(done, pad_value, tok).astype(mx.int32)
            done = done | (tok[:, None] == ends).any(axis=-1)
        return tok, key, done

    done = None if ends is None else mx.zeros((logits.shape[0],), mx.bool_)
    tok, key, done = pick(logits, key, done)
    mx.async_eval(tok, key, *([] if done is None else [done]), *pending())
    for i in range(max_tokens):
        if i + 1 < max_tokens:  # build and schedule step i + 1 while step i's token is handed out
            nxt, key, nxt_done = pick(step(tok), key, done)
            mx.async_eval(nxt, key, *([] if nxt_done is None else [nxt_done]), *pending())
        yield tok
        if done is not None and done.all().item():  # every row ended
            return
        if i + 1 < max_tokens:
            tok, done = nxt, nxt_done
