"""Sampling the next token from logits: top-k, nucleus (top-p) and min-p filters, temperature
sampling, and the penalties that depend on the tokens seen so far (repetition, presence,
frequency) and a logit bias. Pure functions on ``(batch, vocab)`` logits."""

import math
from numbers import Real
from typing import Any, Optional

import mlx.core as mx

from mlx_zeta.common import check_int

__all__ = ["top_k_filter", "top_p_filter", "min_p_filter", "sample", "token_counts", "penalize", "check_penalties"]


def _check_logits(owner: str, logits: Any) -> None:
    if not isinstance(logits, mx.array) or logits.ndim != 2 or not mx.issubdtype(logits.dtype, mx.floating):
        got = (f"shape {tuple(logits.shape)} and dtype {logits.dtype}" if isinstance(logits, mx.array)
               else type(logits).__name__)
        raise ValueError(f"[{owner}] expected floating logits of shape (batch, vocab), got {got}")


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_p(owner: str, p: Any) -> None:
    if not _is_real(p) or not 0.0 < p <= 1.0:
        raise ValueError(f"[{owner}] expected top_p to be a number with 0 < top_p <= 1, got {p!r}")


def _check_min_p(owner: str, min_p: Any) -> None:
    if not _is_real(min_p) or not 0.0 <= min_p <= 1.0:
        raise ValueError(f"[{owner}] expected min_p to be a number with 0 <= min_p <= 1, got {min_p!r}")


def _check_temperature(owner: str, temperature: Any) -> None:
    if not _is_real(temperature) or temperature < 0:
        raise ValueError(f"[{owner}] expected temperature to be a number >= 0 (0 = greedy), got {temperature!r}")


def _check_key(owner: str, key: Any) -> None:
    if key is not None and (not isinstance(key, mx.array) or key.shape != (2,) or key.dtype != mx.uint32):
        got = f"shape {tuple(key.shape)} and dtype {key.dtype}" if isinstance(key, mx.array) else type(key).__name__
        raise ValueError(f"[{owner}] expected key to be None or a key from mx.random.key (shape (2,), uint32), "
                         f"got {got}")


def check_sampling_args(owner: str, temperature: Any, top_k: Any, top_p: Any, min_p: Any, key: Any) -> None:
    """Validate :func:`sample`'s arguments (``None`` disables a filter), naming ``owner`` in errors."""
    _check_temperature(owner, temperature)
    if top_k is not None:
        check_int(owner, "top_k", top_k, 1)
    if top_p is not None:
        _check_p(owner, top_p)
    if min_p is not None:
        _check_min_p(owner, min_p)
    _check_key(owner, key)


def top_k_filter(logits: mx.array, k: int) -> mx.array:
    r"""Keep the ``k`` largest logits of each row; set the others to :math:`-\infty`.

    .. math::

        \tilde{\ell}_i = \begin{cases} \ell_i & \ell_i \ge \ell_{(k)} \\ -\infty & \text{otherwise} \end{cases}

    with :math:`\ell_{(k)}` the k-th largest logit of the row. Ties with :math:`\ell_{(k)}`
    are all kept (so a row may keep more than ``k``), which makes the result
    independent of the order of tied tokens. ``k >= vocab`` keeps everything.

    Args:
        logits (array): next-token logits.
        k (int): tokens to keep per row, ``>= 1``.

    Shape:
        - logits, output: :math:`(B, V)`, same dtype.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.structs import top_k_filter
        >>> top_k_filter(mx.array([[1.0, 3.0, 2.0, 5.0]]), 2)
        array([[-inf, 3, -inf, 5]], dtype=float32)

    Reference: Fan et al., "Hierarchical Neural Story Generation", https://arxiv.org/abs/1805.04833.
    """
    _check_logits("top_k_filter", logits)
    check_int("top_k_filter", "top_k", k, 1)
    if k >= logits.shape[-1]:
        return logits
    kth = mx.topk(logits, k, axis=-1).min(axis=-1, keepdims=True)  # (B, 1)
    return mx.where(logits >= kth, logits, -mx.inf)


