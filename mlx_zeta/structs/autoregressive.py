"""Autoregressive training loss and generation around a token Transformer
(x-transformers' ``AutoregressiveWrapper``), with KV-cached decoding."""

from typing import Any, Dict, Iterator, List, Optional

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.common import check_int
from mlx_zeta.structs.attention_layers import AttentionLayers
from mlx_zeta.structs.decoding import check_token_ids, decode_steps, describe, global_key
from mlx_zeta.structs.sampling import check_sampling_args
from mlx_zeta.structs.transformer import Transformer

__all__ = ["AutoregressiveWrapper"]

# Keyword arguments that describe the prompt rather than every position: given to the
# prefill call only when decoding with a cache (a prompt mask is extended for new tokens).
_PREFIX_KWARGS = ("prepend_embeds", "mask")


def _cache_arrays(caches: List[Any]) -> List[mx.array]:
    """The arrays a cache list holds (to evaluate them with each step's token)."""
    held = (getattr(c, name, None) for c in caches for name in ("keys", "values"))
    return [a for a in held if isinstance(a, mx.array)]


class AutoregressiveWrapper(nn.Module):
    r"""Next-token loss and sampling for a causal token model.

    Training: for tokens :math:`x_1, \dots, x_n` the loss is the mean cross-entropy of
    the model's predictions for :math:`x_2, \dots, x_n` from the prefixes before them,

    .. math::

        \mathcal{L} = \frac{1}{|K|} \sum_{t \in K} \Big(\log \sum_v e^{z_{t,v}} - z_{t,x_{t+1}}\Big),
        \qquad z = \text{net}(x_{1:n-1}),

    over the kept targets :math:`K = \{t : x_{t+1} \ne \text{ignore\_index}\}` (0 when
    none is kept), computed in float32 or wider. Inputs equal to ``ignore_index`` are
    fed to the net as ``pad_value``. A ``mask`` of shape :math:`(B, n)` passed to the
    call is cropped to the inputs; with ``prepend_embeds`` of :math:`P` positions the
    first :math:`P` outputs (predictions made from the prefix alone) are dropped.

    Generation (:meth:`generate`, :meth:`stream`): with ``cache=True`` the prompt is run
    once through ``net(prompt, cache=c)`` with ``c = net.make_cache()`` (the prefill),
    then each new token once through ``net(token[:, None], cache=c)``. With
    ``cache=False`` every step re-runs the net on the whole sequence so far, cropped to
    the last ``net.max_seq_len`` positions when longer. Both give the same tokens for
    the same key. Each step draws with :func:`~mlx_zeta.structs.sample` (filters, then
    temperature) using a fresh split of the key, and is evaluated before the next one
    is built; the next step is scheduled with ``mx.async_eval`` while the current token
    is handed out (the loop is :func:`~mlx_zeta.structs.decoding.decode_steps`, shared with
    :meth:`~mlx_zeta.models.t5.T5Model.generate`). The net is put in eval mode while generating (its previous mode is
    restored afterwards).

    Token ids: :meth:`generate` and :meth:`stream` check the prompt's ids against the net's
    ``num_tokens`` before any lookup (:func:`~mlx_zeta.structs.decoding.check_token_ids`;
    an id out of range would read past the embedding table). The training call does not:
    the check reads the ids back to the host, which a step under ``mx.compile`` cannot do.

    Args:
        net (Transformer): a causal :class:`~mlx_zeta.structs.Transformer` (or any module with
            its call signature, ``make_cache()`` and ``max_seq_len``).
        ignore_index (int): target value left out of the loss. Default: ``-100``.
        pad_value (int): token written after a row's ``eos_token``. Default: ``0``.

    Shape:
        - call: tokens :math:`(B, n)` integer, :math:`n \ge 2` → scalar loss.
        - generate: prompt :math:`(B, n)` → :math:`(B, \text{seq\_len})` int32 new tokens.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.structs import Transformer, AutoregressiveWrapper, Decoder
        >>> net = Transformer(num_tokens=64, max_seq_len=128,
        ...                   attn_layers=Decoder(dim=64, depth=2, heads=4, rotary_pos_emb=True))
        >>> model = AutoregressiveWrapper(net)
        >>> loss = model(mx.random.randint(0, 64, (2, 33)))
        >>> model.generate(mx.zeros((2, 4), dtype=mx.int32), 8, temperature=0).shape
        (2, 8)

    Reference: lucidrains/x-transformers (``AutoregressiveWrapper``); Pope et al.,
    "Efficiently Scaling Transformer Inference", https://arxiv.org/abs/2211.05102 (KV cache).
    """

    def __init__(self, net: nn.Module, ignore_index: int = -100, pad_value: int = 0):
        super().__init__()
        check_int("AutoregressiveWrapper", "ignore_index", ignore_index)
        check_int("AutoregressiveWrapper", "pad_value", pad_value)
        missing = [a for a in ("make_cache", "max_seq_len") if not hasattr(net, a)]
        if not callable(net) or missing:
            raise ValueError(f"[AutoregressiveWrapper] expected net to be a Transformer (callable with make_cache() "
                             f"and max_seq_len), got {type(net).__name__} without {missing or ['__call__']}")
        layers = getattr(net, "attn_layers", None)
        if isinstance(layers, AttentionLayers) and layers.has_self_attn and not layers.causal:
            raise ValueError(f"[AutoregressiveWrapper] expected a causal net (attn_layers=Decoder(...)), got "
                             f"{type(layers).__name__} with causal=False: every position would see its target")
        self.net = net
        self.ignore_index, self.pad_value = ignore_index, pad_value

    # ------------------------------------------------------------------ training

    def __call__(self, tokens: mx.array, **net_kwargs: Any) -> mx.array:
        if not isinstance(tokens, mx.array) or tokens.ndim != 2 or tokens.shape[1] < 2 \
                or not mx.issubdtype(tokens.dtype, mx.integer):
            raise ValueError(f"[AutoregressiveWrapper] expected integer tokens of shape (batch, seq) with seq >= 2, "
                             f"got {describe(tokens)}")
        inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (b, n - 1) each
        inputs = mx.where(inputs == self.ignore_index, self.pad_value, inputs)  # ignored positions are not tokens
        mask = net_kwargs.get("mask")
        if mask is not None and mask.ndim == 2 and mask.shape[1] == tokens.shape[1]:
            net_kwargs["mask"] = mask[:, :-1]
        logits = self.net(inputs, **net_kwargs)  # (b, p + n - 1, vocab)
        prefix = net_kwargs.get("prepend_embeds")
        if prefix is not None:
            logits = logits[:, prefix.shape[1]:]
        if logits.dtype in (mx.float16, mx.bfloat16):
            logits = logits.astype(mx.float32)
        kept = targets != self.ignore_index  # (b, n - 1)
        picked = mx.take_along_axis(logits, mx.where(kept, targets, 0)[..., None], axis=-1)[..., 0]
        nll = mx.logsumexp(logits, axis=-1) - picked  # (b, n - 1)
        return mx.where(kept, nll, 0).sum() / mx.maximum(kept.sum(), 1)

    # ------------------------------------------------------------------ generation

    def generate(self, prompt: mx.array, seq_len: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, min_p: Optional[float] = None, eos_token: Optional[int] = None,
                 cache: bool = True, key: Optional[mx.array] = None, **net_kwargs: Any) -> mx.array:
        r"""Sample ``seq_len`` tokens after ``prompt``; returns the new tokens only.

        Args:
            prompt (array): integer prompt tokens, every row the same length :math:`n \ge 1`.
            seq_len (int): tokens to generate, ``>= 1``.
            temperature, top_k, top_p, min_p: see :func:`~mlx_zeta.structs.sample`
                (``temperature=0`` is greedy). Defaults: ``1.0``, off, off, off.
            eos_token (int, optional): a row that emits it keeps it and then gets
                ``pad_value``; generation stops once every row has. Default: ``None``.
            cache (bool): decode with the net's KV cache. Default: ``True``.
            key (array, optional): ``mx.random.key`` for the draws; ``None`` takes one from
                MLX's global random state (so ``mx.random.seed`` makes runs repeatable).
            **net_kwargs: passed to the net. ``prepend_embeds`` :math:`(B, P, D)` and a
                boolean ``mask`` :math:`(B, n)` over the prompt describe the prefix: with a
                cache they go to the prefill call only (the mask is extended with True for
                the new positions); ``context``, ``context_mask`` etc. go to every call.

        Shape:
            - prompt: :math:`(B, n)`; output: :math:`(B, \text{seq\_len})` int32.
        """
        steps = self.stream(prompt, seq_len, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            eos_token=eos_token, cache=cache, key=key, **net_kwargs)
        return mx.stack(list(steps), axis=1)  # (b, seq_len)

    def stream(self, prompt: mx.array, seq_len: int, temperature: float = 1.0, top_k: Optional[int] = None,
               top_p: Optional[float] = None, min_p: Optional[float] = None, eos_token: Optional[int] = None,
               cache: bool = True, key: Optional[mx.array] = None, **net_kwargs: Any) -> Iterator[mx.array]:
        r"""Like :meth:`generate`, but yield each step's tokens, shape :math:`(B,)` int32, as produced.

        Arguments are checked when ``stream`` is called. It always yields ``seq_len``
        arrays and ``mx.stack(list(stream(...)), axis=1)`` equals ``generate(...)``: once
        every row has emitted ``eos_token`` the net is no longer called and the remaining
        steps are ``pad_value``.
        """
        name = "AutoregressiveWrapper"
        check_token_ids(name, "prompt", prompt, getattr(self.net, "num_tokens", None))
        check_int(name, "seq_len", seq_len, 1)
        check_sampling_args(name, temperature, top_k, top_p, min_p, key)
        check_int(name, "eos_token", eos_token, optional=True)
        if not isinstance(cache, bool):
            raise ValueError(f"[{name}] expected cache to be a bool (the wrapper makes the cache), "
                             f"got {type(cache).__name__}")
        if "return_embeddings" in net_kwargs:
            raise ValueError(f"[{name}] expected no return_embeddings when generating (tokens come from the logits)")
        b, n = prompt.shape
        mask, prefix = net_kwargs.get("mask"), net_kwargs.get("prepend_embeds")
        if mask is not None and (not isinstance(mask, mx.array) or mask.shape != (b, n) or mask.dtype != mx.bool_):
            raise ValueError(f"[{name}] expected a boolean mask of shape ({b}, {n}) over the prompt, "
                             f"got {describe(mask)}")
        p = 0 if prefix is None else prefix.shape[1]
        limit = self.net.max_seq_len
        if cache and isinstance(self.net, nn.Module) and "pos_emb" in self.net and p + n + seq_len - 1 > limit:
            raise ValueError(
                f"[{name}] cannot decode {seq_len} tokens with cache=True: the prompt ({n} tokens"
                f"{f' + {p} prepended' if p else ''}) and the new tokens need {p + n + seq_len - 1} positions, but the "
                f"net's absolute position embedding has max_seq_len={limit}. Use a shorter prompt or seq_len, "
                f"cache=False (re-runs the last {limit} positions each step), or relative positions "
                f"(rotary_pos_emb=True)")
        if not cache and p >= limit:
            raise ValueError(f"[{name}] expected fewer than max_seq_len={limit} prepended positions with cache=False "
                             f"(the window keeps them and the last tokens), got {p}")
        if key is None:
            key = global_key()
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        return self._steps(prompt, seq_len, sampling, eos_token, cache, key, net_kwargs)

    def _steps(self, prompt: mx.array, seq_len: int, sampling: Dict[str, Any], eos_token: Optional[int],
               use_cache: bool, key: mx.array, net_kwargs: Dict[str, Any]) -> Iterator[mx.array]:
        """The decoding behind :meth:`stream` (arguments already checked): the prefill and the
        net's next-token step, run by :func:`~mlx_zeta.structs.decoding.decode_steps`."""
        net = self.net
        b = prompt.shape[0]
        every_call = {k: v for k, v in net_kwargs.items() if k not in _PREFIX_KWARGS}
        prefix, mask = net_kwargs.get("prepend_embeds"), net_kwargs.get("mask")
        p = 0 if prefix is None else prefix.shape[1]
        was_training = getattr(net, "training", False)
        if isinstance(net, nn.Module):
            net.eval()
        try:
            caches: List[Any] = []
            seq = prompt  # (b, n + i), the uncached path's whole sequence
            if use_cache:
                caches = net.make_cache()
                last = {"last_only": True} if isinstance(net, Transformer) else {}  # no head over the prompt
                logits = net(prompt, cache=caches, **net_kwargs, **last)[:, -1]  # prefill
                if mask is not None:  # (b, p + n): every position so far
                    mask = mx.concatenate([mx.ones((b, p), mx.bool_), mask], axis=1)
            else:
                logits = self._recompute(seq, mask, prefix, every_call)

            def step(tok: mx.array) -> mx.array:  # (b,) -> (b, vocab)
                nonlocal mask, seq
                if mask is not None:
                    mask = mx.concatenate([mask, mx.ones((b, 1), mx.bool_)], axis=1)
                if use_cache:
                    step_mask = {} if mask is None else {"mask": mask}
                    return net(tok[:, None], cache=caches, **step_mask, **every_call)[:, -1]
                seq = mx.concatenate([seq, tok[:, None]], axis=1)
                return self._recompute(seq, mask, prefix, every_call)

            def pending() -> List[mx.array]:
                return [seq, *([] if mask is None else [mask]), *_cache_arrays(caches)]

            made = 0
            for tok in decode_steps(step, logits, seq_len, key, **sampling, pad_value=self.pad_value,
                                    eos=() if eos_token is None else (eos_token,), pending=pending):
                made += 1
                yield tok
            for _ in range(seq_len - made):  # every row ended: pad, no more net calls
                yield mx.full((b,), self.pad_value, mx.int32)
        finally:
            if isinstance(net, nn.Module):
                net.train(was_training)

    def _recompute(self, seq: mx.array, mask: Optional[mx.array], prefix: Optional[mx.array],
                   every_call: Dict[str, Any]) -> mx.array:
        """Last-position logits of a full forward over ``seq`` (b, L), cropped to max_seq_len positions."""
        budget = self.net.max_seq_len - (0 if prefix is None else prefix.shape[1])
        if seq.shape[1] > budget:
            seq = seq[:, -budget:]
            mask = None if mask is None else mask[:, -budget:]
        kw = dict(every_call)
        if prefix is not None:
            kw["prepend_embeds"] = prefix
        if mask is not None:
            kw["mask"] = mask
        return self.net(seq, **kw)[:, -1]
