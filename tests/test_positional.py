"""mlx_zeta.nn.positional against torch references from the papers' math (tests/reference/positional.py)
and, where the same math exists there, against transformers' Llama rotary, Bloom ALiBi and T5 buckets."""

import math

import mlx_zeta  # noqa: F401
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from parity import assert_close, check_parity, to_torch
from reference.positional import (
    AbsolutePositionalEmbeddingRef,
    RelativePositionBiasRef,
    RotaryQKRef,
    ScaledSinusoidalEmbeddingRef,
    alibi_bias,
    alibi_slopes,
    rope_angles,
    sinusoid_table,
    t5_bucket,
    xpos_scale,
)

from mlx_zeta.kernels import relative_position_bucket
from mlx_zeta.nn.positional import (
    AbsolutePositionalEmbedding,
    AlibiPositionalBias,
    RelativePositionBias,
    RotaryEmbedding,
    ScaledSinusoidalEmbedding,
    apply_rotary_pos_emb,
)

DTYPES = [mx.float32, mx.float16, mx.bfloat16]


# ============================================================================ rotary


class RotaryQK(nn.Module):
    """Rotates q with (freqs, scale) and k with (freqs, scale ** -1); returns both side by side."""

    def __init__(self, rot_dim: int, use_xpos: bool, offset: int = 0, **kwargs):
        super().__init__()
        self.rotary = RotaryEmbedding(rot_dim, use_xpos=use_xpos, **kwargs)
        self.offset = offset

    def __call__(self, q: mx.array, k: mx.array) -> mx.array:
        freqs, scale = self.rotary(q.shape[-2], offset=self.offset)
        return mx.concatenate(
            [apply_rotary_pos_emb(q, freqs, scale), apply_rotary_pos_emb(k, freqs, scale**-1)], axis=-1
        )


