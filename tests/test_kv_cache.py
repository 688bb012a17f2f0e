"""The cache protocol of mlx_zeta/nn/cache.py (offset, update_and_fetch, key_length, make_mask,
key_mask) for every cache type: masks against a numpy mask built from positions by hand,
cache-based decoding against full recomputation (Attention alone, a windowed stack, a
duck-typed cache no layer knows by type), and one-line errors for bad arguments."""

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core loads)
import mlx.core as mx
import numpy as np
import pytest
from parity import assert_close

from mlx_zeta.nn import Attention, Cache, KVCache, RotatingKVCache, StaticKVCache
from mlx_zeta.structs import Decoder

DIM, B = 32, 2
MAKERS = {"kv": lambda: KVCache(step=4), "rotating": lambda: RotatingKVCache(max_size=6),
          "static": lambda: StaticKVCache(capacity=16)}


def fill(cache: Cache, positions: int) -> None:
    """Write ``positions`` positions of keys/values (B, 2 heads, positions, 4)."""
    kv = mx.ones((B, 2, positions, 4))
    cache.update_and_fetch(kv, kv)


def reference_mask(q_pos, k_pos, causal, window, written):
    """Keep (query, key) when the key is written and, with causal, not after the query, and,
    with a window w, less than w positions away (one-sided when causal)."""
    keep = np.zeros((len(q_pos), len(k_pos)), bool)
    for i, q in enumerate(q_pos):
        for j, k in enumerate(k_pos):
            d = q - k
            ok = k < written and (not causal or d >= 0)
            keep[i, j] = ok and (window is None or (0 <= d < window if causal else abs(d) < window))
    return keep


# key positions of what update_and_fetch returns after 9 positions, for 3 new queries (9, 10, 11)
KEY_POSITIONS = {"kv": list(range(12)), "rotating": list(range(3, 12)), "static": list(range(16))}


@pytest.mark.parametrize("kind", list(MAKERS))
@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, 4), (False, 3)])
def test_make_mask_matches_positions(kind, causal, window):
    """After 9 positions, the mask for 3 new queries over the keys the next update returns
    equals the mask built from the key positions (kv: 0..11; rotating keeps the last 6, so
    3..11; static: the 16 buffer slots, 12.. unwritten). "causal" means bottom-right causal."""
    cache = MAKERS[kind]()
    fill(cache, 9)
    k_pos = KEY_POSITIONS[kind]
    assert cache.key_length(3) == len(k_pos)
    got = cache.make_mask(3, causal=causal, window=window)
    want = reference_mask([9, 10, 11], k_pos, causal, window, written=12)
    if isinstance(got, str):
        assert got == "causal" and causal and window is None
        got = np.arange(len(k_pos))[None] <= np.arange(3)[:, None] + len(k_pos) - 3  # bottom-right
    elif got is None:
        assert not causal and window is None and kind != "static"
        got = np.ones_like(want)
    np.testing.assert_array_equal(np.array(got), want)
    keys, _ = cache.update_and_fetch(mx.ones((B, 2, 3, 4)), mx.ones((B, 2, 3, 4)))
    assert keys.shape[2] == len(k_pos)


@pytest.mark.parametrize("kind", list(MAKERS))
@pytest.mark.parametrize("causal", [True, False])
def test_attention_decode_equals_full_recompute(rng, kind, causal):
    """Prefill 4, then 8 single tokens through one Attention block: equals the full causal
    forward for every cache type (a non-causal block decoding token by token only sees the
    past; the static cache hides its unwritten slots by position)."""
    full_attn = Attention(DIM, heads=4, kv_heads=2, causal=True)
    attn = Attention(DIM, heads=4, kv_heads=2, causal=causal)
    attn.update(full_attn.parameters())
    x = mx.array(rng.standard_normal((B, 12, DIM)).astype(np.float32))
    cache = MAKERS[kind]() if kind != "rotating" else RotatingKVCache(max_size=12)
    prefill = 4 if causal else 1  # a non-causal prefill would see its own future
    outs = [attn(x[:, :prefill], cache=cache)] + [attn(x[:, t:t + 1], cache=cache) for t in range(prefill, 12)]
    assert_close(mx.concatenate(outs, axis=1), full_attn(x), what=f"{kind} decode")
    assert int(cache.offset) == 12


