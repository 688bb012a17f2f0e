r"""Speculative decoding: a small draft model proposes tokens, the target model checks them all in
one forward pass, and the output is exactly what the target alone would have produced.

Each round, with :math:`y` the newest token (not yet in the target's cache) and :math:`k` drafts:

1. the draft proposes :math:`d_1, \dots, d_k` autoregressively (one forward each, with its cache);
2. the target runs once over :math:`[y, d_1, \dots, d_k]` (:math:`k + 1` positions), giving the logits
   of the next token after each prefix, and draws its own token :math:`t_i` at every position
   :math:`i = 0..k` exactly as plain decoding would (same processor, same sampling, the same key);
3. the round keeps :math:`t_0, \dots, t_a` where :math:`a` is the number of leading positions with
   :math:`t_i = d_{i+1}`: the first :math:`a` tokens came from the draft, :math:`t_a` is the target's
   correction (or a bonus token when every draft was accepted);
4. both caches forget the rejected positions (:meth:`~mlx_zeta.nn.Cache.trim`).

Because every kept token is the target's own draw given the kept prefix, the output does not depend
on the draft at all; the draft decides only how many tokens one target forward yields.
"""

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.common import check_int
from mlx_zeta.lm.cache import fill_caches
from mlx_zeta.structs import sample
from mlx_zeta.structs.decoding import check_token_ids, describe, global_key
from mlx_zeta.structs.sampling import check_sampling_args, token_counts

__all__ = ["SpeculativeStats", "check_draft_model", "speculative_steps"]

Processor = Callable[[mx.array, mx.array], mx.array]
_OWNER = "speculative_steps"


@dataclass
class SpeculativeStats:
    r"""What a :func:`speculative_steps` run did, filled in place as it runs.

    Attributes:
        rounds (int): target forwards after the prefill (each yields :math:`1 + \text{accepted}` tokens).
        drafted (int): tokens the draft proposed.
        accepted (int): proposed tokens that became output (``from_draft=True``).
        tokens (int): tokens yielded.
        prompt_tokens (int): prompt positions the target ran in the prefill (those its caches lacked).
        prompt_time (float): seconds of the prefill of both models.
    """

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0
    prompt_tokens: int = 0
    prompt_time: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        """``accepted / drafted`` (0 before any draft)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Tokens per target forward, :math:`\\ge 1` (plain decoding makes exactly 1)."""
        return self.tokens / self.rounds if self.rounds else 0.0


class _Keys:
    """The per-token keys of :func:`~mlx_zeta.structs.decode_steps`: token ``t`` is drawn with the
    second half of the ``t``-th split of the running key, so the same token gets the same key however
    many rounds it took to reach it."""

    def __init__(self, key: Optional[mx.array]):
        self.key, self.subs = key, []

    def __call__(self, t: int) -> Optional[mx.array]:
        if self.key is None:  # greedy: no draws
            return None
        while len(self.subs) <= t:
            self.key, sub = mx.random.split(self.key)
            self.subs.append(sub)
        return self.subs[t]


def check_draft_model(owner: str, target: Any, draft: Any, num_draft_tokens: Any) -> int:
    """Check that ``draft`` can draft for ``target`` (one vocabulary: equal ``num_tokens``) with
    ``num_draft_tokens >= 1``; returns the vocabulary size. Errors name ``owner``."""
    if not callable(getattr(draft, "make_cache", None)):
        raise ValueError(f"[{owner}] expected a causal LM with make_cache() as draft model, got {type(draft).__name__}")
    vocab, draft_vocab = getattr(target, "num_tokens", None), getattr(draft, "num_tokens", None)
    if not isinstance(vocab, int) or vocab != draft_vocab:
        raise ValueError(f"[{owner}] expected a draft model with the target's vocabulary (num_tokens {vocab}), "
                         f"got num_tokens {draft_vocab}")
    check_int(owner, "num_draft_tokens", num_draft_tokens, 1)
    return vocab