@pytest.mark.parametrize("use_xpos", [False, True])
@pytest.mark.parametrize("offset", [0, 5])
@pytest.mark.parametrize("interpolation_factor,base_rescale_factor", [(1.0, 1.0), (2.0, 1.0), (1.0, 4.0)])
def test_rotary_freqs_and_scale_match_reference(use_xpos, offset, interpolation_factor, base_rescale_factor):
    dim, seq = 16, 12
    rotary = RotaryEmbedding(
        dim, use_xpos=use_xpos, scale_base=8, interpolation_factor=interpolation_factor,
        base_rescale_factor=base_rescale_factor,
    )
    freqs, scale = rotary(seq, offset=offset)
    pos = torch.arange(offset, offset + seq)
    base = 10000.0 * base_rescale_factor ** (dim / (dim - 2))  # NTK-aware base
    ang = rope_angles(dim, pos, base, interpolation_factor)
    assert_close(freqs, torch.cat([ang, ang], -1), what="freqs")
    if not use_xpos:
        assert scale == 1.0
        return
    # scale_base=8 (not 512) so the scale is far from 1 and the check has teeth.
    s = xpos_scale(dim, pos, (offset + seq) // 2, 8)
    assert_close(scale, torch.cat([s, s], -1), what="xpos scale")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_xpos", [False, True])
@pytest.mark.parametrize("rot_dim", [16, 8])  # 8 < head dim 16: partial rotary, the rest passes through
@pytest.mark.parametrize("offset", [0, 3])
def test_rotary_apply_parity(dtype, use_xpos, rot_dim, offset, rng):
    q = rng.standard_normal((2, 2, 10, 16)).astype(np.float32)
    k = rng.standard_normal((2, 2, 10, 16)).astype(np.float32)
    check_parity(
        RotaryQK(rot_dim, use_xpos, offset, scale_base=16),
        RotaryQKRef(rot_dim, use_xpos, scale_base=16, offset=offset),
        [q, k],
        dtype=dtype,
    )


def test_rotary_hand_values():
    # dim 4, base 100: inv_freq = 100^(-0/4), 100^(-2/4) = [1, 0.1]; position 2 -> angles [2, 0.2] twice.
    freqs, _ = RotaryEmbedding(4, base=100)(3)
    np.testing.assert_allclose(np.array(freqs[2]), [2.0, 0.2, 2.0, 0.2], rtol=1e-6)
    # xPos dim 4: zeta = [(0 + 1.6)/5.6, (2 + 1.6)/5.6] = [2/7, 9/14]; seq 4 -> centre 2,
    # scale_base 2: position 0 has power (0 - 2)/2 = -1 -> [7/2, 14/9, 7/2, 14/9].
    _, scale = RotaryEmbedding(4, use_xpos=True, scale_base=2)(4)
    np.testing.assert_allclose(np.array(scale[0]), [3.5, 14 / 9, 3.5, 14 / 9], rtol=1e-6)
    # Rotating e_0 by pi/2 in the (0, 2) plane: rotate_half([1,0,0,0]) = [0,0,1,0],
    # so out = e_0 cos(pi/2) + e_2 sin(pi/2) = e_2.
    out = apply_rotary_pos_emb(mx.array([[1.0, 0, 0, 0]]), mx.array([[math.pi / 2, 0, math.pi / 2, 0]]))
    np.testing.assert_allclose(np.array(out), [[0, 0, 1, 0]], atol=1e-7)


@pytest.mark.parametrize("offset", [0, 4])
def test_rotary_matches_transformers_llama(offset, rng):
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama

    head_dim, seq = 16, 8
    config = LlamaConfig(hidden_size=32, num_attention_heads=2, head_dim=head_dim, rope_theta=500.0)
    llama_rotary = modeling_llama.LlamaRotaryEmbedding(config)
    q = rng.standard_normal((2, 2, seq, head_dim)).astype(np.float32)
    k = rng.standard_normal((2, 2, seq, head_dim)).astype(np.float32)
    position_ids = torch.arange(offset, offset + seq)[None].expand(2, -1)
    cos, sin = llama_rotary(torch.from_numpy(q), position_ids)
    q_ref, k_ref = modeling_llama.apply_rotary_pos_emb(torch.from_numpy(q), torch.from_numpy(k), cos, sin)

    freqs, _ = RotaryEmbedding(head_dim, base=500.0)(seq, offset=offset)
    assert_close(mx.cos(freqs), cos[0], what="cos")
    assert_close(apply_rotary_pos_emb(mx.array(q), freqs), q_ref, what="q")
    assert_close(apply_rotary_pos_emb(mx.array(k), freqs), k_ref, what="k")


@pytest.mark.parametrize("use_xpos", [False, True])
def test_rotary_scores_depend_only_on_relative_position(use_xpos, rng):
    # The same q at every position m and the same k at every position n: with R(p) the
    # rotation (and xPos scales s_m on q, 1/s_n on k), <R(m) q s_m, R(n) k / s_n> is a
    # function of m - n, so the score matrix is Toeplitz: S[m, n] == S[m+1, n+1].
    dim, seq = 16, 12
    freqs, scale = RotaryEmbedding(dim, use_xpos=use_xpos, scale_base=8)(seq)
    q = mx.broadcast_to(mx.array(rng.standard_normal(dim).astype(np.float32)), (seq, dim))
    k = mx.broadcast_to(mx.array(rng.standard_normal(dim).astype(np.float32)), (seq, dim))
    scores = np.array(apply_rotary_pos_emb(q, freqs, scale) @ apply_rotary_pos_emb(k, freqs, scale**-1).T)
    np.testing.assert_allclose(scores[1:, 1:], scores[:-1, :-1], rtol=1e-4, atol=1e-5)
    # And without xPos the rotation is orthogonal: norms are kept.
    if not use_xpos:
        rotated = apply_rotary_pos_emb(q, freqs)
        np.testing.assert_allclose(np.linalg.norm(np.array(rotated), axis=-1), np.linalg.norm(np.array(q), axis=-1), rtol=1e-5)


@pytest.mark.parametrize("use_xpos", [False, True])
def test_rotary_offset_slice_equals_slice_of_full(use_xpos, rng):
    dim, total = 16, 12
    t = mx.array(rng.standard_normal((2, total, dim)).astype(np.float32))
    rotary = RotaryEmbedding(dim, use_xpos=use_xpos, scale_base=8)
    full_f, full_s = rotary(total)
    full = apply_rotary_pos_emb(t, full_f, full_s)
    # Suffix (the usual KV-cache step): default centre (offset + seq_len) // 2 == total // 2.
    f, s = rotary(4, offset=total - 4)
    assert_close(apply_rotary_pos_emb(t[:, -4:], f, s), full[:, -4:], what="suffix")
    # Middle slice: with xPos the caller pins the centre to the full sequence's.
    f, s = rotary(5, offset=3, center=total // 2)
    assert_close(apply_rotary_pos_emb(t[:, 3:8], f, s), full[:, 3:8], what="middle slice")
    # A q shorter than freqs uses the last rows (zeta's decoding convention).
    assert_close(apply_rotary_pos_emb(t[:, -3:], full_f, full_s), full[:, -3:], what="short q")


def test_rotary_errors():
    with pytest.raises(ValueError, match=r"\[RotaryEmbedding\] expected an even dim, got 7"):
        RotaryEmbedding(7)
    with pytest.raises(ValueError, match=r"\[RotaryEmbedding\] expected interpolation_factor >= 1"):
        RotaryEmbedding(8, interpolation_factor=0.5)
    with pytest.raises(ValueError, match=r"\[RotaryEmbedding\] base_rescale_factor needs dim > 2"):
        RotaryEmbedding(2, base_rescale_factor=2.0)
    with pytest.raises(ValueError, match=r"\[RotaryEmbedding\] expected seq_len to be an int >= 1, got 0"):
        RotaryEmbedding(8)(0)
    with pytest.raises(ValueError, match=r"\[RotaryEmbedding\] expected offset to be an int >= 0, got -1"):
        RotaryEmbedding(8)(4, offset=-1)
    freqs, _ = RotaryEmbedding(8)(4)
    with pytest.raises(ValueError, match=r"\[apply_rotary_pos_emb\] expected t of rank >= 2"):
        apply_rotary_pos_emb(mx.zeros((8,)), freqs)
    with pytest.raises(ValueError, match=r"\[apply_rotary_pos_emb\] freqs cover 4 positions, t has 6"):
        apply_rotary_pos_emb(mx.zeros((6, 8)), freqs)
    with pytest.raises(ValueError, match=r"\[apply_rotary_pos_emb\] expected an even freqs dim <= t's last dim 4"):
        apply_rotary_pos_emb(mx.zeros((4, 4)), freqs)


# ============================================================================ ALiBi


def test_alibi_slopes_hand_values():
    # 8 heads: 2^(-8h/8) = 2^-h, h = 1..8 -> 1/2 .. 1/256.
    assert AlibiPositionalBias._get_slopes(8) == [2.0**-h for h in range(1, 9)]
    # 6 heads: the 4-head slopes 2^-2, 2^-4, 2^-6, 2^-8, then the 8-head slopes
    # 2^-1, 2^-3 (every other one, first 6 - 4 = 2).
    assert AlibiPositionalBias._get_slopes(6) == [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 5, 6, 8, 12, 16, 24])
def test_alibi_slopes_match_paper_and_bloom(heads):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    ours = np.array(AlibiPositionalBias(heads)._slopes)
    np.testing.assert_allclose(ours, alibi_slopes(heads), rtol=1e-6)
    # Bloom's tensor is slope_h * key_position; position 1 of a 2-token mask is the slope.
    bloom = build_alibi_tensor(torch.ones(1, 2), heads, torch.float32)[:, 0, 1]
    np.testing.assert_allclose(ours, bloom.numpy(), rtol=1e-6)


@pytest.mark.parametrize("heads,total_heads,i,j", [(4, 4, 5, 5), (3, 8, 3, 7), (6, 6, 1, 9), (8, 8, 9, 9)])
def test_alibi_bias_matches_reference(heads, total_heads, i, j):
    bias = AlibiPositionalBias(heads, total_heads=total_heads)(i, j)
    assert_close(bias, alibi_bias(heads, total_heads, i, j), what="alibi bias")


def test_alibi_bias_hand_values():
    # 2 heads: slopes 2^-4, 2^-8. One query, three keys: the query sits at key position 2
    # (bottom-right), distances 2, 1, 0 -> head 0: [-2/16, -1/16, 0].
    bias = np.array(AlibiPositionalBias(2, num_heads=3)(1, 3))
    np.testing.assert_allclose(bias[0, 0], [-2 / 16, -1 / 16, 0.0])
    np.testing.assert_allclose(bias[1, 0], [-2 / 256, -1 / 256, 0.0])
    np.testing.assert_array_equal(bias[2], 0.0)  # a non-ALiBi head


class AlibiAttention(nn.Module):
    """softmax(scores + ALiBi) over keys, the bias cast to the scores' dtype."""

    def __init__(self, heads: int):
        super().__init__()
        self.alibi = AlibiPositionalBias(heads)

    def __call__(self, scores: mx.array) -> mx.array:
        bias = self.alibi(scores.shape[-2], scores.shape[-1]).astype(scores.dtype)
        return mx.softmax(scores + bias, axis=-1, precise=True)


class AlibiAttentionRef(torch.nn.Module):
    def __init__(self, heads: int):
        super().__init__()
        self.heads = heads

    def forward(self, scores):
        bias = alibi_bias(self.heads, self.heads, scores.shape[-2], scores.shape[-1]).float()
        return torch.softmax(scores + bias, dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_alibi_attention_parity(dtype, rng):
    # The bias enters attention through the scores: forward and d/dscores in each dtype.
    scores = 2 * rng.standard_normal((2, 6, 5, 8)).astype(np.float32)
    check_parity(AlibiAttention(6), AlibiAttentionRef(6), [scores], dtype=dtype)


def test_alibi_causal_softmax_equals_bloom(rng):
    # Bloom adds slope * j; ours adds -slope * (i - j) = slope * j - slope * i on the
    # causal part: a per-row constant, so the causally masked softmax is the same.
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    heads, n = 12, 7
    scores = rng.standard_normal((heads, n, n)).astype(np.float32)
    mask = np.triu(np.full((n, n), -np.inf, dtype=np.float32), 1)
    ours = mx.softmax(mx.array(scores + mask) + AlibiPositionalBias(heads)(n, n), axis=-1)
    bloom = build_alibi_tensor(torch.ones(1, n), heads, torch.float32)  # (heads, 1, n)
    ref = torch.softmax(torch.from_numpy(scores + mask) + bloom, dim=-1)
    assert_close(ours, ref, what="causal attention")


def test_alibi_errors():
    with pytest.raises(ValueError, match=r"\[AlibiPositionalBias\] expected total_heads to be an int >= 8, got 4"):
        AlibiPositionalBias(8, total_heads=4)
    with pytest.raises(ValueError, match=r"\[AlibiPositionalBias\] total_heads 8 and num_heads 6 disagree"):
        AlibiPositionalBias(4, total_heads=8, num_heads=6)
    with pytest.raises(ValueError, match=r"\[AlibiPositionalBias\] expected i to be an int >= 1, got 0"):
        AlibiPositionalBias(4)(0, 3)


# ============================================================================ T5 relative position bias


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 20), (8, 10)])
def test_t5_buckets_match_transformers_and_reference(bidirectional, num_buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-300, 301)  # well past max_distance on both sides
    ours = np.array(
        relative_position_bucket(mx.array(rel), bidirectional, num_buckets, max_distance)
    )
    hf = T5Attention._relative_position_bucket(torch.from_numpy(rel), bidirectional, num_buckets, max_distance)
    np.testing.assert_array_equal(ours, hf.numpy())
    np.testing.assert_array_equal(ours, t5_bucket(torch.from_numpy(rel), bidirectional, num_buckets, max_distance).numpy())