@pytest.mark.parametrize("kind", list(MAKERS))
def test_windowed_stack_decode_equals_full_recompute(rng, kind):
    """A sliding-window (w=5) rotary decoder fed 3 + 11 tokens through caches of each type
    (the stack's make_cache gives RotatingKVCache; KVCache and StaticKVCache are passed by
    hand): every step equals the last rows of a full windowed forward."""
    layers = Decoder(dim=DIM, depth=2, heads=4, sliding_window=5, position="rotary")
    x = mx.array(rng.standard_normal((B, 14, DIM)).astype(np.float32))
    full = layers(x)
    cache = [MAKERS[kind]() for _ in range(2)] if kind != "rotating" else layers.make_cache()
    assert all(isinstance(c, RotatingKVCache) for c in cache) == (kind == "rotating")
    outs = [layers(x[:, :3], cache=cache)] + [layers(x[:, t:t + 1], cache=cache) for t in range(3, 14)]
    assert_close(mx.concatenate(outs, axis=1), full, what=f"{kind} windowed decode")


class DelegatingCache:
    """A cache that is no subclass of Cache: it answers the protocol by delegation, so a
    layer that checked types would fail with it."""

    def __init__(self):
        self.inner = KVCache()

    offset = property(lambda self: self.inner.offset)
    static = False

    def update_and_fetch(self, keys, values):
        return self.inner.update_and_fetch(keys, values)

    def key_length(self, n):
        return self.inner.key_length(n)

    def make_mask(self, n, causal=False, window=None):
        return self.inner.make_mask(n, causal=causal, window=window)

    def key_mask(self, mask, n, batch, owner):
        return self.inner.key_mask(mask, n, batch, owner)


def test_duck_typed_cache_decodes_like_recompute(rng):
    """Layers ask the protocol only: an unrelated class answering it decodes a T5-biased
    decoder with a left-padded batch (mask over every position so far) like the full forward."""
    layers = Decoder(dim=DIM, depth=2, heads=4, position="t5")
    x = mx.array(rng.standard_normal((B, 7, DIM)).astype(np.float32))
    pad = mx.array(np.array([[True] * 7, [False] * 2 + [True] * 5]))
    full = layers(x, mask=pad)
    cache = [DelegatingCache(), DelegatingCache()]
    outs = [layers(x[:, :4], mask=pad[:, :4], cache=cache)]
    outs += [layers(x[:, t:t + 1], mask=pad[:, :t + 1], cache=cache) for t in range(4, 7)]
    got = mx.concatenate(outs, axis=1)
    assert_close(got[0], full[0], what="unpadded row")
    assert_close(got[1, 2:], full[1, 2:], what="padded row, real positions")
    assert cache[0].offset == 7


def one_line_error(match, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)


def test_bad_arguments_raise_one_line_errors():
    one_line_error(r"^\[KVCache\] expected step >= 1, got 0", KVCache, step=0)
    one_line_error(r"^\[RotatingKVCache\] expected max_size to be an int >= 1, got 0", RotatingKVCache, 0)
    one_line_error(r"^\[StaticKVCache\] expected capacity to be an int >= 1, got '8'", StaticKVCache, "8")
    one_line_error(r"^\[StaticKVCache\] expected keys and values both given", StaticKVCache, 4, keys=mx.zeros((1, 1, 4, 2)))
    for make in MAKERS.values():
        cache = make()
        name = type(cache).__name__
        one_line_error(rf"^\[{name}\] expected n to be an int >= 1, got 0", cache.make_mask, 0)
        one_line_error(rf"^\[{name}\] expected window to be an int >= 1, got 0", cache.make_mask, 2, True, 0)
        one_line_error(rf"^\[{name}\] expected keys and values of shape \(batch, kv_heads, seq, dim\)",
                       cache.update_and_fetch, mx.zeros((1, 2, 3)), mx.zeros((1, 2, 3)))
        fill(cache, 2)
        one_line_error(rf"^\[{name}\] expected \(batch, kv_heads\), key dim, value dim",
                       cache.update_and_fetch, mx.zeros((B, 3, 1, 4)), mx.zeros((B, 3, 1, 4)))
    one_line_error(r"^\[Owner\] expected a boolean mask of shape \(2, 1\) or \(2, 1\) .* got shape \(2, 3\)", KVCache().key_mask,
                   mx.ones((B, 3), mx.bool_), 1, B, "Owner")  # an empty cache has seen nothing: (2, 1) only
    one_line_error(r"^\[Owner\] expected no mask with a StaticKVCache \(it masks by position\)",
                   StaticKVCache(4).key_mask, mx.ones((B, 1), mx.bool_), 1, B, "Owner")
    one_line_error(r"^\[StaticKVCache\] expected at most capacity=4 new positions, got 5",
                   StaticKVCache(4).update_and_fetch, mx.zeros((1, 1, 5, 2)), mx.zeros((1, 1, 5, 2)))


