"""mlx_zeta.quant.mmless (Keras-MatMulLess's layer set on BitLinear): each layer's output and
parameter/input gradients against a torch reference written from the papers (reference/matmulfree.py),
the LRU's complex recurrence against a hand loop in complex numpy, and argument errors."""

import math

import mlx_zeta  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from parity import assert_close, check_parity, to_numpy

from mlx_zeta.quant.matmulfree import complex_linear_scan
from mlx_zeta.quant.mmless import (GLU, AFTBlock, BilinearGLU, BitGRU, BitLRU, GeGLU, PatchEmbedding, ReGLU, SeGLU,
                                   SwiGLU, TokenEmbedding)
from reference.matmulfree import AFTBlockRef, GLURef, LRURef, MLGRURef, PatchEmbeddingRef, TokenEmbeddingRef

DIM = 16


def _x(rng, shape=(2, 7, DIM)):
    return rng.standard_normal(shape).astype(np.float32)


def _randomise(module, rng, keys=("norm.weight", "bias", "pos_bias", "pos_emb")):
    """Move constant-initialised parameters (norm gains, biases, position tables) off their init."""
    flat = [(k, mx.array(to_numpy(v).astype(np.float32) + 0.3 * rng.standard_normal(v.shape).astype(np.float32)))
            for k, v in tree_flatten(module.parameters()) if any(k.endswith(s) for s in keys)]
    module.update(tree_unflatten(flat))
    return module


GLUS = {GLU: "sigmoid", GeGLU: "gelu", ReGLU: "relu", SeGLU: "selu", SwiGLU: "silu", BilinearGLU: "identity"}


# ReLU and SELU have a kink at 0, and ternary weights times int8 activations make an exactly zero
# integer accumulation common (a few of the 336 gate entries here). BitLinear's straight-through
# forward x + sg(q - x) turns that 0 into +-1 ulp noise whose sign differs between frameworks, so
# the kinked gates' derivative (0 or 1) differs there. A random gate bias moves pre-activations
# off 0; the smooth gates are also tested without bias.
KINKED = (ReGLU, SeGLU)
GLU_CASES = [(cls, bias) for cls in GLUS for bias in (False, True) if bias or cls not in KINKED]


@pytest.mark.parametrize("cls,bias", GLU_CASES, ids=[f"{c.__name__}-bias={b}" for c, b in GLU_CASES])
def test_glu_variants_parity(cls, bias, rng):
    layer = _randomise(cls(DIM, 24, dim_out=12, bias=bias), rng)
    check_parity(layer, GLURef(DIM, 24, 12, act=GLUS[cls], bias=bias), [_x(rng)])


def test_glu_default_width_and_gate():
    # 2/3 * 4 * 16 = 42 -> rounded up to a multiple of 8
    assert SwiGLU(DIM).gate_proj.weight.shape == (48, DIM)
    assert GeGLU(DIM, hidden_ratio=2).hidden_dim == 24
    # each variant's gate: relu(-1, 2) = (0, 2); identity keeps -1; sigmoid(0) = 0.5
    h = mx.array([-1.0, 2.0])
    assert ReGLU(DIM, 8).activation(h).tolist() == [0.0, 2.0]
    assert BilinearGLU(DIM, 8).activation(h).tolist() == [-1.0, 2.0]
    assert GLU(DIM, 8).activation(mx.array(0.0)).item() == 0.5


@pytest.mark.parametrize("fully_mml", [False, True])
def test_bit_gru_parity(fully_mml, rng):
    layer = _randomise(BitGRU(DIM, 12, fully_mml=fully_mml), rng)
    names = {k for k, _ in tree_flatten(layer.parameters())}
    assert ("g_proj.norm.weight" in names) == fully_mml  # W_g, W_o float unless fully_mml
    check_parity(layer, MLGRURef(DIM, 12, 12, bias=True, ternary_output=fully_mml), [_x(rng)])


