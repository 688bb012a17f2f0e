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
