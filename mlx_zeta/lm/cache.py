"""A model's key/value caches together with the token ids they hold, reused across calls.

:class:`PromptCache` is what lets a chat REPL, a server or a batch of continuations of one long
prompt run the shared prefix once: :meth:`PromptCache.reuse` keeps the longest common prefix of
what the caches hold and the new prompt, forgets the rest (:meth:`~mlx_zeta.nn.Cache.trim`),
and returns only the ids that still need a forward pass.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.common import check_int
from mlx_zeta.nn.cache import RotatingKVCache

__all__ = ["PromptCache", "WindowedKVCache", "fill_caches", "make_caches"]


class WindowedKVCache(RotatingKVCache):
    r""":class:`~mlx_zeta.nn.RotatingKVCache` that also masks: query :math:`i` sees the keys
    :math:`j` with :math:`0 \le i - j < \text{max\_size}` (the last ``max_size`` positions,
    itself included), whatever the layer asks for.

    A plain :class:`~mlx_zeta.nn.RotatingKVCache` relies on the stack's ``sliding_window`` for
    that (alone, a prefill would attend to every prompt position and a decoding step to
    ``max_size + 1``); with this one a model without a window decodes exactly as the same weights
    built with ``sliding_window=max_size`` (a stack window :math:`w` still applies: the smaller
    wins), and keeps at most ``max_size`` positions per layer between calls.

    Args:
        max_size (int): positions kept and attended to.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.lm import WindowedKVCache
        >>> cache = WindowedKVCache(max_size=2)
        >>> cache.update_and_fetch(mx.zeros((1, 1, 3, 4)), mx.zeros((1, 1, 3, 4)))[0].shape
        (1, 1, 3, 4)
        >>> cache.make_mask(1, causal=True).tolist()  # 2 kept + 1 new key: the oldest is out of reach
        [[False, True, True]]
    """

    def make_mask(self, n: int, causal: bool = False, window: Optional[int] = None) -> mx.array:
        """The window ``min(window, max_size)`` over the returned keys (see :meth:`~mlx_zeta.nn.Cache.make_mask`)."""
        window = self.max_size if window is None else min(window, self.max_size)
        return super().make_mask(n, causal=causal, window=window)


def make_caches(model: nn.Module, max_kv_size: Optional[int] = None) -> list:
    """Fresh caches for ``model`` (its ``make_cache()``); with ``max_kv_size`` :math:`N`, every
    layer whose cache could hold more than :math:`N` positions gets a :class:`WindowedKVCache` (N)
    instead (a layer with its own window :math:`w \\le N` keeps its cache): memory stays bounded
    and attention sees the last :math:`\\min(w, N)` positions."""
    check_int("PromptCache", "max_kv_size", max_kv_size, 1, optional=True)
    caches = model.make_cache()
    if max_kv_size is None:
        return caches
    return [c if getattr(c, "max_size", max_kv_size + 1) <= max_kv_size else WindowedKVCache(max_kv_size)
            for c in caches]


def fill_caches(model: nn.Module, caches: list, ids: mx.array, step: int) -> None:
    """Run ``ids`` :math:`(B, L)` through ``model`` into ``caches``, ``step`` positions per forward pass
    (bounding the attention scores' memory), evaluating only the caches: no logits are asked for, so
    MLX's lazy graph skips the last layer's tail, the final norm and the head for these positions."""
    for i in range(0, ids.shape[1], step):
        model(ids[:, i:i + step], cache=caches)
        mx.eval([c.state for c in caches])


class PromptCache:
    r"""The key/value caches of one model and the token ids :math:`t_{1:m}` they hold.

    After a call of :func:`~mlx_zeta.lm.stream_generate` with ``prompt_cache=pc``, ``pc.tokens``
    are the prompt and the generated tokens that went through the model (the last generated
    token has not: it is fed at the start of the next call).

    Args:
        model (nn.Module): a causal LM with ``make_cache()`` (e.g. from :func:`~mlx_zeta.lm.load`).
        max_kv_size (int, optional): keep at most this many positions per layer (a rotating
            cache for long generations: memory stays bounded, attention sees the last
            ``max_kv_size`` positions, see :func:`make_caches`). Default: unbounded.

    Save and reuse across processes: :func:`~mlx_zeta.lm.save_prompt_cache`,
    :func:`~mlx_zeta.lm.load_prompt_cache`.

    Example:
        This needs a trained checkpoint (random weights would print noise), so it is shown, not run:

        .. code-block:: python

            from mlx_zeta.lm import PromptCache, generate, load

            model, tokenizer = load("path/to/model")
            pc = PromptCache(model)
            text = generate(model, tokenizer, long_prompt + "Q1", prompt_cache=pc)
            text = generate(model, tokenizer, long_prompt + "Q2", prompt_cache=pc)  # prefills only "Q2"
    """

    def __init__(self, model: nn.Module, max_kv_size: Optional[int] = None):
        if not callable(getattr(model, "make_cache", None)):
            raise ValueError(f"[PromptCache] expected a model with make_cache() (a causal LM), got "
                             f"{type(model).__name__}")
        self.max_kv_size = max_kv_size
        self.caches = make_caches(model, max_kv_size)
        self.tokens: List[int] = []
        self.model = model
        self.metadata: Dict[str, str] = {}  # the caller's, of a file read by load_prompt_cache

    def reset(self) -> None:
        """Forget everything (fresh caches)."""
        self.caches = make_caches(self.model, self.max_kv_size)
        self.tokens = []

    def reuse(self, ids: Sequence[int]) -> List[int]:
        """Keep the longest common prefix of ``tokens`` and ``ids`` (at most ``len(ids) - 1``
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
