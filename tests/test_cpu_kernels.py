"""The native CPU kernels inside MLX (mlx_zeta.kernels.cpu, the extension built from csrc/):
results against independent references (numpy integer products, MLX's own quantized_matmul and
dequantize), gradients, mx.compile, every instruction set this CPU has forced in turn, the
dispatcher's choices and the fall-back when the extension is missing, and an install that cannot
compile. The kernels' bodies are checked ISA by ISA in test_cpu_kernels_isa/simde/arm.py."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn

from mlx_zeta.kernels import affine_matmul, cpu, info, ternary_matmul, use_kernels
from mlx_zeta.kernels.ternary import ternary_matmul_reference
from mlx_zeta.quant import AffineEmbedding, AffineLinear, TernaryLinear, use_affine_linear
from cpu_kernel_driver import pack_ternary

ROOT = Path(__file__).resolve().parents[1]
native = pytest.mark.skipif(not cpu.available(), reason=f"native CPU kernels not built here: {cpu.reason()}")


def _ternary_case(rng, M, K, N):
    w = rng.integers(-1, 2, (N, K))
    return w, mx.array(pack_ternary(w))


@pytest.fixture(params=cpu.supported_isas() or ["none"])
def isa(request):
    if request.param == "none":
        pytest.skip(f"native CPU kernels not built here: {cpu.reason()}")
    cpu.set_isa(request.param)
    yield request.param
    cpu.set_isa("auto")


@native
@pytest.mark.parametrize("M,K,N", [(1, 37, 5), (3, 200, 13), (8, 1029, 30), (9, 64, 4), (33, 515, 17)])
def test_ternary_int8_is_exact_on_every_isa(isa, rng, M, K, N):
    w, packed = _ternary_case(rng, M, K, N)
    x = rng.integers(-128, 128, (M, K)).astype(np.int8)
    got = ternary_matmul(mx.array(x), packed, N)
    assert got.dtype == mx.int32
    assert np.array_equal(np.array(got), x.astype(np.int64) @ w.T), isa


@native
@pytest.mark.parametrize("M,K,N", [(1, 37, 5), (4, 300, 13), (8, 1029, 30)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_ternary_float_within_rounding(isa, rng, M, K, N, dtype):
    w, packed = _ternary_case(rng, M, K, N)
    x = mx.array(rng.standard_normal((2, M, K)).astype(np.float32)).astype(dtype)  # lead dims too
    got = ternary_matmul(x, packed, N)
    want = np.array(x.astype(mx.float32)).astype(np.float64) @ w.T
    assert got.dtype == mx.float32 and got.shape == (2, M, N)
    np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-4 * np.sqrt(K))


@native
def test_ternary_paths_agree_and_gradients_come_from_the_reference(rng):
    w, packed = _ternary_case(rng, 3, 96, 10)
    x = mx.array(rng.standard_normal((3, 96)).astype(np.float32))
    assert info()["kernels"]["ternary_matmul"] == "cpu"

    def loss(x, use_kernel):
        return (ternary_matmul(x, packed, 10, use_kernel=use_kernel) ** 2).sum()

    native_grad = mx.grad(loss)(x, None)
    ref_grad = mx.grad(loss)(x, False)
    np.testing.assert_allclose(np.array(native_grad), np.array(ref_grad), rtol=1e-5, atol=1e-5)
    y = 2 * np.array(ternary_matmul_reference(x, packed, 10))
    np.testing.assert_allclose(np.array(native_grad), y @ w, rtol=1e-4, atol=1e-4)  # d/dx |xW^T|^2 = 2 (xW^T) W
    compiled = mx.compile(lambda x: ternary_matmul(x, packed, 10) + 1)
    np.testing.assert_allclose(np.array(compiled(x)), np.array(ternary_matmul(x, packed, 10, use_kernel=False)) + 1,
                               rtol=1e-5, atol=1e-5)


def _affine_case(rng, N, K, group, bits, scale_dtype=mx.float32):
    w = mx.array(rng.standard_normal((N, K)).astype(np.float32))
    wq, scales, biases = mx.quantize(w, group, bits)
    return wq, scales.astype(scale_dtype), biases.astype(scale_dtype)


@native
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("scale_dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_affine_matches_mlx_quantized_matmul(isa, rng, bits, group, scale_dtype):
    wq, s, b = _affine_case(rng, 37, 256, group, bits, scale_dtype)
    for rows in (1, 3, 7):
        x = mx.array(rng.standard_normal((rows, 256)).astype(np.float32))
        want = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=group, bits=bits)
        got = cpu.affine_matmul(x, wq, s, b, group, bits)
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=2e-5, atol=2e-5 * np.abs(np.array(want)).max())


@native
def test_affine_dispatch_rows_dtypes_and_gradients(rng, monkeypatch):
    wq, s, b = _affine_case(rng, 24, 128, 64, 4)
    calls = []
    real = cpu.affine_matmul
    monkeypatch.setattr(cpu, "affine_matmul", lambda *a: calls.append(a[0].shape) or real(*a))
    for shape, dtype in (((1, 128), mx.float32), ((2, 3, 128), mx.float16), ((8, 128), mx.float32)):
        x = mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)
        got = affine_matmul(x, wq, s, b, 64, 4)
        want = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=4)
        assert got.dtype == dtype and got.shape == want.shape
        tol = 1e-5 if dtype == mx.float32 else 2e-2
        np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)), rtol=tol, atol=tol)
    assert calls == [(1, 128), (6, 128), (8, 128)]  # the GEMV, then the native GEMM from 8 rows on
    x = mx.array(rng.standard_normal((2, 128)).astype(np.float32))
    grad = mx.grad(lambda x: affine_matmul(x, wq, s, b, 64, 4).sum())(x)
    dense = mx.dequantize(wq, s, b, 64, 4)
    np.testing.assert_allclose(np.array(grad), np.broadcast_to(np.array(dense.sum(0)), (2, 128)), rtol=1e-5, atol=1e-5)
    calls.clear()
    w2, s2, b2 = _affine_case(rng, 24, 128, 64, 2)  # 2-bit: MLX's quantized_matmul
    mx.eval(affine_matmul(x, w2, s2, b2, 64, 2), affine_matmul(x, wq, s, b, 64, 4, use_kernel=False))
    assert calls == []


@native
def test_layers_route_to_the_native_kernels_and_agree_with_mlx(rng):
    model = nn.Sequential(nn.Linear(128, 48), nn.Embedding(48, 128))
    nn.quantize(model, group_size=64, bits=4)
    assert use_affine_linear(model) == 2
    lin, emb = model.layers
    assert isinstance(lin, AffineLinear) and isinstance(emb, AffineEmbedding)
    x = mx.array(rng.standard_normal((1, 2, 128)).astype(np.float32))
    for got, want in ((lin(x), nn.QuantizedLinear.__call__(lin, x)), (emb.as_linear(x), nn.QuantizedEmbedding.as_linear(emb, x))):
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)
    layer = TernaryLinear.from_packed(pack_ternary(rng.integers(-1, 2, (20, 64))), 0.5, activation="int8")
    x = mx.array(rng.standard_normal((3, 64)).astype(np.float32))
    native_y = layer(x)
    with use_kernels("off"):
        ref_y = layer(x)
    assert np.array_equal(np.array(native_y), np.array(ref_y))  # exact integers, same scales


def test_info_and_fallback_without_the_extension(monkeypatch, rng):
    facts = info()
    assert facts["native_cpu"] == cpu.available() and facts["native_cpu_reason"] == cpu.reason()
    assert facts["kernels"]["fused_attention"] in ("reference", "metal", "cuda")
    monkeypatch.setattr(cpu, "_load", lambda: (None, "disabled for this test"))
    facts = info()
    assert facts["native_cpu"] is False and facts["cpu_isa"] is None and facts["cpu_isas"] == []
    assert facts["kernels"]["ternary_matmul"] == "reference" and facts["kernels"]["affine_matmul"] == "mlx"
    assert facts["native_cpu_reason"] == "disabled for this test"
    with pytest.raises(RuntimeError, match=r"^\[mlx_zeta.kernels.cpu\] native CPU kernels unavailable: disabled"):
        cpu.set_isa("scalar")
    w, packed = _ternary_case(rng, 2, 40, 6)
    x = rng.integers(-128, 128, (2, 40)).astype(np.int8)
    assert np.array_equal(np.array(ternary_matmul(mx.array(x), packed, 6)), x.astype(np.int64) @ w.T)
    wq, s, b = _affine_case(rng, 8, 64, 32, 4)
    xf = mx.array(rng.standard_normal((1, 64)).astype(np.float32))
    np.testing.assert_array_equal(np.array(affine_matmul(xf, wq, s, b, 32, 4)),
                                  np.array(mx.quantized_matmul(xf, wq, s, b, transpose=True, group_size=32, bits=4)))


@native
def test_bad_input_is_one_line():
    with pytest.raises(ValueError, match=r"CPU ISA 'sse9' is not available on this machine \(built: .*usable here: auto"):
        cpu.set_isa("sse9")
    with pytest.raises(ValueError, match=r"^\[mlx_zeta.kernels.cpu\] set_num_threads expects an int >= 0, got -1$"):
        cpu.set_num_threads(-1)
    x = mx.zeros((2, 16), dtype=mx.int8)
    with pytest.raises(ValueError, match=r"ternary_matmul expects packed uint8 of shape \(ceil\(n_out / 4\), K\) = \(2, 16\)"):
        cpu.ternary_matmul(x, mx.zeros((1, 16), dtype=mx.uint8), 5)
    with pytest.raises(ValueError, match=r"affine_matmul supports bits 4 and 8, got 3"):
        cpu.affine_matmul(mx.zeros((1, 64)), mx.zeros((4, 6), dtype=mx.uint32), mx.zeros((4, 1)), mx.zeros((4, 1)), 64, 3)


@native
def test_threads_setting_is_honoured_and_results_do_not_depend_on_it(rng):
    w, packed = _ternary_case(rng, 5, 300, 61)
    x = mx.array(rng.integers(-128, 128, (5, 300)).astype(np.int8))
    outs = []
    for n in (1, 2, 3):
        cpu.set_num_threads(n)
        assert cpu.num_threads() == n
        outs.append(np.array(ternary_matmul(x, packed, 61)))
    cpu.set_num_threads(0)
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


@native
def test_extension_shares_mlx_nanobind_abi():
    """A nanobind other than MLX's would fail at call time ("incompatible function arguments"):
    the ABI tags compiled into both modules must be equal."""
    tag = re.compile(rb"nanobind_[A-Za-z0-9_]*_v\d+")
    ours = set(tag.findall(Path(cpu.module().__file__).read_bytes()))
    theirs = set(tag.findall(Path(mx.__file__).read_bytes()))
    assert ours and ours == theirs


def test_install_without_a_compiler_still_succeeds(tmp_path):
    """setup.py's build_ext with no CMake or compiler on PATH: a warning, exit 0, no module."""
    env = {**os.environ, "PATH": str(tmp_path)}  # nothing to run
    result = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
                             "--build-temp", str(tmp_path / "tmp")], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "native CPU kernels not built" in result.stderr
    assert not list((tmp_path / "lib").rglob("_cpu*"))
