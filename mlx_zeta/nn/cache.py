r"""Key/value caches for incremental (token-by-token) attention decoding, and the one
protocol every layer uses to talk to them.

A layer asks a cache four questions and never checks its type:

- ``offset``: positions seen so far (the position of the next query), an ``int``, or an
  int32 scalar array when ``static`` (the position is traced, so one compiled graph
  serves every step);
- :meth:`~Cache.update_and_fetch`: store the new keys/values, return the keys/values to
  attend to (:meth:`~Cache.key_length` of them);
- :meth:`~Cache.make_mask`: the mask its key layout implies for the next ``n`` queries
  (causal and sliding-window masking over the returned keys): ``None`` (every key),
  ``"causal"`` (bottom-right aligned causal masking, which
  :class:`~mlx_zeta.nn.FlashAttention` applies itself) or a boolean ``(n, key_length)`` array;
- :meth:`~Cache.key_mask`: the caller's key-padding mask laid over the returned keys
  (caches that mask by position refuse one);
- ``static``: whether shapes are independent of the position (``offset`` is then an array
  that cannot be read on the host without a sync, e.g. to check a length limit).

The caches: :class:`KVCache` (grows), :class:`RotatingKVCache` (keeps a window),
:class:`StaticKVCache` (fixed capacity, position as an array). Any object answering these
questions works with :class:`~mlx_zeta.nn.Attention` and the stacks of :mod:`mlx_zeta.structs`.
"""

from typing import Optional, Tuple, Union

import mlx.core as mx

from mlx_zeta.common import check_int

__all__ = ["Cache", "KVCache", "RotatingKVCache", "StaticKVCache"]

Mask = Union[None, str, mx.array]


def _position_mask(q_pos: mx.array, k_pos: mx.array, causal: bool, window: Optional[int]) -> Optional[mx.array]:
    """Boolean (n, k_len) from query positions (n,) and key positions (k_len,), or None."""
    dist = q_pos[:, None] - k_pos[None, :]  # query minus key position
    keep = None
    if causal:
        keep = dist >= 0
    if window is not None:
        near = dist < window if causal else mx.abs(dist) < window
        keep = near if keep is None else keep & near
    return keep


