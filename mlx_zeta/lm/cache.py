"""A model's key/value caches together with the token ids they hold, reused across calls.

:class:`PromptCache` is what lets a chat REPL, a server or a batch of continuations of one long
prompt run the shared prefix once: :meth:`PromptCache.reuse` keeps the longest common prefix of
what the caches hold and the new prompt, forgets the rest (:meth:`~mlx_zeta.nn.Cache.trim`),
and returns only the ids that still need a forward pass.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import mlx.nn as nn

from mlx_zeta.common import check_int
from mlx_zeta.nn.cache import RotatingKVCache

__all__ = ["PromptCache", "make_caches"]


def make_caches(model: nn.Module, max_kv_size: Optional[int] = None) -> list:
    """``model.make_cache()``; with ``max_kv_size`` every layer keeps at most that many positions
    (a :class:`~mlx_zeta.nn.RotatingKVCache`; a layer with its own smaller window keeps that)."""
    caches = model.make_cache()
    if max_kv_size is None:
        return caches
    check_int("PromptCache", "max_kv_size", max_kv_size, 1)
    return [RotatingKVCache(min(max_kv_size, getattr(c, "max_size", max_kv_size))) for c in caches]


class PromptCache:
    r"""The key/value caches of one model and the token ids :math:`t_{1:m}` they hold.

    After a call of :func:`~mlx_zeta.lm.stream_generate` with ``prompt_cache=pc``, ``pc.tokens``
    are the prompt and the generated tokens that went through the model (the last generated
    token has not: it is fed at the start of the next call).

    Args:
        model (nn.Module): a causal LM with ``make_cache()`` (e.g. from :func:`~mlx_zeta.lm.load`).
        max_kv_size (int, optional): keep at most this many positions per layer (a rotating
            cache for long generations: memory stays bounded, attention sees the last
            ``max_kv_size`` positions). Default: unbounded.

    Example:
        >>> pc = PromptCache(model)
        >>> text = generate(model, tokenizer, long_prompt + "Q1", prompt_cache=pc)
        >>> text = generate(model, tokenizer, long_prompt + "Q2", prompt_cache=pc)  # prefills only "Q2"
    """

    def __init__(self, model: nn.Module, max_kv_size: Optional[int] = None):
        if not callable(getattr(model, "make_cache", None)):
            raise ValueError(f"[PromptCache] expected a model with make_cache() (a causal LM), got "
                             f"{type(model).__name__}")
        self.model_type = getattr(getattr(model, "pretrained", None), "model_type", None)
        self.max_kv_size = max_kv_size
        self.caches = make_caches(model, max_kv_size)
        self.tokens: List[int] = []
        self._model = model

    def reset(self) -> None:
        """Forget everything (fresh caches)."""
        self.caches = make_caches(self._model, self.max_kv_size)
        self.tokens = []

    def reuse(self, ids: Sequence[int]) -> List[int]:
        """Keep the longest common prefix of :attr:`tokens` and ``ids`` (at most ``len(ids) - 1``
        tokens, so that at least one goes through the model and gives next-token logits), forget
        the rest, and return the ids still to run. Caches that cannot forget exactly start over."""
        common = 0
        limit = min(len(self.tokens), len(ids) - 1)
        while common < limit and self.tokens[common] == ids[common]:
            common += 1
        drop = len(self.tokens) - common
        if drop and all(c.can_trim(drop) for c in self.caches):
            for c in self.caches:
                c.trim(drop)
        elif drop:
            self.reset()
            common = 0
        self.tokens = self.tokens[:common]
        return list(ids[common:])

    @property
    def offset(self) -> int:
        """Positions the caches have seen."""
        return int(self.caches[0].offset) if self.caches else len(self.tokens)
