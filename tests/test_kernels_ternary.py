"""mlx_zeta.kernels.ternary: the shipped Metal text of ternary_gemv / ternary_gemm (and the CUDA
twins), run by the CPU emulator, against the pure-MLX reference (unpack + matmul): exact int32
equality for int8 activations over ragged shapes, float activations within stated tolerances,
TernaryLinear routed to the fused kernel, the VJP, the errors, and planted bugs (an off-by-one
tile index, an off-by-one bound, each threadgroup barrier removed) that the comparison must
catch, so that a passing sweep means something."""

import mlx_zeta  # noqa: F401
import numpy as np
import pytest

import mlx.core as mx

import mlx_zeta.quant.ternary as ternary_layer
from mlx_zeta.kernels import KernelSource, load_source, use_kernels
from mlx_zeta.kernels import cpu as cpu_kernels
from mlx_zeta.kernels.emulate import KernelFault, compiler, concurrent_groups, emulate
from mlx_zeta.kernels.ternary import kernel_launch, ternary_matmul, ternary_matmul_reference
from mlx_zeta.quant import BitLinear
from mlx_zeta.kernels.packing import pack_2bit

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C++ compiler (g++) to run the kernel emulator")

KS = [96, 100, 257]  # a multiple of the 32-wide K tile, and two ragged ones
NS = [4, 64, 100]  # one packed row; a whole 16-packed-row GEMM tile; 25 packed rows (ragged tiles)
# Float activations: kernel and reference both upcast x exactly to float32 and accumulate in
# float32, so for every input dtype the difference is summation order only (|A| <~ 60 here).
FLOAT_TOL = {mx.float32: dict(rtol=1e-5, atol=1e-4), mx.float16: dict(rtol=1e-5, atol=1e-4),
             mx.bfloat16: dict(rtol=1e-5, atol=1e-4)}


@pytest.fixture
def emulated():
    """The emulated kernels selected process-wide, as MLX_ZETA_KERNELS=emulate would."""
    with use_kernels("emulate"):
        yield


def _case(seed, M, K, N, dtype=mx.int8):
    rng = np.random.default_rng(seed)
    W = rng.integers(-1, 2, (N, K)).astype(np.int8)
    if dtype == mx.int8:
        x = mx.array(rng.integers(-128, 128, (M, K)).astype(np.int8))
    else:
        x = mx.array(rng.standard_normal((M, K)).astype(np.float32)).astype(dtype)
    return x, pack_2bit(W), W


def _exact(x, W):
    return np.array(x).astype(np.int64) @ W.T.astype(np.int64)


@pytest.mark.parametrize("M", [1, 3, 8, 9, 33])  # GEMV up to 8 rows, GEMM above
def test_int8_exact_over_ragged_shapes(M):
    for i, K in enumerate(KS):
        for j, N in enumerate(NS):
            x, packed, W = _case(10 * i + j, M, K, N)
            kernel, _, _ = kernel_launch(x, packed, N)
            assert kernel.name == ("ternary_gemv" if M <= 8 else "ternary_gemm")
            y = ternary_matmul(x, packed, N, use_kernel="emulate")
            ref = ternary_matmul_reference(x, packed, N)
            assert y.dtype == ref.dtype == mx.int32 and y.shape == (M, N)
            assert np.array_equal(np.array(ref), _exact(x, W))  # the reference itself is exact
            assert np.array_equal(np.array(y), np.array(ref)), f"M={M} K={K} N={N}"


def test_int8_extremes_and_ragged_n():
    # all |q| = 128 and all weights +1 or -1: the largest sums; N = 30 leaves two padding slots
    M, K, N = 9, 257, 30
    x = mx.full((M, K), -128, dtype=mx.int8)
    W = np.where(np.arange(N)[:, None] % 2 == 0, 1, -1) * np.ones((1, K), np.int8)
    packed = pack_2bit(W.astype(np.int8))
    for rows in (M, 2):
        y = ternary_matmul(x[:rows], packed, N, use_kernel="emulate")
        assert np.array_equal(np.array(y), _exact(x[:rows], W))


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("M, K, N", [(3, 257, 100), (33, 100, 64)])
def test_float_activations(M, K, N, dtype):
    x, packed, W = _case(1, M, K, N, dtype)
    y = ternary_matmul(x, packed, N, use_kernel="emulate")
    ref = ternary_matmul_reference(x, packed, N)
    assert y.dtype == ref.dtype == mx.float32
    np.testing.assert_allclose(np.array(y), np.array(ref), **FLOAT_TOL[dtype])
    exact = np.array(x.astype(mx.float32)).astype(np.float64) @ W.T  # float64 truth on the same inputs
    np.testing.assert_allclose(np.array(y), exact, **FLOAT_TOL[dtype])


@pytest.mark.parametrize("M, K, N, dtype", [(3, 257, 100, mx.int8), (33, 100, 64, mx.int8),
                                            (8, 96, 100, mx.float16), (9, 257, 4, mx.bfloat16)])