def top_p_filter(logits: mx.array, p: float) -> mx.array:
    r"""Nucleus filtering: keep the smallest set of most likely tokens whose probability mass reaches ``p``.

    With the row's probabilities :math:`\pi = \text{softmax}(\ell)` sorted in decreasing
    order, :math:`\pi_{(1)} \ge \pi_{(2)} \ge \dots`, the kept count is

    .. math::

        m = \min\Big\{ j : \sum_{i \le j} \pi_{(i)} \ge p \Big\},

    and every token with :math:`\pi_i \ge \pi_{(m)}` is kept (ties with the last kept
    probability are all kept); the others become :math:`-\infty`. The most likely token
    is always kept, and ``p = 1`` keeps everything. Probabilities are computed in float32.

    Args:
        logits (array): next-token logits.
        p (float): probability mass, ``0 < p <= 1``.

    Shape:
        - logits, output: :math:`(B, V)`, same dtype.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.structs import top_p_filter
        >>> top_p_filter(mx.log(mx.array([[0.5, 0.2, 0.3]])), 0.7)  # 0.5 + 0.3 reaches 0.7
        array([[-0.693147, -inf, -1.20397]], dtype=float32)

    Reference: Holtzman et al., "The Curious Case of Neural Text Degeneration",
    https://arxiv.org/abs/1904.09751.
    """
    _check_logits("top_p_filter", logits)
    _check_p("top_p_filter", p)
    if p >= 1.0:
        return logits
    x = logits.astype(mx.float32)
    desc = mx.sort(x, axis=-1)[:, ::-1]  # (B, V), largest first
    before = mx.cumsum(mx.softmax(desc, axis=-1), axis=-1, inclusive=False)  # mass strictly before each token
    count = (before < p).sum(axis=-1, keepdims=True)  # (B, 1), >= 1 since before[:, 0] = 0
    last = mx.take_along_axis(desc, count - 1, axis=-1)  # (B, 1), smallest kept logit
    return mx.where(x >= last, logits, -mx.inf)


def min_p_filter(logits: mx.array, min_p: float) -> mx.array:
    r"""Keep the tokens at least ``min_p`` times as likely as the most likely one.

    .. math::

        \pi_i \ge p_{\min} \max_j \pi_j \iff \ell_i \ge \max_j \ell_j + \log p_{\min},

    computed on the logits (no softmax); the others become :math:`-\infty`. ``min_p = 0``
    keeps everything, ``min_p = 1`` only the (tied) most likely tokens.

    Args:
        logits (array): next-token logits.
        min_p (float): relative probability threshold, ``0 <= min_p <= 1``.

    Shape:
        - logits, output: :math:`(B, V)`, same dtype.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.structs import min_p_filter
        >>> min_p_filter(mx.log(mx.array([[0.5, 0.2, 0.3]])), 0.5)  # keep pi >= 0.25
        array([[-0.693147, -inf, -1.20397]], dtype=float32)

    Reference: Nguyen et al., "Turning Up the Heat: Min-p Sampling for Creative and Coherent
    LLM Outputs", https://arxiv.org/abs/2407.01082.
    """
    _check_logits("min_p_filter", logits)
    _check_min_p("min_p_filter", min_p)
    if min_p == 0:
        return logits
    threshold = logits.max(axis=-1, keepdims=True) + math.log(min_p)  # (B, 1)
    return mx.where(logits >= threshold, logits, -mx.inf)


def sample(logits: mx.array, temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
           min_p: Optional[float] = None, key: Optional[mx.array] = None) -> mx.array:
    r"""Draw one token per row: filters, then a categorical draw at ``temperature``.

    The enabled filters run in the order :func:`top_k_filter`, :func:`top_p_filter`
    (on the distribution renormalised over what top-k kept), :func:`min_p_filter`, all on
    the temperature-1 logits; then

    .. math::

        y \sim \text{Categorical}\big(\text{softmax}(\tilde{\ell} / T)\big),

    drawn in float32. ``temperature = 0`` is greedy decoding, :math:`y = \arg\max_i \ell_i`
    (the filters never remove the argmax, so they do not matter there).

    Args:
        logits (array): next-token logits.
        temperature (float): :math:`T \ge 0`. Default: ``1.0``.
        top_k (int, optional): see :func:`top_k_filter`. Default: ``None`` (off).
        top_p (float, optional): see :func:`top_p_filter`. Default: ``None`` (off).
        min_p (float, optional): see :func:`min_p_filter`. Default: ``None`` (off).
        key (array, optional): ``mx.random.key``; ``None`` uses MLX's global random state.

    Shape:
        - logits: :math:`(B, V)`; output: :math:`(B,)` int32 token ids.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.structs import sample
        >>> sample(mx.array([[0.0, 2.0, 1.0]]), temperature=0)
        array([1], dtype=int32)
    """
    _check_logits("sample", logits)
    check_sampling_args("sample", temperature, top_k, top_p, min_p, key)
    if temperature == 0:
        return mx.argmax(logits, axis=-1).astype(mx.int32)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    if min_p is not None:
        logits = min_p_filter(logits, min_p)
    scaled = logits.astype(mx.float32) * (1.0 / temperature)
    return mx.random.categorical(scaled, axis=-1, key=key).astype(mx.int32)