def _check_caches(name: str, caches: Any, room: int, n: int) -> None:
    """Refuse caches that cannot forget ``room`` rejected positions or hold more than ``n - 1`` prompt ids."""
    if not isinstance(caches, (list, tuple)) or not caches:
        raise ValueError(f"[{_OWNER}] expected {name} as a non-empty list of caches (model.make_cache()), "
                         f"got {type(caches).__name__}")
    for c in caches:
        if c.static or not c.can_trim(room):
            raise ValueError(f"[{_OWNER}] expected {name} that can forget rejected drafts (Cache.trim; e.g. KVCache), "
                             f"got a {type(c).__name__} that cannot")
    if int(caches[0].offset) >= n:
        raise ValueError(f"[{_OWNER}] expected {name} to hold a prefix of the prompt shorter than it (at most "
                         f"{n - 1} of its {n} positions), got {int(caches[0].offset)} positions")


def _check_window(name: str, caches: Sequence[Any], needed: int) -> None:
    """A window cache (``max_size``) can forget positions only until it starts dropping old ones."""
    for c in caches:
        size = getattr(c, "max_size", None)
        if size is not None and needed > size:
            raise ValueError(f"[{_OWNER}] expected {name} to hold the whole run to forget rejected drafts: a "
                             f"{type(c).__name__}(max_size={size}) drops positions after {size}, the run needs up to "
                             f"{needed}; use a KVCache (no max_kv_size) with a draft model")


def _check_args(target: Any, draft: Any, prompt: Any, target_caches: Any, draft_caches: Any, max_tokens: Any,
                key: Any, num_draft_tokens: Any, sampling: dict, processor: Any, counts: Any, eos: Any,
                stats: Any, prefill_step: Any) -> int:
    """Every argument of :func:`speculative_steps`; returns the shared vocabulary size."""
    vocab = check_draft_model(_OWNER, target, draft, num_draft_tokens)
    check_token_ids(_OWNER, "prompt", prompt, vocab)
    if prompt.shape[0] != 1:
        raise ValueError(f"[{_OWNER}] expected a prompt of batch size 1 (speculative decoding runs one sequence), "
                         f"got shape {tuple(prompt.shape)}")
    check_int(_OWNER, "max_tokens", max_tokens, 1)
    check_sampling_args(_OWNER, sampling["temperature"], sampling["top_k"], sampling["top_p"], sampling["min_p"], key)
    _check_caches("target_caches", target_caches, num_draft_tokens + 1, prompt.shape[1])
    _check_caches("draft_caches", draft_caches, num_draft_tokens, prompt.shape[1])
    check_int(_OWNER, "prefill_step", prefill_step, 1)
    needed = prompt.shape[1] + max_tokens - 1  # the most positions a cache holds, mid-round included
    _check_window("target_caches", target_caches, needed)
    _check_window("draft_caches", draft_caches, needed)
    if processor is not None and not callable(processor):
        raise ValueError(f"[{_OWNER}] expected processor to be None or a callable (logits, counts) -> logits, "
                         f"got {type(processor).__name__}")
    if counts is not None and (not isinstance(counts, mx.array) or counts.shape != (1, vocab)
                               or not mx.issubdtype(counts.dtype, mx.integer)):
        raise ValueError(f"[{_OWNER}] expected counts as integer token counts of shape (1, {vocab}), "
                         f"got {describe(counts)}")
    if not isinstance(eos, (list, tuple)) or not all(isinstance(e, int) and not isinstance(e, bool) for e in eos):
        raise ValueError(f"[{_OWNER}] expected eos as a list or tuple of int token ids, got {eos!r}")
    if stats is not None and not isinstance(stats, SpeculativeStats):
        raise ValueError(f"[{_OWNER}] expected stats to be None or a SpeculativeStats, got {type(stats).__name__}")
    return vocab