def test_t5_bucket_hand_values():
    # Bidirectional, 32 buckets, max_distance 128: 16 per direction, 8 exact.
    # r = key - query = +20: upper half (offset 16); 20 >= 8 so
    # 8 + floor(ln(20/8) / ln(128/8) * 8) = 8 + floor(0.9163 / 2.7726 * 8 = 2.64) = 10 -> 26.
    # r = -20 -> 10; r = +3 -> 16 + 3; r = -3 -> 3; r = -1000 -> capped at 15.
    rel = mx.array([20, -20, 3, -3, -1000, 0])
    np.testing.assert_array_equal(np.array(relative_position_bucket(rel)), [26, 10, 19, 3, 15, 0])
    # Unidirectional, 32 buckets: keys after the query -> 0; r = -20: 16 exact, so
    # 16 + floor(ln(20/16) / ln(128/16) * 16) = 16 + floor(0.2231 / 2.0794 * 16 = 1.72) = 17.
    uni = relative_position_bucket(mx.array([5, -20]), bidirectional=False)
    np.testing.assert_array_equal(np.array(uni), [0, 17])


@pytest.mark.parametrize("is_decoder", [False, True])
@pytest.mark.parametrize("step", [0, 9])
def test_t5_compute_bias_matches_transformers(is_decoder, step):
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5Attention

    config = T5Config(
        d_model=16, d_kv=4, num_heads=4, relative_attention_num_buckets=16,
        relative_attention_max_distance=12, is_decoder=is_decoder,
    )
    hf = T5Attention(config, has_relative_attention_bias=True).eval()
    ours = RelativePositionBias(bidirectional=not is_decoder, num_buckets=16, max_distance=12, num_heads=4)
    with torch.no_grad():
        hf.relative_attention_bias.weight.copy_(to_torch(ours.relative_attention_bias.weight, "cpu"))
    # klen 16 + step 9: distances up to 24, beyond max_distance 12.
    expected = hf.compute_bias(5, 16, past_seen_tokens=step)
    assert_close(ours.compute_bias(5, 16, step=step), expected, what="compute_bias")
    assert_close(ours(2, 5, 16, step=step), expected.expand(2, -1, -1, -1), what="batched bias")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_bias_parity(dtype, bidirectional, rng):
    # Driven as it is used: added to attention scores (2, heads, qlen, klen).
    kwargs = dict(bidirectional=bidirectional, num_buckets=16, max_distance=10, num_heads=4)
    scores = rng.standard_normal((2, 4, 6, 14)).astype(np.float32)
    check_parity(
        RelativePositionBias(**kwargs),
        RelativePositionBiasRef(**kwargs),
        [scores],
        dtype=dtype,
        mlx_call=lambda m, s: s + m(2, 6, 14, step=3),
        torch_call=lambda m, s: s + m(2, 6, 14, step=3),
    )


