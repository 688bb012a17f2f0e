"""The one token-by-token decoding loop: sampling, end tokens and the one-step-ahead schedule,
over any model given as a ``step(token) -> logits`` callable.

:class:`~mlx_zeta.structs.AutoregressiveWrapper` (decoder-only nets, with or without a KV
cache) and :meth:`mlx_zeta.models.t5.T5Model.generate` (an encoder-decoder) both decode
through :func:`decode_steps`; what differs between them is only how the next logits are made.
"""

from typing import Any, Callable, Iterator, Optional, Sequence

import mlx.core as mx

from mlx_zeta.structs.sampling import sample

__all__ = ["check_token_ids", "decode_steps", "describe", "global_key"]


def describe(x: Any) -> str:
    """'shape (..) and dtype ..' of an array, else the type name, for error messages."""
    return f"shape {tuple(x.shape)} and dtype {x.dtype}" if isinstance(x, mx.array) else type(x).__name__


def check_token_ids(owner: str, name: str, ids: Any, vocab_size: Optional[int]) -> mx.array:
    r"""Check that ``ids`` are token ids a model with ``vocab_size`` tokens can look up.

    ``ids`` must be an integer ``mx.array`` of shape :math:`(B, n)` with :math:`B, n \ge 1`,
    every id in :math:`[0, \text{vocab\_size})` (``vocab_size=None`` skips the range,
    for nets that do not say their vocabulary). An id outside it would index past the
    embedding table: MLX's gather does not check bounds, so the result is garbage or a
    crash of the process. The error names the first bad id in row-major order and its
    position, e.g. ``[AutoregressiveWrapper] expected prompt token ids in [0, 512), got
    100000 at (0, 3)``.

    This reads one number back to the host (the index of the first bad id; a synchronisation), so it
    is called by the user-facing entry points that take concrete ids (``generate`` and
    ``stream`` of :class:`~mlx_zeta.structs.AutoregressiveWrapper`,
    :class:`~mlx_zeta.structs.XTransformer`, :class:`~mlx_zeta.models.T5Model`,
    :class:`~mlx_zeta.models.PalmE`), never inside forward passes, which may run under
    ``mx.compile`` where no value can be read.

    Args:
        owner (str): the class named in brackets.
        name (str): the argument's name (``prompt``, ``input_ids``, ...).
        ids: the argument.
        vocab_size (int, optional): the number of rows of the embedding table.

    Returns:
        ``ids``.

    Raises ``ValueError`` for a non-array, a wrong rank or an empty axis, a non-integer dtype, or an id out of range.
    """
    if not isinstance(ids, mx.array) or ids.ndim != 2 or 0 in ids.shape or not mx.issubdtype(ids.dtype, mx.integer):
        raise ValueError(f"[{owner}] expected {name} as integer token ids of shape (batch, n) with batch, n >= 1, "
                         f"got {describe(ids)}")
    if vocab_size is None:
        return ids
    wide = ids.astype(mx.int64)  # compared in int64: a uint8 array would wrap the bound; huge uint64 ids turn negative
    bad = ((wide < 0) | (wide >= vocab_size)).reshape(-1)
    first = mx.where(bad, mx.arange(bad.size), bad.size).min().item()  # row-major index of the first bad id
    if first < bad.size:
        row, col = divmod(first, ids.shape[1])
        raise ValueError(f"[{owner}] expected {name} token ids in [0, {vocab_size}), got {ids[row, col].item()} "
                         f"at ({row}, {col})")
    return ids


def global_key() -> mx.array:
    """A fresh ``mx.random.key``-shaped key drawn from MLX's global random state (what the
    generators use when the caller passes ``key=None``)."""
    return mx.random.randint(0, 2**31 - 1, (2,)).astype(mx.uint32)