def token_counts(tokens: mx.array, vocab_size: int) -> mx.array:
    r"""How often each token id occurs in each row: :math:`c_{b,v} = |\{t : x_{b,t} = v\}|`.

    Shape:
        - tokens: :math:`(B, n)` integer ids in :math:`[0, V)`; output: :math:`(B, V)` int32.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.structs.sampling import token_counts
        >>> token_counts(mx.array([[1, 3, 1]]), 4)
        array([[0, 2, 0, 1]], dtype=int32)
    """
    rows = mx.broadcast_to(mx.arange(tokens.shape[0])[:, None], tokens.shape)
    return mx.zeros((tokens.shape[0], vocab_size), mx.int32).at[rows, tokens].add(1)


def check_penalties(owner: str, repetition: Any = None, presence: Any = None, frequency: Any = None) -> None:
    """Validate :func:`penalize`'s settings (``None`` disables one), naming ``owner`` in errors."""
    if repetition is not None and (not _is_real(repetition) or repetition <= 0):
        raise ValueError(f"[{owner}] expected repetition_penalty to be a number > 0 (1 = off), got {repetition!r}")
    for name, value in (("presence_penalty", presence), ("frequency_penalty", frequency)):
        if value is not None and not _is_real(value):
            raise ValueError(f"[{owner}] expected {name} to be a finite number (0 = off), got {value!r}")


def penalize(logits: mx.array, counts: mx.array, repetition: Optional[float] = None,
             presence: Optional[float] = None, frequency: Optional[float] = None,
             bias: Optional[mx.array] = None) -> mx.array:
    r"""Penalise the tokens seen so far and add a logit bias.

    With :math:`c_v` the count of token :math:`v` in the row's context (:func:`token_counts`)
    and :math:`s_v = [c_v > 0]`:

    .. math::

        \ell'_v = \begin{cases} \ell_v / r & s_v,\ \ell_v > 0 \\ \ell_v\, r & s_v,\ \ell_v \le 0 \\
        \ell_v & \text{otherwise} \end{cases}
        \qquad \tilde{\ell}_v = \ell'_v - \alpha_{\text{presence}}\, s_v - \alpha_{\text{frequency}}\, c_v + b_v

    (the repetition penalty :math:`r` of Keskar et al. as transformers applies it; presence and
    frequency penalties as OpenAI's API defines them). ``None`` skips a term.

    Args:
        logits (array): next-token logits.
        counts (array): token counts of the context so far.
        repetition (float, optional): :math:`r > 0` (``1`` changes nothing).
        presence, frequency (float, optional): :math:`\alpha`, finite.
        bias (array, optional): :math:`b`, added to every row.

    Shape:
        - logits: :math:`(B, V)`; counts: :math:`(B, V)`; bias: :math:`(V,)`; output: :math:`(B, V)`, logits' dtype.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.structs.sampling import penalize
        >>> penalize(mx.array([[2.0, -1.0, 3.0]]), mx.array([[1, 1, 0]]), repetition=2.0)
        array([[1, -2, 3]], dtype=float32)

    Reference: Keskar et al., "CTRL", https://arxiv.org/abs/1909.05858 (repetition penalty).
    """
    _check_logits("penalize", logits)
    check_penalties("penalize", repetition, presence, frequency)
    out = logits
    seen = counts > 0
    if repetition is not None:
        out = mx.where(seen, mx.where(out > 0, out / repetition, out * repetition), out)
    if presence:
        out = out - presence * seen.astype(out.dtype)
    if frequency:
        out = out - frequency * counts.astype(out.dtype)
    if bias is not None:
        out = out + bias.astype(out.dtype)
    return out.astype(logits.dtype)
