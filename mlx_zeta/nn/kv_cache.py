"""Key/value cache for incremental (token-by-token) attention decoding."""

from typing import Optional, Tuple

import mlx.core as mx


class KVCache:
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
        >>> cache = KVCache()
        >>> k = v = mx.zeros((1, 2, 3, 8))
        >>> keys, values = cache.update_and_fetch(k, v)
        >>> cache.offset, keys.shape
        (3, (1, 2, 3, 8))
    """

    def __init__(self, step: int = 256):
        if step < 1:
            raise ValueError(f"[KVCache] expected step >= 1, got {step}")
        self.step = step
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0

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

    @property
    def state(self) -> Tuple[Optional[mx.array], Optional[mx.array]]:
        """The filled part of the cache, ``(keys, values)``, or ``(None, None)`` when empty."""
        if self.keys is None:
            return None, None
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]


class StaticKVCache(KVCache):
    r"""Key/value cache of fixed capacity whose position is an array, for graphs with static
    shapes: ``mx.compile``-d decode loops (no recompilation per step) and exports such as a
    Core ML decoder whose cache is model state.

    :meth:`update_and_fetch` writes the new keys/values at ``offset`` (``mx.slice_update`` with
    an array start) and returns the *whole* buffers, :math:`L = \text{capacity}`; unwritten
    positions hold zeros. The attention must therefore hide keys by position rather than by
    length: :meth:`keep_mask` gives query :math:`i` (at position ``offset + i``) the keys
    :math:`j \le \text{offset} + i`, and the layers apply it instead of bottom-right causal
    masking (``masks_positions``). ``offset`` is an int32 scalar array, so the same traced
    graph serves every step. The caller keeps ``offset + new <= capacity`` (writes past the
    end are not checked at run time, which would need a host sync).

    Args:
        capacity (int): positions held.
        keys, values (array, optional): initial buffers :math:`(B, H_{kv}, \text{capacity}, D)`
            (e.g. the state of an exported model). Default: zeros at the first update.
        offset (array, optional): int32 scalar, positions already written. Default: ``0``.

    Example:
        >>> cache = StaticKVCache(capacity=8)
        >>> keys, _ = cache.update_and_fetch(mx.ones((1, 2, 3, 4)), mx.ones((1, 2, 3, 4)))
        >>> keys.shape, cache.offset.item()
        ((1, 2, 8, 4), 3)
    """

    masks_positions = True

    def __init__(self, capacity: int, keys: Optional[mx.array] = None, values: Optional[mx.array] = None,
                 offset: Optional[mx.array] = None):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"[StaticKVCache] expected capacity to be an int >= 1, got {capacity!r}")
        if (keys is None) != (values is None) or (keys is not None and (keys.ndim != 4 or keys.shape[2] != capacity)):
            raise ValueError(f"[StaticKVCache] expected keys and values both given, of shape (batch, kv_heads, "
                             f"{capacity}, dim), or neither")
        super().__init__()
        self.capacity = capacity
        self.keys, self.values = keys, values
        self.offset = mx.array(0, dtype=mx.int32) if offset is None else offset.astype(mx.int32).reshape(())

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

    def keep_mask(self, n: int) -> mx.array:
        """Boolean (n, capacity): query ``i`` of the next ``n`` (at position ``offset + i``) sees
        keys ``j <= offset + i`` (causal; unwritten positions are never seen)."""
        return mx.arange(self.capacity)[None, :] <= (self.offset + mx.arange(n))[:, None]

    def reset(self) -> None:
        """Start a new sequence (buffers keep their memory; positions are hidden by the mask)."""
        self.offset = mx.array(0, dtype=mx.int32)

    @property
    def state(self) -> Tuple[Optional[mx.array], Optional[mx.array]]:
        """The whole buffers ``(keys, values)`` (capacity positions), or ``(None, None)`` before use."""
        return self.keys, self.values