class Cache:
    """Base of the key/value caches: the protocol (see the module docstring) and the checks
    and bottom-right masking that the growing caches share."""

    static = False  # True: shapes do not depend on the position (offset is an int32 array)

    def __init__(self) -> None:
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset: Union[int, mx.array] = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        raise NotImplementedError

    def key_length(self, n: int) -> int:
        """Keys returned by the next :meth:`update_and_fetch` of ``n`` positions."""
        return self.offset + n

    def make_mask(self, n: int, causal: bool = False, window: Optional[int] = None) -> Mask:
        """The mask the returned keys need for the next ``n`` queries. The returned keys end
        at the newest position, so query :math:`i` sits at key index ``i + key_length - n``:
        ``"causal"`` without a window, else a boolean ``(n, key_length)`` array."""
        check_int(type(self).__name__, "n", n, 1)
        if window is None:
            return "causal" if causal else None
        check_int(type(self).__name__, "window", window, 1)
        k_len = self.key_length(n)
        return _position_mask(mx.arange(n) + (k_len - n), mx.arange(k_len), causal, window)

    def key_mask(self, mask: Optional[mx.array], n: int, batch: int, owner: str) -> Optional[mx.array]:
        """The caller's boolean key-padding mask, ``(batch, n)`` over the new positions or
        ``(batch, offset + n)`` over every position so far, as ``(batch, key_length(n))``
        (cached positions count as kept when only the new ones are given)."""
        if mask is None:
            return None
        total = self.offset + n
        if mask.dtype != mx.bool_ or mask.ndim != 2 or mask.shape[0] not in (1, batch) or mask.shape[1] not in (n, total):
            raise ValueError(f"[{owner}] expected a boolean mask of shape ({batch}, {n}) or ({batch}, {total}) "
                             f"(all positions so far), got shape {tuple(mask.shape)} and dtype {mask.dtype}")
        k_len = self.key_length(n)
        if mask.shape[1] == n and k_len > n:
            mask = mx.concatenate([mx.ones((mask.shape[0], k_len - n), mx.bool_), mask], axis=1)
        return mask[:, -k_len:]

    def _check_update(self, keys: mx.array, values: mx.array) -> None:
        name = type(self).__name__
        if keys.ndim != 4 or values.ndim != 4 or keys.shape[:3] != values.shape[:3]:
            raise ValueError(
                f"[{name}] expected keys and values of shape (batch, kv_heads, seq, dim) with equal "
                f"(batch, kv_heads, seq), got shapes {tuple(keys.shape)} and {tuple(values.shape)}"
            )
        if self.keys is not None:
            want = (self.keys.shape[:2], self.keys.shape[3], self.values.shape[3])
            got = (keys.shape[:2], keys.shape[3], values.shape[3])
            if want != got:
                raise ValueError(f"[{name}] expected (batch, kv_heads), key dim, value dim = {want} as cached, got {got}")

    def reset(self) -> None:
        """Forget every cached position (the next update starts a new sequence)."""
        self.keys = None
        self.values = None
        self.offset = 0

    def can_trim(self, n: int) -> bool:
        """Whether :meth:`trim` can forget the newest ``n`` positions exactly (base: no)."""
        return False

    def trim(self, n: int) -> int:
        r"""Forget the newest ``n`` positions, so the cache holds the first ``offset - n``
        (a rejected speculative draft, a prompt that shares only a prefix with the cached one).
        ``n`` is clipped to ``[0, offset]``; returns the number forgotten. A cache that cannot
        do it exactly (:meth:`can_trim` is False) raises ``ValueError``."""
        raise ValueError(f"[{type(self).__name__}] cannot forget cached positions (trim); make a new cache")

    def _trim_count(self, n: int) -> int:
        check_int(type(self).__name__, "n", n, 0)
        if not self.can_trim(n):
            raise ValueError(f"[{type(self).__name__}] cannot forget {n} cached positions exactly (trim); "
                             f"make a new cache")
        return min(n, int(self.offset))

    @property
    def state(self) -> Tuple[Optional[mx.array], Optional[mx.array]]:
        """The stored ``(keys, values)``, or ``(None, None)`` when empty."""
        return self.keys, self.values


class KVCache(Cache):
    r"""Growing key/value cache for autoregressive decoding, in the style of mlx-lm.

    Keys and values of shape ``(batch, kv_heads, seq, dim)`` are appended along the
    sequence axis. Storage grows in blocks of ``step`` positions so that a decode
    loop does not copy the whole cache at every token; :meth:`update_and_fetch`
    returns views of the filled part only.

    A cache belongs to one attention layer: pass the same object to the layer at
    every step. The layer updates it in place and returns only its output.

    Args:
        step (int): positions allocated at a time. Default: ``256``.

    Shape:
        - keys, values: :math:`(B, H_{kv}, L_{new}, D)` and :math:`(B, H_{kv}, L_{new}, D_v)`.
        - returned keys, values: :math:`(B, H_{kv}, \text{offset}, D)` (after the update).

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.nn import KVCache
        >>> cache = KVCache()
        >>> k = v = mx.zeros((1, 2, 3, 8))
        >>> keys, values = cache.update_and_fetch(k, v)
        >>> cache.offset, keys.shape
        (3, (1, 2, 3, 8))
    """

    def __init__(self, step: int = 256):
        if step < 1:
            raise ValueError(f"[KVCache] expected step >= 1, got {step}")
        super().__init__()
        self.step = step

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        """Append ``keys``/``values`` after the cached positions; return everything cached."""
        self._check_update(keys, values)
        prev, new = self.offset, keys.shape[2]
        if self.keys is None or prev + new > self.keys.shape[2]:
            n_steps = (new + self.step - 1) // self.step
            b, h, _, dk = keys.shape
            k_grow = mx.zeros((b, h, n_steps * self.step, dk), keys.dtype)
            v_grow = mx.zeros((b, h, n_steps * self.step, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = k_grow, v_grow
            else:
                self.keys = mx.concatenate([self.keys[..., :prev, :], k_grow], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], v_grow], axis=2)
        self.offset = prev + new
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def can_trim(self, n: int) -> bool:
        """Always: a growing cache keeps every position."""
        return True

    def trim(self, n: int) -> int:
        """Forget the newest ``n`` positions (their storage is overwritten by the next update)."""
        n = self._trim_count(n)
        self.offset -= n
        return n

    @property
    def state(self) -> Tuple[Optional[mx.array], Optional[mx.array]]:
        """The filled part of the cache, ``(keys, values)``, or ``(None, None)`` when empty."""
        if self.keys is None:
            return None, None
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]