def test_relative_position_bias_errors():
    with pytest.raises(ValueError, match=r"\[RelativePositionBias\] expected max_distance > 8"):
        RelativePositionBias(num_buckets=32, max_distance=8)
    with pytest.raises(ValueError, match=r"\[RelativePositionBias\] expected qlen to be an int >= 1, got 0"):
        RelativePositionBias()(2, 0, 4)
    with pytest.raises(ValueError, match=r"\[RelativePositionBias\] expected batch_size to be an int >= 1"):
        RelativePositionBias()(0, 3, 4)


# ============================================================================ absolute / scaled sinusoidal


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("l2norm_embed", [False, True])
@pytest.mark.parametrize("with_pos", [False, True])
def test_absolute_positional_embedding_parity(dtype, l2norm_embed, with_pos, rng):
    # Driven as it is used: token embeddings x (2, 10, 32) plus the position embedding.
    x = rng.standard_normal((2, 10, 32)).astype(np.float32)
    pos = rng.integers(0, 16, size=(2, 10)) if with_pos else None
    check_parity(
        AbsolutePositionalEmbedding(32, 16, l2norm_embed=l2norm_embed),
        AbsolutePositionalEmbeddingRef(32, 16, l2norm_embed=l2norm_embed),
        [x],
        dtype=dtype,
        mlx_call=lambda m, x: x + m(x, None if pos is None else mx.array(pos)),
        torch_call=lambda m, x: x + m(x, None if pos is None else torch.from_numpy(pos)),
    )


