"""Old home of :class:`KVCache` and :class:`StaticKVCache`; they live in :mod:`mlx_zeta.nn.cache`."""

from mlx_zeta.nn.cache import KVCache, StaticKVCache

__all__ = ["KVCache", "StaticKVCache"]