class RotatingKVCache(Cache):
    r"""Key/value cache that keeps only the last ``max_size`` positions.

    For sliding-window attention a query never looks further back than the window,
    so older keys and values can be dropped. :meth:`update_and_fetch` concatenates
    the new keys/values after the kept ones and returns *all* of them (kept plus
    new, so every query of a multi-token prefill still finds its window), then
    stores only the last ``max_size`` positions. This is a plain concat-and-trim,
    not an in-place ring buffer: each step copies at most ``max_size`` positions.

    ``offset`` counts every position seen so far (for rotary angles and absolute
    position ids); :attr:`size` is the number of positions stored. The returned
    keys are the *last* positions of the sequence, so masks and relative biases
    over them are bottom-right aligned: with :math:`I` new queries and :math:`J`
    returned keys, query :math:`i` sits at key index :math:`i + J - I`.

    Args:
        max_size (int): positions kept between calls, usually the sliding window.

    Shape:
        - keys, values: :math:`(B, H_{kv}, L_{new}, D)` and :math:`(B, H_{kv}, L_{new}, D_v)`.
        - returned keys, values: :math:`(B, H_{kv}, \min(\text{size}, \text{max\_size}) + L_{new}, D)`.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.nn import RotatingKVCache
        >>> cache = RotatingKVCache(max_size=4)
        >>> k = v = mx.zeros((1, 2, 6, 8))
        >>> keys, _ = cache.update_and_fetch(k, v)
        >>> cache.offset, cache.size, keys.shape
        (6, 4, (1, 2, 6, 8))

    Reference: Beltagy et al., "Longformer", https://arxiv.org/abs/2004.05150 (sliding
    windows); Jiang et al., "Mistral 7B", https://arxiv.org/abs/2310.06825 (rolling cache).
    """

    def __init__(self, max_size: int):
        check_int("RotatingKVCache", "max_size", max_size, 1)
        super().__init__()
        self.max_size = max_size

    @property
    def size(self) -> int:
        """Positions currently stored (at most ``max_size``)."""
        return 0 if self.keys is None else self.keys.shape[2]

    def key_length(self, n: int) -> int:
        """Kept plus new positions: ``size + n``."""
        return self.size + n

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        """Append ``keys``/``values`` after the kept positions; return kept + new, keep the last ``max_size``."""
        self._check_update(keys, values)
        self.offset += keys.shape[2]
        if self.keys is not None:
            keys = mx.concatenate([self.keys, keys], axis=2)
            values = mx.concatenate([self.values, values], axis=2)
        self.keys = keys[:, :, -self.max_size :]
        self.values = values[:, :, -self.max_size :]
        return keys, values

    def can_trim(self, n: int) -> bool:
        """Only while nothing has been dropped (``offset <= max_size``): after that, forgetting the
        newest positions would leave the window short of the older ones it has already let go."""
        return self.offset <= self.max_size or n == 0

    def trim(self, n: int) -> int:
        """Forget the newest ``n`` positions (see :meth:`can_trim`)."""
        n = self._trim_count(n)
        if n:
            self.offset -= n
            self.keys, self.values = self.keys[:, :, : self.offset], self.values[:, :, : self.offset]
        return n


