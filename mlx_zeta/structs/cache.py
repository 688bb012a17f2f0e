"""Key/value caches for the model structs: a bounded cache for sliding-window attention."""

from typing import Optional, Tuple

import mlx.core as mx

from mlx_zeta.nn.kv_cache import KVCache

__all__ = ["RotatingKVCache"]


class RotatingKVCache(KVCache):
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
        >>> cache = RotatingKVCache(max_size=4)
        >>> k = v = mx.zeros((1, 2, 6, 8))
        >>> keys, _ = cache.update_and_fetch(k, v)
        >>> cache.offset, cache.size, keys.shape
        (6, 4, (1, 2, 6, 8))

    Reference: Beltagy et al., "Longformer", https://arxiv.org/abs/2004.05150 (sliding
    windows); Jiang et al., "Mistral 7B", https://arxiv.org/abs/2310.06825 (rolling cache).
    """

    def __init__(self, max_size: int):
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
            raise ValueError(f"[RotatingKVCache] expected max_size to be an int >= 1, got {max_size!r}")
        super().__init__()
        self.max_size = max_size

    @property
    def size(self) -> int:
        """Positions currently stored (at most ``max_size``)."""
        return 0 if self.keys is None else self.keys.shape[2]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        """Append ``keys``/``values`` after the kept positions; return kept + new, keep the last ``max_size``."""
        self._check_update(keys, values)
        if self.keys is not None:
            keys = mx.concatenate([self.keys, keys], axis=2)
            values = mx.concatenate([self.values, values], axis=2)
            self.offset += keys.shape[2] - self.keys.shape[2]
        else:
            self.offset += keys.shape[2]
        self.keys = keys[:, :, -self.max_size :]
        self.values = values[:, :, -self.max_size :]
        return keys, values

    @property
    def state(self) -> Tuple[Optional[mx.array], Optional[mx.array]]:
        """The stored positions, ``(keys, values)``, or ``(None, None)`` when empty."""
        return self.keys, self.values