def speculative_steps(target: Any, draft: Any, prompt: mx.array, target_caches: List[Any], draft_caches: List[Any],
                      max_tokens: int, key: Optional[mx.array] = None, *, num_draft_tokens: int = 3,
                      temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                      min_p: Optional[float] = None, processor: Optional[Processor] = None,
                      counts: Optional[mx.array] = None, eos: Sequence[int] = (),
                      stats: Optional[SpeculativeStats] = None,
                      prefill_step: int = 512) -> Iterator[Tuple[int, float, bool]]:
    r"""Yield ``(token, logprob, from_draft)`` for up to ``max_tokens`` tokens after ``prompt``,
    decoded speculatively (see the module docstring): the target verifies ``num_draft_tokens``
    draft proposals per forward pass.

    **Exactness.** Token :math:`t` (counting from 0) is the target's own draw
    :func:`~mlx_zeta.structs.sample` ``(processor(logits_t, counts_t), key=key_t)`` with
    :math:`\text{key}_t` the :math:`t`-th per-step key of :func:`~mlx_zeta.structs.decode_steps`
    (the second half of the :math:`t`-th split of ``key``) and :math:`\text{counts}_t` the
    ``counts`` plus every token before it. So at ``temperature=0`` the output is the target's greedy
    decoding, and at ``temperature > 0`` it is an exact sample from the target's distribution,
    token for token the one plain decoding draws with the same ``key`` (up to the rounding of a
    :math:`k+1`-position forward against a 1-position one). The draft draws its proposal for token
    :math:`t` with the same :math:`\text{key}_t`, so where the two distributions are close the two
    draws coincide (a shared Gumbel-max coupling) and drafts are accepted at any temperature.

    ``logprob`` is :math:`\log \text{softmax}` of the target's processed logits (temperature 1,
    before the top-k/p filters) at the token. ``from_draft`` says the token was a draft proposal the
    target accepted (``stats.accepted`` counts them).

    Batch size 1 only. Both models take ``model(ids (1, n), cache=caches) -> logits (1, n, V)``
    and share one vocabulary (``num_tokens``). ``prompt`` is the whole context; each model's caches
    may already hold a prefix of it (e.g. a prompt cache; fewer than :math:`n` positions, usually
    none), and the rest but its last token is prefilled, ``prefill_step`` positions per forward.
    The caches must be able to forget positions (``KVCache``; a ``RotatingKVCache`` only if the run
    fits its ``max_size``; a ``StaticKVCache`` is refused). When the generator ends or is closed,
    each cache holds the prompt and every yielded token but the last (the state plain decoding
    leaves).

    Args:
        target, draft: causal LMs (e.g. :class:`~mlx_zeta.structs.Transformer`).
        prompt (array): :math:`(1, n)` integer token ids, :math:`n \ge 1`.
        target_caches, draft_caches (list): each model's caches (``model.make_cache()``).
        max_tokens (int): most tokens to yield, ``>= 1``.
        key (array, optional): ``mx.random.key``; ``None`` takes one from MLX's global random state.
        num_draft_tokens (int): draft proposals per round, :math:`k \ge 1`. Default: ``3``.
        temperature, top_k, top_p, min_p: see :func:`~mlx_zeta.structs.sample`. Default: ``1.0``, off.
        processor (callable, optional): ``(logits (B, V), counts (B, V) int32) -> logits``, applied to
            both models' logits before sampling (penalties, logit bias). Default: none.
        counts (array, optional): :math:`(1, V)` token counts of the history before the first new token
            (e.g. of the prompt), the processor's starting counts. Default: zeros.
        eos (Sequence[int]): end-token ids; the run ends after yielding one. Default: none.
        stats (SpeculativeStats, optional): filled in place (rounds, drafted, accepted, prompt timing).
        prefill_step (int): prompt positions per prefill forward pass. Default: ``512``.

    Example:
        Two tiny random models: whatever the draft proposes, greedy speculative decoding yields the
        target's own greedy tokens.

        >>> import mlx.core as mx
        >>> from mlx_zeta.lm import speculative_steps
        >>> from mlx_zeta.structs import Decoder, Transformer
        >>> mx.random.seed(0)
        >>> target = Transformer(num_tokens=64, max_seq_len=64, attn_layers=Decoder(dim=32, depth=2, heads=2))
        >>> draft = Transformer(num_tokens=64, max_seq_len=64, attn_layers=Decoder(dim=16, depth=1, heads=2))
        >>> steps = speculative_steps(target, draft, mx.array([[1, 2, 3]]), target.make_cache(),
        ...                           draft.make_cache(), 8, temperature=0)
        >>> tokens = [tok for tok, logprob, from_draft in steps]
        >>> ids = mx.array([[1, 2, 3]])
        >>> for _ in range(8):  # the target alone, greedy, without a cache
        ...     ids = mx.concatenate([ids, target(ids)[:, -1:].argmax(-1)], axis=1)
        >>> tokens == ids[0, 3:].tolist()
        True

    References: Leviathan et al., "Fast Inference from Transformers via Speculative Decoding",
    https://arxiv.org/abs/2211.17192; Chen et al., "Accelerating Large Language Model Decoding with
    Speculative Sampling", https://arxiv.org/abs/2302.01318.
    """
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    vocab = _check_args(target, draft, prompt, target_caches, draft_caches, max_tokens, key, num_draft_tokens,
                        sampling, processor, counts, eos, stats, prefill_step)
    if temperature == 0:
        key = None
    elif key is None:
        key = global_key()
    if processor is not None and counts is None:
        counts = mx.zeros((1, vocab), mx.int32)
    run = _Run(target, draft, target_caches, draft_caches, vocab, sampling, processor, counts,
               stats if stats is not None else SpeculativeStats())
    return run.steps(prompt, max_tokens, _Keys(key), num_draft_tokens, frozenset(eos), prefill_step)