def decode_steps(step: Callable[[mx.array], mx.array], logits: mx.array, max_tokens: int, key: mx.array, *,
                 temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 min_p: Optional[float] = None, eos: Sequence[int] = (), pad_value: int = 0,
                 pending: Callable[[], Sequence[mx.array]] = tuple,
                 processor: Optional[Callable[[mx.array, mx.array], mx.array]] = None,
                 counts: Optional[mx.array] = None, logprobs: bool = False) -> Iterator[Any]:
    r"""Yield up to ``max_tokens`` tokens, one :math:`(B,)` int32 array per step, as they are produced.

    Each step draws :math:`y_t` = :func:`~mlx_zeta.structs.sample` ``(logits_t)`` with a fresh
    split of ``key`` (``temperature=0`` is greedy), then asks ``step(y_t)`` for the next logits.
    A row that has emitted one of the ``eos`` ids is finished: its later tokens are
    ``pad_value`` (``step`` is still fed the sampled token of such a row, always a valid id,
    so ``pad_value`` need not be one, e.g. ``-1``). The loop ends after ``max_tokens`` tokens, or right after the token that
    finishes the last row (callers that want a fixed length pad the rest themselves).

    With a ``processor`` (e.g. :func:`~mlx_zeta.structs.sampling.penalize` bound to its settings),
    each step's logits become ``processor(logits, counts)`` before the draw, where ``counts``
    :math:`(B, V)` counts the tokens of the context so far (start from the prompt's,
    :func:`~mlx_zeta.structs.sampling.token_counts`; each drawn token is added).

    The next step is built and scheduled with ``mx.async_eval`` before the current token is
    handed out, so the model runs while the caller consumes the token.

    Args:
        step (callable): the chosen tokens :math:`(B,)` -> next-token logits :math:`(B, V)`
            (it feeds the token to the model, e.g. through a KV cache).
        logits (array): the first step's logits :math:`(B, V)` (e.g. from a prefill).
        max_tokens (int): most tokens to produce, ``>= 1``.
        key (array): ``mx.random.key`` for the draws.
        temperature, top_k, top_p, min_p: see :func:`~mlx_zeta.structs.sample`. Default: ``1.0``, off.
        eos (Sequence[int]): end-token ids. Default: none (always ``max_tokens`` tokens).
        pad_value (int): token of finished rows. Default: ``0``.
        pending (callable): arrays the model updated in ``step`` (cache contents, grown masks),
            evaluated with each step's token. Default: none.
        processor (callable, optional): ``(logits, counts) -> logits`` before each draw. Default: none.
        counts (array, optional): the context's token counts :math:`(B, V)` int32 for ``processor``.
            Default: zeros.
        logprobs (bool): yield ``(tokens, logprobs)`` pairs, the second :math:`(B,)` float32:
            :math:`\log \text{softmax}(\tilde{\ell})_{y}` of each drawn token under the processed,
            temperature-1 logits. Default: ``False``.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.structs import decode_steps
        >>> table = mx.eye(4)  # a "model" whose next token is the last one plus 1
        >>> toks = decode_steps(lambda t: table[(t + 1) % 4], table[None, 1], 3, mx.random.key(0), temperature=0)
        >>> [t.item() for t in toks]
        [1, 2, 3]
    """
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    ends = mx.array(list(eos), mx.int32) if len(eos) else None
    rows = mx.arange(logits.shape[0])
    if processor is not None and counts is None:
        counts = mx.zeros(logits.shape, mx.int32)

    def pick(logits, key, done, counts):
        key, sub = mx.random.split(key)
        if processor is not None:
            logits = processor(logits, counts)
        drawn = sample(logits, key=sub, **sampling)  # (B,), what the model is fed next
        if processor is not None:
            counts = counts.at[rows, drawn].add(1)
        tok = drawn  # what the caller gets
        if done is not None:
            tok = mx.where(done, pad_value, drawn).astype(mx.int32)
            done = done | (tok[:, None] == ends).any(axis=-1)
        lp = None
        if logprobs:
            wide = logits.astype(mx.float32)
            lp = mx.take_along_axis(wide, drawn[:, None], axis=-1)[:, 0] - mx.logsumexp(wide, axis=-1)
        return dict(drawn=drawn, tok=tok, key=key, done=done, counts=counts, lp=lp)

    def schedule(state):
        extra = [state[k] for k in ("done", "counts", "lp") if state[k] is not None]
        mx.async_eval(state["tok"], state["key"], *extra, *pending())

    cur = pick(logits, key, None if ends is None else mx.zeros((logits.shape[0],), mx.bool_), counts)
    schedule(cur)
    for i in range(max_tokens):
        if i + 1 < max_tokens:  # build and schedule step i + 1 while step i's token is handed out
            nxt = pick(step(cur["drawn"]), cur["key"], cur["done"], cur["counts"])
            schedule(nxt)
        yield (cur["tok"], cur["lp"]) if logprobs else cur["tok"]
        if cur["done"] is not None and cur["done"].all().item():  # every row ended
            return
        if i + 1 < max_tokens:
            cur = nxt
