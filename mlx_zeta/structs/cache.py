"""Old home of :class:`RotatingKVCache`; every cache lives in :mod:`mlx_zeta.nn.cache`."""

from mlx_zeta.nn.cache import RotatingKVCache

__all__ = ["RotatingKVCache"]