@pytest.mark.parametrize("fully_mml", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_bit_lru_parity(fully_mml, bias, rng):
    # the gradients of nu_log / theta_log / gamma_log sum over batch, time and the complex
    # chain rule: up to 2.6x the harness tolerance from summation order (worst of 12 seeds)
    layer = _randomise(BitLRU(DIM, 12, 10, fully_mml=fully_mml, bias=bias), rng)
    check_parity(layer, LRURef(DIM, 12, 10, fully_mml=fully_mml, bias=bias), [_x(rng)], grad_scale=4.0)


def test_bit_lru_matches_complex_numpy_loop(rng):
    # long-memory eigenvalues (|lambda| in [0.95, 0.999]) over 200 steps
    layer = BitLRU(DIM, 12, 10, r_min=0.95, r_max=0.999)
    u = mx.array(_x(rng, (2, 200, DIM)))
    lam = np.exp(-np.exp(to_numpy(layer.nu_log)) + 1j * np.exp(to_numpy(layer.theta_log)))
    assert (np.abs(lam) >= 0.95 - 1e-6).all() and (np.abs(lam) <= 0.999 + 1e-6).all()
    # the initial normalisation is sqrt(1 - |lambda|^2)
    np.testing.assert_allclose(np.exp(to_numpy(layer.gamma_log)), np.sqrt(1 - np.abs(lam) ** 2), rtol=1e-5)
    bu = np.exp(to_numpy(layer.gamma_log)) * (to_numpy(layer.B_re(u)) + 1j * to_numpy(layer.B_im(u)))
    x, ys = np.zeros(bu[:, 0].shape, complex), []
    c_re, c_im, d = (to_numpy(m.weight) for m in (layer.C_re, layer.C_im, layer.D))
    for k in range(u.shape[1]):
        x = lam * x + bu[:, k]
        ys.append(x.real @ c_re.T - x.imag @ c_im.T + to_numpy(u[:, k]) @ d.T)
    assert_close(layer(u), np.stack(ys, axis=1), scale=5.0)  # 200 float32 steps, |y| up to ~10


@pytest.mark.parametrize("length", [1, 5, 300])
def test_complex_scan_matches_numpy_loop(length, rng):
    # |lambda| from exp(-2) to exp(-1e-4) (memory over ~10^4 steps), every phase; inputs rounded
    # to complex64 first so the numpy loop (complex128) sees exactly what the scan sees
    lam = np.exp(-rng.uniform(1e-4, 2.0, 6) + 1j * rng.uniform(0, 2 * math.pi, 6)).astype(np.complex64)
    b = (rng.standard_normal((2, length, 6)) + 1j * rng.standard_normal((2, length, 6))).astype(np.complex64)
    h0 = (rng.standard_normal((2, 6)) + 1j * rng.standard_normal((2, 6))).astype(np.complex64)
    f32 = lambda z: mx.array(z.astype(np.float32))  # noqa: E731
    pair = lambda z: (f32(z.real), f32(z.imag))  # noqa: E731
    re, im = complex_linear_scan(pair(lam), pair(b), pair(h0))
    h, out = h0.astype(np.complex128), []
    for t in range(length):
        h = lam.astype(np.complex128) * h + b[:, t]
        out.append(h)
    out = np.stack(out, axis=1)
    assert np.abs(to_numpy(re) + 1j * to_numpy(im) - out).max() <= 1e-4 * max(1.0, np.abs(out).max())


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("full", [False, True], ids=["simple", "full"])
def test_aft_block_parity(causal, full, rng):
    # gradients: up to 1.05x the harness tolerance from summation order (worst of 12 seeds x 4 variants)
    block = _randomise(AFTBlock(DIM, 24, max_seq_len=9 if full else None, causal=causal), rng)
    check_parity(block, AFTBlockRef(DIM, 24, max_seq_len=9 if full else None, causal=causal), [_x(rng)],
                 grad_scale=2.0)


def test_aft_causal_ignores_the_future(rng):
    block = _randomise(AFTBlock(DIM, 24, max_seq_len=8), rng)
    x = mx.array(_x(rng, (1, 8, DIM)))
    y = mx.concatenate([x[:, :5], mx.array(_x(rng, (1, 3, DIM)))], axis=1)
    assert np.abs(to_numpy(block(x)[:, :5]) - to_numpy(block(y)[:, :5])).max() <= 1e-6


@pytest.mark.parametrize("max_len", [None, 10])
def test_token_embedding_parity(max_len, rng):
    layer = TokenEmbedding(30, DIM, max_len=max_len)
    tokens = rng.integers(0, 30, (2, 7))
    check_parity(layer, TokenEmbeddingRef(30, DIM, max_len), [tokens])


@pytest.mark.parametrize("num_patches", [None, 6])
def test_patch_embedding_parity(num_patches, rng):
    layer = _randomise(PatchEmbedding(2, 3, DIM, num_patches=num_patches), rng)
    check_parity(layer, PatchEmbeddingRef(2, 3, DIM, num_patches), [_x(rng, (2, 4, 6, 3))])


def test_patchify_order():
    # a 4x4 single-channel image 0..15 with 2x2 patches: patch 1 (top right) holds 2, 3, 6, 7
    img = mx.arange(16, dtype=mx.float32).reshape(1, 4, 4, 1)
    patches = PatchEmbedding(2, 1, 4).patchify(img)
    assert patches.shape == (1, 4, 4) and patches[0, 1].tolist() == [2.0, 3.0, 6.0, 7.0]


@pytest.mark.parametrize("make,message", [
    (lambda: SwiGLU(DIM, hidden_ratio=0), r"^\[SwiGLU\] expected hidden_ratio > 0"),
    (lambda: GeGLU(0), r"^\[GeGLU\] expected dim to be an int >= 1, got 0"),
    (lambda: BitGRU(DIM, 0), r"^\[BitGRU\] expected units to be an int >= 1, got 0"),
    (lambda: BitLRU(DIM, 8, 4, r_min=0.9, r_max=0.5), r"^\[BitLRU\] expected 0 <= r_min < r_max <= 1"),
    (lambda: BitLRU(DIM, 8, 0), r"^\[BitLRU\] expected state_dim"),
    (lambda: AFTBlock(DIM, max_seq_len=0), r"^\[AFTBlock\] expected max_seq_len"),
    (lambda: TokenEmbedding(0, DIM), r"^\[TokenEmbedding\] expected vocab_size"),
    (lambda: PatchEmbedding(0, 3, DIM), r"^\[PatchEmbedding\] expected patch_size"),
])
def test_bad_arguments_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("call,message", [
    (lambda: BitLRU(DIM, 8, 4)(mx.zeros((2, 5, 3))), r"^\[BitLRU\] expected input of shape \(batch, seq, 16\)"),
    (lambda: BitGRU(DIM, 8)(mx.zeros((2, 5))), r"^\[BitGRU\] expected input of shape \(batch, seq, 16\)"),
    (lambda: AFTBlock(DIM, max_seq_len=4)(mx.zeros((1, 5, DIM))), r"^\[AFTBlock\] expected at most max_seq_len=4"),
    (lambda: TokenEmbedding(10, DIM, 4)(mx.zeros((1, 5), mx.int32)), r"^\[TokenEmbedding\] expected at most max_len=4"),
    (lambda: PatchEmbedding(4, 3, DIM)(mx.zeros((1, 6, 8, 3))), r"^\[PatchEmbedding\] expected channels-last images"),
    (lambda: PatchEmbedding(2, 3, DIM, 4)(mx.zeros((1, 6, 6, 3))), r"^\[PatchEmbedding\] expected 4 patches"),
    (lambda: SwiGLU(DIM)(mx.zeros((2, 8))), r"^\[SwiGLU\] expected input of shape \(\.\.\., 16\)"),
])
def test_bad_inputs_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()
