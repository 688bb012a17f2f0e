"""The kernels on real hardware: Metal on Apple silicon (.github/workflows/metal.yml runs this
file) or MLX's CUDA backend on an NVIDIA GPU. Each kernel is compared with the pure-MLX
reference and with PyTorch (``scaled_dot_product_attention`` with the bias materialised; the
attention of tests/reference/attention.py, written from the math, for soft-capping, windows,
boolean / additive / broadcast masks, GQA and half precision; an int32 or float64 matmul for
the ternary accumulation). Every test runs in strict mode (``use_kernels(strict=True)``): a
kernel that fails to compile or launch fails the test instead of falling back to the
reference. Elsewhere these tests skip: the same shipped text is checked on the CPU by the
emulator in test_kernels_attention.py / test_kernels_ternary.py."""

import warnings

import numpy as np
import pytest

import mlx.core as mx

from mlx_zeta.kernels import dispatch, fused_attention, gpu_backend, t5_relative_buckets, ternary_matmul, use_kernels
from mlx_zeta.kernels import launch
from mlx_zeta.kernels.source import KernelSource, load_source
from mlx_zeta.kernels.ternary import kernel_launch
from mlx_zeta.kernels.ternary import ternary_matmul_reference
from mlx_zeta.kernels import PositionBias
from mlx_zeta.nn.positional import AlibiPositionalBias
from mlx_zeta.kernels.packing import pack_2bit

pytestmark = pytest.mark.skipif(
    gpu_backend() is None,
    reason="needs Metal (Apple silicon) or MLX's CUDA backend; this MLX runs on the CPU, where the "
           "emulator tests check the same kernel text")

TOL = {mx.float32: 2e-5, mx.float16: 2e-3, mx.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def strict():
    """A kernel that fails on the device raises (KernelError) instead of running the reference."""
    with use_kernels("auto", strict=True):
        yield


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


FEATURES = {
    "softcap": dict(softcap=1.5, scale=0.5), "window": dict(window=5), "causal_window": dict(causal=True, window=3),
    "bool_mask": dict(mask="bool_4d"), "bool_key_padding": dict(mask="bool_key_padding"),
    "bool_per_head": dict(mask="bool_per_head"), "add_mask": dict(mask="add_4d"), "add_2d": dict(mask="add_2d"),
    "add_broadcast_heads": dict(mask="add_broadcast_heads"),
    "everything": dict(causal=True, window=9, softcap=2.0, mask="add_broadcast_heads", alibi=True),
}


def feature_masks(rng, b, h, lq, lk):
    keep = rng.random((b, h, lq, lk)) > 0.3
    keep[0, 0, 0] = False  # a row with no visible key
    add = rng.standard_normal((b, h, lq, lk)).astype(np.float32)
    add[:, :, :, 0] = -np.inf
    return {"bool_4d": keep, "bool_key_padding": keep[:, :1, :1, :], "bool_per_head": keep[:1, :, :1, :],
            "add_4d": add, "add_2d": add[0, 0], "add_broadcast_heads": add[:, :1]}


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("hkv", [1, 2, 8])  # MQA, GQA (4 query heads per kv head), MHA
@pytest.mark.parametrize("lq,lk,d", [(1, 300, 64), (5, 77, 128), (37, 37, 64), (70, 200, 128)])
@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_fused_attention_features_vs_torch(dtype, hkv, lq, lk, d, feature):
    """The device kernel against torch attention written from the math, with every mask materialised:
    softmax(cap(scale q k^T) + bias + mask) v, cap(s) = c tanh(s / c), window |i + Lk - Lq - j| < w."""
    torch = pytest.importorskip("torch")
    from reference.attention import fused_attention as torch_attention

    b, hq = 2, 8
    q, k, v = qkv(b, hq, hkv, lq, lk, d, dtype, seed=lq + lk + hkv)
    kw = dict(FEATURES[feature])
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = AlibiPositionalBias(heads=hq)._slopes
    if "mask" in kw:
        kw["mask"] = mx.array(feature_masks(np.random.default_rng(1), b, hq, lq, lk)[kw["mask"]])
    out = fused_attention(q, k, v, use_kernel=True, **kw)
    assert out.dtype == dtype and out.shape == q.shape

    def t(x):
        return torch.tensor(np.array(x.astype(mx.float32) if x.dtype != mx.bool_ else x),
                            dtype=torch.bool if x.dtype == mx.bool_ else torch.float64)

    want = torch_attention(t(q), t(k), t(v), **{n: t(x) if isinstance(x, mx.array) else x for n, x in kw.items()})
    got = np.array(out.astype(mx.float32))
    assert np.isfinite(got).all()
    bound = TOL[dtype] * max(1.0, float(want.abs().max()))
    assert np.abs(got - want.numpy()).max() <= bound, feature


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("m", [1, 8, 9, 64])
def test_ternary_matmul_float_activations_vs_torch(dtype, m):
    """W1.58A16: the exactly upcast inputs summed in float32, against float64 torch; bound 1e-5 of |A|'s scale."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(m)
    k_in, n_out = 2560, 300
    w = rng.integers(-1, 2, (n_out, k_in)).astype(np.int8)
    x = mx.array(rng.standard_normal((m, k_in)).astype(np.float32)).astype(dtype)
    out = np.array(ternary_matmul(x, pack_2bit(mx.array(w)), n_out, use_kernel=True))
    want = (torch.tensor(np.array(x.astype(mx.float32)), dtype=torch.float64) @ torch.tensor(w, dtype=torch.float64).T)
    want = want.numpy()
    assert np.abs(out - want).max() <= 1e-5 * np.abs(want).max()


def planted_compile_error(monkeypatch):
    """ternary_gemv's body with a misspelt intrinsic, as a kernel of its own name (so no cache holds
    the good one): the device's compiler must reject it."""
    backend = gpu_backend()
    src = load_source("ternary", backend)
    word = "simd_sum(" if backend == "metal" else "__shfl_xor_sync("
    body = src.bodies["ternary_gemv"]
    assert word in body
    broken = KernelSource(src.path + " (planted)", src.header, {"ternary_gemv_planted": body.replace(word, "misspelt_sum(")})
    monkeypatch.setattr(launch, "load_source", lambda family, dialect: broken)
    x, packed = mx.ones((2, 64), dtype=mx.int8), pack_2bit(mx.ones((8, 64), dtype=mx.int8))
    kernel, inputs, plan = kernel_launch(x, packed, 8)
    planted = launch.Kernel(kernel.family, "ternary_gemv_planted", kernel.input_names, kernel.output_names)
    return lambda: planted(inputs, mode=backend, **plan), "ternary.ternary_gemv_planted", backend


def test_compile_error_on_the_device_is_strict_or_falls_back(monkeypatch):
    """Strict: one line naming the kernel, the backend and the compiler's error. Not strict: one
    warning with the compiler's message, then KernelUnavailable (the kernels' custom functions
    catch it and run the reference)."""
    call, name, backend = planted_compile_error(monkeypatch)
    dispatch.reset_kernel_failures()
    try:
        with pytest.raises(dispatch.KernelError) as info:
            call()
        text = str(info.value)
        assert "\n" not in text and name in text and backend in text and "misspelt_sum" in text, text
        with use_kernels(strict=False), warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for _ in range(2):
                with pytest.raises(dispatch.KernelUnavailable):
                    call()
        fallbacks = [w for w in seen if issubclass(w.category, dispatch.KernelFallbackWarning)]
        assert len(fallbacks) == 1 and "misspelt_sum" in str(fallbacks[0].message)
    finally:
        dispatch.reset_kernel_failures()