def test_key_mask_pads_cached_positions():
    """A mask over the new positions only counts cached positions as kept; a full-length one
    is cut to the keys a rotating cache returns (its last key_length positions)."""
    cache = RotatingKVCache(max_size=3)
    fill(cache, 5)  # positions 2, 3, 4 kept
    new = mx.array([[True, False], [False, True]])
    np.testing.assert_array_equal(np.array(cache.key_mask(new, 2, B, "t")),
                                  [[True, True, True, True, False], [True, True, True, False, True]])
    full = mx.array(np.arange(14).reshape(2, 7) % 3 == 0)  # positions 0..6
    np.testing.assert_array_equal(np.array(cache.key_mask(full, 2, B, "t")), np.array(full)[:, 2:])


@pytest.mark.parametrize("kind", ["kv", "rotating"])
def test_trim_then_decode_equals_a_cache_that_never_saw_the_trimmed_positions(rng, kind):
    """Law: feeding 7 positions, forgetting the newest 3 and feeding 2 others leaves the same keys/values as
    feeding the first 4 and those 2; the attention output over them is therefore the same too."""
    make = (lambda: KVCache(step=4)) if kind == "kv" else (lambda: RotatingKVCache(max_size=16))
    k = mx.array(rng.standard_normal((1, 2, 9, 8)).astype(np.float32))
    v = mx.array(rng.standard_normal((1, 2, 9, 8)).astype(np.float32))
    trimmed, fresh = make(), make()
    trimmed.update_and_fetch(k[:, :, :7], v[:, :, :7])
    assert trimmed.can_trim(3) and trimmed.trim(3) == 3 and trimmed.offset == 4
    got = trimmed.update_and_fetch(k[:, :, 7:], v[:, :, 7:])
    fresh.update_and_fetch(mx.concatenate([k[:, :, :4], k[:, :, 7:]], axis=2)[:, :, :4],
                           mx.concatenate([v[:, :, :4], v[:, :, 7:]], axis=2)[:, :, :4])
    want = fresh.update_and_fetch(k[:, :, 7:], v[:, :, 7:])
    assert trimmed.offset == fresh.offset == 6
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.array(a), np.array(b))
    assert trimmed.trim(100) == 6 and trimmed.offset == 0  # clipped to what is held


def test_trim_refuses_what_it_cannot_do_exactly():
    rot = RotatingKVCache(max_size=4)
    rot.update_and_fetch(mx.zeros((1, 1, 6, 2)), mx.zeros((1, 1, 6, 2)))  # two positions already dropped
    assert not rot.can_trim(1) and rot.can_trim(0)
    with pytest.raises(ValueError, match=r"^\[RotatingKVCache\] cannot forget 1 cached positions exactly"):
        rot.trim(1)
    with pytest.raises(ValueError, match=r"^\[StaticKVCache\] cannot forget cached positions"):
        StaticKVCache(4).trim(1)
    with pytest.raises(ValueError, match=r"^\[KVCache\] expected n to be an int >= 0"):
        KVCache().trim(-1)
