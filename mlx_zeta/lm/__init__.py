"""Language-model front door: load, generate, prompt caches, batched generation."""

from mlx_zeta.lm.kv import WindowedKVCache, load_caches, make_caches, save_caches

__all__ = ["WindowedKVCache", "make_caches", "save_caches", "load_caches"]