def test_cuda_twin(M, K, N, dtype):
    x, packed, _ = _case(2, M, K, N, dtype)
    kernel, inputs, launch = kernel_launch(x, packed, N)
    y = kernel(inputs, mode="emulate-cuda", **launch)[0]
    ref = np.array(ternary_matmul_reference(x, packed, N))
    if dtype == mx.int8:
        assert np.array_equal(np.array(y), ref)
    else:
        np.testing.assert_allclose(np.array(y), ref, **FLOAT_TOL[dtype])


def test_groups_run_concurrently():
    """Each threadgroup of GEMV and GEMM writes only its own outputs and reads nothing another
    writes: run four at a time in reverse order (concurrent_groups), both texts stay exact."""
    for M in (3, 33):  # GEMV: 7 groups; GEMM: 2 x 2 groups
        x, packed, W = _case(8, M, 100, 100)
        kernel, inputs, launch = kernel_launch(x, packed, 100)
        with concurrent_groups(4):
            for mode in ("emulate", "emulate-cuda"):
                assert np.array_equal(np.array(kernel(inputs, mode=mode, **launch)[0]), _exact(x, W)), (M, mode)


# ---------------------------------------------------------------- planted bugs in ternary_gemm
BARRIER = "threadgroup_barrier(mem_flags::mem_threadgroup);"
# (anchor, replacement, occurrences): the K bound guards both staging loads (either alone
# is masked by the other: a zero x or a zero weight past K), so the bug breaks both
PLANTED = {
    "k tile index off by one": ("const int k0 = t * BK;", "const int k0 = (t + 1) * BK;", 1),
    "row tile index off by one": ("* BM;\nconst int p0", "* BM + 1;\nconst int p0", 1),
    "K bound off by one": ("gk < K)", "gk <= K)", 2),
}


def _planted(old, new, count=1):
    src = load_source("ternary", "metal")
    body = src.bodies["ternary_gemm"]
    assert body.count(old) == count, f"the planted bug's anchor {old!r} is no longer in the shipped body"
    return KernelSource(src.path + " (planted bug)", src.header, {"ternary_gemm": body.replace(old, new)})


def _gemm_case():
    x, packed, _ = _case(3, 33, 100, 100)
    return x, packed, np.array(ternary_matmul_reference(x, packed, 100))


@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_planted_index_bugs_are_caught(bug):
    x, packed, ref = _gemm_case()
    kernel, inputs, launch = kernel_launch(x, packed, 100)
    if bug == "K bound off by one":  # the last row of x (33 x 100) or of w (25 x 100) is read one past its end
        with pytest.raises(KernelFault, match=r"out-of-bounds read of device buffer (x at index 3300|w at index 2500)"):
            emulate(kernel, inputs, source=_planted(*PLANTED[bug]), **launch)
        return
    y = emulate(kernel, inputs, source=_planted(*PLANTED[bug]), **launch)[0]
    assert not np.array_equal(np.array(y), ref), f"planted bug not caught: {bug}"


@pytest.mark.parametrize("which", ["after staging", "before restaging"])
def test_removed_barrier_is_caught(which):
    """Without the first barrier threads read tiles their neighbours have not staged yet; without
    the second, fast threads restage a tile while slow ones still read it. Threads start one by one
    as OS threads, so a race shows at once in practice; three tries make a fluke pass unlikely."""
    x, packed, ref = _gemm_case()
    body = load_source("ternary", "metal").bodies["ternary_gemm"]
    first = body.index(BARRIER)
    cut = first if which == "after staging" else body.index(BARRIER, first + 1)
    src = load_source("ternary", "metal")
    broken = KernelSource(src.path + " (no barrier)", src.header,
                          {"ternary_gemm": body[:cut] + body[cut + len(BARRIER):]})
    kernel, inputs, launch = kernel_launch(x, packed, 100)
    caught = False
    for _ in range(3):
        y = emulate(kernel, inputs, source=broken, **launch)[0]
        if not np.array_equal(np.array(y), ref):
            caught = True
            break
    assert caught, f"removing the barrier {which} went unnoticed"


# ---------------------------------------------------------------- gradients, layer, errors
@pytest.mark.parametrize("M", [2, 9])  # GEMV and GEMM
def test_vjp_matches_torch_autograd(M):
    """The emulated kernel's gradient in x against torch autograd of x @ W.T with the unpacked
    ternary W the test drew (float64): an independent derivative, not the reference's own VJP.
    Bound: 1e-6 of the largest entry (float32: sin's argument |A| / 10 <~ 6 and sums of 64 terms)."""
    torch = pytest.importorskip("torch")
    x, packed, W = _case(4, M, 100, 64, mx.float32)
    g_np = np.random.default_rng(5).standard_normal((M, 64))
    g = mx.array(g_np.astype(np.float32))
    loss = lambda x: (mx.sin(0.1 * ternary_matmul(x, packed, 64, use_kernel="emulate")) * g).sum()
    kernel_grad = np.array(mx.grad(loss)(x))
    tx = torch.tensor(np.array(x), dtype=torch.float64, requires_grad=True)
    (torch.sin(0.1 * (tx @ torch.tensor(W, dtype=torch.float64).T)) * torch.tensor(g_np)).sum().backward()
    want = tx.grad.numpy()
    assert np.abs(want).max() > 1
    np.testing.assert_allclose(kernel_grad, want, rtol=0, atol=1e-6 * np.abs(want).max())
    # frozen packed integers get a zero cotangent; int8 activations too
    _, (dx, dp) = mx.vjp(lambda x, p: ternary_matmul(x, p, 64, use_kernel=False), [x, packed], [g])
    assert dp.dtype == mx.uint8 and not np.any(np.array(dp))
    xi = mx.array(np.ones((M, 100), np.int8))
    _, (dxi,) = mx.vjp(lambda x: ternary_matmul(x, packed, 64, use_kernel=False), [xi], [g.astype(mx.int32)])
    assert not np.any(np.array(dxi))


