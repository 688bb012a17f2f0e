"""The kernels on real hardware: Metal on Apple silicon (.github/workflows/metal.yml runs this
file) or MLX's CUDA backend on an NVIDIA GPU. Each kernel is compared with the pure-MLX
reference and with PyTorch (``scaled_dot_product_attention`` with the bias materialised; an
int32 matmul for the ternary accumulation). Elsewhere these tests skip: the same shipped text
is checked on the CPU by the emulator in test_kernels_attention.py / test_kernels_ternary.py."""

import numpy as np
import pytest

import mlx.core as mx

from mlx_zeta.kernels import fused_attention, gpu_backend, t5_relative_buckets, ternary_matmul
from mlx_zeta.kernels.ternary import ternary_matmul_reference
from mlx_zeta.kernels import PositionBias
from mlx_zeta.nn.positional import AlibiPositionalBias
from mlx_zeta.kernels.packing import pack_2bit

pytestmark = pytest.mark.skipif(
    gpu_backend() is None,
    reason="needs Metal (Apple silicon) or MLX's CUDA backend; this MLX runs on the CPU, where the "
           "emulator tests check the same kernel text")

TOL = {mx.float32: 2e-5, mx.float16: 2e-3, mx.bfloat16: 1.6e-2}


def qkv(b, hq, hkv, lq, lk, d, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [mx.array(rng.standard_normal(s).astype(np.float32)).astype(dtype)
            for s in ((b, hq, lq, d), (b, hkv, lk, d), (b, hkv, lk, d))]


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("d", [64, 80, 96, 128, 192, 256])
@pytest.mark.parametrize("lq,lk", [(1, 300), (4, 33), (37, 37), (64, 200)])
@pytest.mark.parametrize("bias", ["alibi", "t5", "none"])
def test_fused_attention_matches_reference_and_torch(dtype, d, lq, lk, bias):
    torch = pytest.importorskip("torch")
    q, k, v = qkv(2, 4, 2, lq, lk, d, dtype)
    extra = {}
    if bias == "alibi":
        extra["alibi_slopes"] = AlibiPositionalBias(heads=4)._slopes
    elif bias == "t5":
        extra["t5_table"] = mx.random.normal((32, 4))
        extra["t5_buckets"] = t5_relative_buckets(lq, lk, bidirectional=False, step=lk - lq)
    out = fused_attention(q, k, v, causal=True, use_kernel=True, **extra)
    ref = fused_attention(q, k, v, causal=True, use_kernel=False, **extra)
    scale = TOL[dtype] * max(1.0, float(mx.abs(ref.astype(mx.float32)).max()))
    assert float(mx.abs(out.astype(mx.float32) - ref.astype(mx.float32)).max()) <= scale
    # PyTorch: the bias and the bottom-right causal mask materialised, GQA heads repeated
    b = PositionBias(**extra).materialize(lq, lk) if extra else mx.zeros((4, lq, lk))
    causal = np.arange(lk)[None, :] <= np.arange(lq)[:, None] + (lk - lq)
    t = [torch.tensor(np.array(x.astype(mx.float32))) for x in (q, k, v)]
    kk, vv = (x.repeat_interleave(2, dim=1) for x in t[1:])
    add = torch.tensor(np.where(causal, np.array(b), -np.inf).astype(np.float32))
    want = torch.nn.functional.scaled_dot_product_attention(t[0], kk, vv, attn_mask=add).numpy()
    assert np.abs(np.array(out.astype(mx.float32)) - want).max() <= scale


@pytest.mark.parametrize("m", [1, 4, 8, 9, 64])
@pytest.mark.parametrize("k_in,n_out", [(4096, 4096), (2560, 6912), (257, 100)])
def test_ternary_matmul_int8_exact_vs_reference_and_torch(m, k_in, n_out):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w = rng.integers(-1, 2, (n_out, k_in)).astype(np.int8)
    x = rng.integers(-128, 128, (m, k_in)).astype(np.int8)
    packed = pack_2bit(mx.array(w))
    out = ternary_matmul(mx.array(x), packed, n_out, use_kernel=True)
    assert mx.array_equal(out, ternary_matmul_reference(mx.array(x), packed, n_out))
    want = (torch.tensor(x, dtype=torch.int32) @ torch.tensor(w, dtype=torch.int32).T).numpy()
    np.testing.assert_array_equal(np.array(out), want)