class _Run:
    """The state of one speculative run (arguments already checked)."""

    def __init__(self, target: Any, draft: Any, target_caches: List[Any], draft_caches: List[Any], vocab: int,
                 sampling: dict, processor: Optional[Processor], counts: Optional[mx.array],
                 stats: SpeculativeStats):
        self.target, self.draft, self.tc, self.dc = target, draft, target_caches, draft_caches
        self.vocab, self.sampling, self.processor, self.counts = vocab, sampling, processor, counts
        self.stats = stats

    def _room(self, model: Any, caches: List[Any]) -> float:
        """Positions a model with an absolute position embedding can still take."""
        if isinstance(model, nn.Module) and "pos_emb" in model:
            return model.max_seq_len - int(caches[0].offset)
        return float("inf")

    def _process(self, logits: mx.array, counts: Optional[mx.array]) -> mx.array:
        return logits if self.processor is None else self.processor(logits, counts)

    def _propose(self, pending: mx.array, k: int, keys: List[Optional[mx.array]]) -> List[mx.array]:
        """The draft's ``k`` proposals, each (1,) int32, after feeding ``pending`` (1, m); lazy."""
        drafts, counts, ids = [], self.counts, pending
        for i in range(k):
            logits = self._process(self.draft(ids, cache=self.dc)[:, -1], counts)  # (1, V)
            d = sample(logits, key=keys[i], **self.sampling)  # (1,)
            drafts.append(d)
            if counts is not None:
                counts = counts + token_counts(d[:, None], self.vocab)
            ids = d[:, None]
        return drafts

    def _verify(self, y: mx.array, drafts: List[mx.array], keys: List[Optional[mx.array]]) -> Tuple[mx.array, mx.array]:
        """The target's own draws at the k + 1 positions and their logprobs, (k + 1,) each; lazy."""
        ids = mx.concatenate([y, *[d[:, None] for d in drafts]], axis=1)  # (1, k + 1)
        logits = self.target(ids, cache=self.tc)[0]  # (k + 1, V)
        counts = None
        if self.counts is not None:  # row i has seen the drafts before it
            seen = token_counts(ids[:, 1:].reshape(-1, 1), self.vocab) if drafts else mx.zeros((0, self.vocab), mx.int32)
            before = mx.concatenate([mx.zeros((1, self.vocab), mx.int32), mx.cumsum(seen, axis=0)], axis=0)
            counts = self.counts + before  # (k + 1, V)
        logits = self._process(logits, counts)
        if self.sampling["temperature"] == 0:
            drawn = sample(logits, temperature=0)
        else:
            drawn = mx.concatenate([sample(logits[i : i + 1], key=keys[i], **self.sampling) for i in range(len(keys))])
        logp = logits.astype(mx.float32) - mx.logsumexp(logits.astype(mx.float32), axis=-1, keepdims=True)
        return drawn, mx.take_along_axis(logp, drawn[:, None], axis=-1)[:, 0]

    def _round(self, y: mx.array, pending: mx.array, made: int, k: int, keys: _Keys,
               eos: frozenset) -> Tuple[List[int], List[float], int]:
        """One round: the kept tokens, their logprobs, and how many came from the draft; caches trimmed."""
        subs = [keys(made + i) for i in range(k + 1)]
        drafts = self._propose(pending, k, subs)
        drawn, logp = self._verify(y, drafts, subs)
        proposed = mx.concatenate(drafts) if drafts else mx.zeros((0,), mx.int32)
        mx.eval(drawn, logp, proposed)
        t, d = drawn.tolist(), proposed.tolist()
        accepted = 0
        while accepted < k and t[accepted] == d[accepted]:
            accepted += 1
        out = t[: accepted + 1]
        for j, tok in enumerate(out):
            if tok in eos:
                out = out[: j + 1]
                break
        for c in self.tc:  # the target holds y, d_1..d_k: keep y and the kept drafts
            c.trim(k + 1 - len(out))
        return out, logp.tolist()[: len(out)], min(accepted, len(out))

    def _prefill(self, prompt: mx.array, step: int) -> None:
        """Run what each model's caches lack of the prompt but its last token, ``step`` positions at a time."""
        began = time.perf_counter()
        n = prompt.shape[1]
        self.stats.prompt_tokens = n - int(self.tc[0].offset)
        for model, caches in ((self.target, self.tc), (self.draft, self.dc)):
            fill_caches(model, caches, prompt[:, int(caches[0].offset) : n - 1], step)
        self.stats.prompt_time = time.perf_counter() - began

    def steps(self, prompt: mx.array, max_tokens: int, keys: _Keys, k_max: int, eos: frozenset,
              prefill_step: int) -> Iterator[Tuple[int, float, bool]]:
        """The generator behind :func:`speculative_steps`."""
        n = prompt.shape[1]
        self._prefill(prompt, prefill_step)  # the last prompt token is fed by the first round
        y = prompt[:, -1:]  # (1, 1), in neither cache
        pending = y  # what the draft has not seen yet, (1, m)
        made = 0
        try:
            while made < max_tokens:
                room = min(self._room(self.target, self.tc) - 1, self._room(self.draft, self.dc) - pending.shape[1] + 1)
                k = int(max(0, min(k_max, max_tokens - made - 1, room)))
                out, logps, accepted = self._round(y, pending, made, k, keys, eos)
                # the draft saw pending and d_1..d_{k-1}: keep what agrees with the output, feed the rest next
                agree = min(accepted, k - 1) if k else 0
                if k:
                    for c in self.dc:
                        c.trim(k - 1 - agree)
                    pending = mx.array([out[agree:]], mx.int32)
                else:
                    pending = mx.concatenate([pending, mx.array([out], mx.int32)], axis=1)
                y = mx.array([out[-1:]], mx.int32)
                if self.counts is not None:
                    self.counts = self.counts + token_counts(mx.array([out]), self.vocab)
                s = self.stats
                s.rounds, s.drafted, s.accepted = s.rounds + 1, s.drafted + k, s.accepted + accepted
                for j, (tok, lp) in enumerate(zip(out, logps)):
                    made += 1
                    s.tokens += 1
                    yield tok, lp, j < accepted
                if out[-1] in eos:
                    return
        finally:
            if made:  # closed early: forget what the caller never took
                for caches in (self.tc, self.dc):
                    extra = int(caches[0].offset) - (n + made - 1)
                    for c in caches:
                        c.trim(max(0, extra))