@pytest.mark.parametrize("activation", ["int8", "float"])
def test_ternary_linear_fused_equals_unpack(emulated, activation):
    rng = np.random.default_rng(6)
    bit = BitLinear(100, 33, bias=True)
    bit.weight = mx.array(rng.standard_normal((33, 100)).astype(np.float32) * 0.1)
    bit.bias = mx.array(rng.standard_normal(33).astype(np.float32))
    layer = ternary_layer.TernaryLinear.from_bitlinear(bit, activation=activation, kernel="fused")
    for rows in (1, 9):
        x = mx.array(rng.standard_normal((rows, 100)).astype(np.float32))
        fused = np.array(layer(x))
        layer.kernel = "unpack"
        unpacked = np.array(layer(x))
        layer.kernel = "fused"
        if activation == "int8":  # exact integers, then the same scaling ops: bitwise equal
            assert np.array_equal(fused, unpacked)
            acc = np.array(layer.integer_matmul(x)[0])
            layer.kernel = "unpack"
            assert np.array_equal(acc, np.array(layer.integer_matmul(x)[0]))
            layer.kernel = "fused"
        else:
            np.testing.assert_allclose(fused, unpacked, rtol=1e-5, atol=1e-5)


def test_auto_picks_fused_only_with_a_kernel_path(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)  # as without the native extension
    calls = []
    real = ternary_layer.ternary_matmul
    monkeypatch.setattr(ternary_layer, "ternary_matmul", lambda *a, **k: calls.append(k) or real(*a, **k))  # a spy
    layer = ternary_layer.TernaryLinear.from_packed(pack_2bit(np.eye(8, 16, dtype=np.int8)), 1.0, kernel="auto")
    x = mx.ones((2, 16))
    cpu = np.array(layer(x))
    assert calls == []  # CPU without native kernels: the affine/unpack choice
    with use_kernels("emulate"):  # a kernel path live, as on a GPU
        assert np.array_equal(np.array(layer(x)), cpu) and calls == [{}]
        base3 = ternary_layer.TernaryLinear(16, 8, packing="base3", kernel="auto")
        mx.eval(base3(x))  # base-3 bytes stay on the unpack/affine paths
        assert len(calls) == 1
        base3.kernel = "fused"
        with pytest.raises(ValueError, match="kernel='fused' reads the 2-bit layout"):
            base3(x)
    with use_kernels("off"):
        mx.eval(layer(x))
    assert len(calls) == 1
    monkeypatch.undo()
    if cpu_kernels.available():  # the native CPU kernel is a kernel path too
        monkeypatch.setattr(ternary_layer, "ternary_matmul", lambda *a, **k: calls.append(k) or real(*a, **k))
        assert np.array_equal(np.array(layer(x)), cpu) and len(calls) == 2


def test_errors():
    x, packed, _ = _case(7, 2, 12, 8)
    with pytest.raises(ValueError, match="expected x of dtype int8, float32"):
        ternary_matmul(x.astype(mx.int32), packed, 8)
    with pytest.raises(ValueError, match="2-D uint8"):
        ternary_matmul(x, packed.astype(mx.int8), 8)
    with pytest.raises(ValueError, match=r"n_out=12 packs .* into ceil\(n_out / 4\) = 3 rows, but packed has 2"):
        ternary_matmul(x, packed, 12)
    with pytest.raises(ValueError, match="n_out to be an int >= 1"):
        ternary_matmul(x, packed, 0)
    with pytest.raises(ValueError, match=r"expected x of shape \(\.\.\., 12\)"):
        ternary_matmul(x[:, :11], packed, 8)
    with pytest.raises(ValueError, match="use_kernel must be"):
        ternary_matmul(x, packed, 8, use_kernel="metal")
    assert ternary_matmul(x, packed, 7, use_kernel=False).shape == (2, 7)  # ragged N: padding slots dropped
    lead = ternary_matmul(x.reshape(1, 2, 12), packed, 8, use_kernel="emulate")
    assert lead.shape == (1, 2, 8)
    assert np.array_equal(np.array(lead[0]), np.array(ternary_matmul_reference(x, packed, 8)))