class StaticKVCache(Cache):
    r"""Key/value cache of fixed capacity whose position is an array, for graphs with static
    shapes: ``mx.compile``-d decode loops (no recompilation per step) and exports such as a
    Core ML decoder whose cache is model state.

    :meth:`update_and_fetch` writes the new keys/values at ``offset`` (``mx.slice_update`` with
    an array start) and returns the *whole* buffers, :math:`L = \text{capacity}`; unwritten
    positions hold zeros. Keys are therefore hidden by position rather than by length:
    :meth:`make_mask` gives query :math:`i` (at position ``offset + i``) the keys
    :math:`j \le \text{offset} + i` (causal, within the window if one is given) or
    :math:`j < \text{offset} + n`, always as an array, and a key-padding mask is refused.
    ``offset`` is an int32 scalar array, so the same traced graph serves every step. The
    caller keeps ``offset + new <= capacity`` (writes past the end are not checked at run
    time, which would need a host sync).

    Args:
        capacity (int): positions held.
        keys, values (array, optional): initial buffers :math:`(B, H_{kv}, \text{capacity}, D)`
            (e.g. the state of an exported model). Default: zeros at the first update.
        offset (array, optional): int32 scalar, positions already written. Default: ``0``.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_zeta.nn import StaticKVCache
        >>> cache = StaticKVCache(capacity=8)
        >>> keys, _ = cache.update_and_fetch(mx.ones((1, 2, 3, 4)), mx.ones((1, 2, 3, 4)))
        >>> keys.shape, cache.offset.item()
        ((1, 2, 8, 4), 3)
    """

    static = True

    def __init__(self, capacity: int, keys: Optional[mx.array] = None, values: Optional[mx.array] = None,
                 offset: Optional[mx.array] = None):
        check_int("StaticKVCache", "capacity", capacity, 1)
        if (keys is None) != (values is None) or (keys is not None and (keys.ndim != 4 or keys.shape[2] != capacity)):
            raise ValueError(f"[StaticKVCache] expected keys and values both given, of shape (batch, kv_heads, "
                             f"{capacity}, dim), or neither")
        super().__init__()
        self.capacity = capacity
        self.keys, self.values = keys, values
        self.offset = mx.array(0, dtype=mx.int32) if offset is None else offset.astype(mx.int32).reshape(())

    def key_length(self, n: int) -> int:
        """Always the whole buffer: ``capacity``."""
        return self.capacity

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        """Write ``keys``/``values`` at ``offset``; return the full buffers and advance ``offset``."""
        self._check_update(keys, values)
        if keys.shape[2] > self.capacity:
            raise ValueError(f"[StaticKVCache] expected at most capacity={self.capacity} new positions, "
                             f"got {keys.shape[2]}")
        if self.keys is None:
            b, h, _, d = keys.shape
            self.keys = mx.zeros((b, h, self.capacity, d), keys.dtype)
            self.values = mx.zeros((b, h, self.capacity, values.shape[3]), values.dtype)
        start = self.offset.reshape(1)
        self.keys = mx.slice_update(self.keys, keys.astype(self.keys.dtype), start, axes=(2,))
        self.values = mx.slice_update(self.values, values.astype(self.values.dtype), start, axes=(2,))
        self.offset = self.offset + keys.shape[2]
        return self.keys, self.values

    def make_mask(self, n: int, causal: bool = False, window: Optional[int] = None) -> mx.array:
        """Boolean ``(n, capacity)`` by position: query ``i`` (at ``offset + i``) sees the written
        keys ``j < offset + n``, with ``causal`` only ``j <= offset + i``, with ``window`` :math:`w`
        only those less than :math:`w` positions away (unwritten positions are never seen)."""
        check_int("StaticKVCache", "n", n, 1)
        if window is not None:
            check_int("StaticKVCache", "window", window, 1)
        q_pos, k_pos = self.offset + mx.arange(n), mx.arange(self.capacity)
        keep = _position_mask(q_pos, k_pos, causal, window)
        if causal:  # j <= offset + i: only written keys
            return keep
        written = k_pos[None, :] < self.offset + n  # (1, capacity)
        return mx.broadcast_to(written, (n, self.capacity)) if keep is None else keep & written

    def key_mask(self, mask: Optional[mx.array], n: int, batch: int, owner: str) -> None:
        """A static cache masks by position: a key-padding mask raises ``ValueError``."""
        if mask is not None:
            raise ValueError(f"[{owner}] expected no mask with a StaticKVCache (it masks by position)")
        return None

    def reset(self) -> None:
        """Start a new sequence (buffers keep their memory; positions are hidden by the mask)."""
        self.offset = mx.array(0, dtype=mx.int32)