def test_absolute_positional_embedding_values():
    emb = AbsolutePositionalEmbedding(16, 12)
    x = mx.zeros((2, 5, 16))  # embeddings are accepted too; only the length counts
    np.testing.assert_allclose(np.array(emb(x)), np.array(emb.emb.weight[:5]) / 4.0, rtol=1e-6)  # 16 ** -0.5 = 1/4
    unit = AbsolutePositionalEmbedding(16, 12, l2norm_embed=True)(x)
    np.testing.assert_allclose(np.linalg.norm(np.array(unit), axis=-1), 1.0, rtol=1e-6)


def test_absolute_positional_embedding_errors():
    emb = AbsolutePositionalEmbedding(8, 4)
    with pytest.raises(ValueError, match=r"\[AbsolutePositionalEmbedding\] expected seq_len <= max_seq_len 4, got 5"):
        emb(mx.zeros((2, 5), dtype=mx.int32))
    with pytest.raises(ValueError, match=r"\[AbsolutePositionalEmbedding\] expected x of shape \(batch, seq\)"):
        emb(mx.zeros((3,), dtype=mx.int32))
    with pytest.raises(ValueError, match=r"\[AbsolutePositionalEmbedding\] expected integer pos"):
        emb(mx.zeros((2, 3), dtype=mx.int32), pos=mx.zeros((3,)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_pos", [False, True])
def test_scaled_sinusoidal_embedding_parity(dtype, with_pos, rng):
    # Driven as it is used: token embeddings x (2, 12, 32) plus the position embedding.
    x = rng.standard_normal((2, 12, 32)).astype(np.float32)
    pos = rng.permutation(24)[:12] if with_pos else None
    mlx_block = ScaledSinusoidalEmbedding(32, theta=100)
    mlx_block.scale = mx.array([0.7])  # away from the init, so a wrong scale would show
    check_parity(
        mlx_block,
        ScaledSinusoidalEmbeddingRef(32, theta=100),
        [x],
        dtype=dtype,
        mlx_call=lambda m, x: x + m(x, None if pos is None else mx.array(pos)),
        torch_call=lambda m, x: x + m(x, None if pos is None else torch.from_numpy(pos)),
    )


def test_scaled_sinusoidal_embedding_values():
    emb = ScaledSinusoidalEmbedding(16)
    np.testing.assert_allclose(np.array(emb.scale), [0.25])  # 16 ** -0.5
    out = emb(mx.zeros((2, 6)))
    # Position 0: sin 0 = 0 and cos 0 = 1 -> [0]*8 + [0.25]*8.
    np.testing.assert_allclose(np.array(out[0]), [0.0] * 8 + [0.25] * 8, atol=1e-7)
    np.testing.assert_allclose(np.array(out), 0.25 * sinusoid_table(6, 16), rtol=1e-5, atol=1e-6)
    # seq_start_pos shifts each sequence's positions: row b is the table at p - start_b.
    shifted = emb(mx.zeros((2, 6)), seq_start_pos=mx.array([0, 2]))
    assert_close(shifted[0], out)
    assert_close(shifted[1, 2:], out[:4], what="shifted")


def test_scaled_sinusoidal_embedding_errors():
    with pytest.raises(ValueError, match=r"\[ScaledSinusoidalEmbedding\] expected an even dim, got 7"):
        ScaledSinusoidalEmbedding(7)
    emb = ScaledSinusoidalEmbedding(8)
    with pytest.raises(ValueError, match=r"\[ScaledSinusoidalEmbedding\] expected x of shape \(batch, seq\)"):
        emb(mx.zeros((1, 2, 3, 8)))
    with pytest.raises(ValueError, match=r"\[ScaledSinusoidalEmbedding\] expected seq_start_pos of shape \(2,\)"):
        emb(mx.zeros((2, 4)), seq_start_pos=mx.array([0, 1, 2]))


def test_rotary_keeps_input_dtype():
    # cos, sin and the xPos scale are cast to t's dtype: a float16 model stays float16.
    freqs, scale = RotaryEmbedding(8, use_xpos=True)(4)
    t = mx.ones((2, 4, 8), dtype=mx.float16)
    assert apply_rotary_pos_emb(t, freqs, scale).dtype == mx.float16
    assert apply_rotary_pos_emb(t, freqs, mx.array(2.0)).dtype == mx.float16
    with pytest.raises(ValueError, match=r"\[apply_rotary_pos_emb\] expected scale \(>= 4, 8\), got \(4, 6\)"):
        apply_rotary_pos_emb(t, freqs, scale[:, :6])


@pytest.mark.parametrize("total_heads", [4, 6])
def test_alibi_position_bias_is_the_same_bias_as_o_h_data(total_heads):
    """AlibiPositionalBias.position_bias() (slopes, zero for heads without ALiBi) materialises to the
    module's own (heads, i, j) bias, for queries aligned to the end of the keys."""
    alibi = AlibiPositionalBias(heads=4, total_heads=total_heads)
    data = alibi.position_bias()
    assert data.alibi_slopes.shape == (total_heads,) and data.t5_table is None
    for i, j in [(1, 1), (3, 7), (7, 7)]:
        np.testing.assert_array_equal(np.array(data.materialize(i, j)), np.array(alibi(i, j)))
    # hand-derived: 4 heads have slopes 2^-2, 2^-4, 2^-6, 2^-8; head 0, query 0 of 1, key 0 of 3: -(1/4) * 2
    assert data.materialize(1, 3)[0, 0, 0].item() == -0.5


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_relative_position_bias_is_the_same_bias_as_o_l_data(bidirectional, dtype):
    """RelativePositionBias.position_bias() (table + buckets of the q_len + k_len - 1 offsets)
    materialises to compute_bias()[0] in the table's dtype, with the same gradient for the table."""
    rel = RelativePositionBias(bidirectional=bidirectional, num_buckets=8, max_distance=16, num_heads=3)
    rel.set_dtype(dtype)
    for q_len, k_len, step in [(1, 9, 8), (5, 5, 0), (4, 11, 7)]:
        data = rel.position_bias(q_len, k_len, step=step)
        assert data.t5_buckets.shape == (q_len + k_len - 1,)
        got, want = data.materialize(q_len, k_len), rel.compute_bias(q_len, k_len, step=step)[0]
        assert got.dtype == want.dtype == dtype
        np.testing.assert_array_equal(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)))
    w = mx.random.normal((4, 11, 3))

    def via(fn):
        def loss(params):
            rel.update(params)
            return (fn().astype(mx.float32) * w.transpose(2, 0, 1)).sum()
        return mx.grad(loss)(rel.trainable_parameters())["relative_attention_bias"]["weight"]

    g_data = via(lambda: rel.position_bias(4, 11, step=7).materialize(4, 11))
    g_mod = via(lambda: rel.compute_bias(4, 11, step=7)[0])
    np.testing.assert_allclose(np.array(g_data.astype(mx.float32)), np.array(g_mod.astype(mx.float32)), rtol=1e-2)
