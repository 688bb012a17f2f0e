"""A device kernel that fails to compile or launch (mlx_zeta.kernels.dispatch.kernel_failed):
one warning per (kernel, backend) with the compiler's message, the pure-MLX reference from then
on (results equal to use_kernel=False bit for bit, gradients too), and in strict mode a one-line
KernelError naming the kernel and the backend.

No Metal or CUDA here: the machine is made to look like a Mac (``gpu_backend`` answers "metal")
and MLX's kernel builder ``mx.fast.metal_kernel`` is replaced by a fake "device" that fails the
way Apple's compiler does (at build, at call, or only when the output is evaluated, which is
where MLX really compiles) or that runs the emulator for the kernels left intact."""

import warnings

import numpy as np
import pytest

import mlx.core as mx

from mlx_zeta.kernels import dispatch, fused_attention, ternary_matmul, use_kernels
from mlx_zeta.kernels.emulate import compiler, emulate
from mlx_zeta.kernels.launch import Kernel
from mlx_zeta.kernels.packing import pack_2bit
from badinput import assert_one_line

# What Apple's compiler prints for a misspelt intrinsic (MLX raises it from eval as RuntimeError).
COMPILER_SAYS = ("[metal::Device] Unable to build metal library from source\n"
                 "program_source:41:9: error: use of undeclared identifier 'simd_summ'\n"
                 "        simd_summ(acc);\n"
                 "        ^")
# What each failure reports: the compiler's error line, or the evaluation's error.
SAYS = {"build": "error: use of undeclared identifier 'simd_summ'", "call": "error: use of undeclared identifier 'simd_summ'",
        "eval": "LU factorization failed with error code 1"}


class FakeDevice:
    """Stands in for ``mx.fast.metal_kernel``: kernels named in ``broken`` fail ``how``; the others
    run the shipped Metal text in the emulator. Counts the launches that reached the device."""

    def __init__(self, broken=(), how="eval"):
        self.broken, self.how, self.launches = set(broken), how, []

    def __call__(self, *, name, input_names, output_names, source, header):
        kernel = next(k for k in KERNELS if k.mlx_kernel_args("metal")["name"] == name)
        if kernel.name in self.broken and self.how == "build":
            raise RuntimeError(COMPILER_SAYS)

        def launch(inputs, template, grid, threadgroup, output_shapes, output_dtypes, **kw):
            self.launches.append(kernel.name)
            if kernel.name in self.broken and self.how == "call":
                raise RuntimeError(COMPILER_SAYS)
            if kernel.name in self.broken:  # "eval": lazy arrays whose evaluation raises, as MLX's compile does
                failing = mx.linalg.inv(mx.zeros((2, 2)), stream=mx.cpu)[0, 0]  # LU fails at eval time
                return [mx.zeros(tuple(s), d) + failing.astype(d) for s, d in zip(output_shapes, output_dtypes)]
            return emulate(kernel, inputs, template=template, grid=grid, threadgroup=threadgroup,
                           output_shapes=output_shapes, output_dtypes=output_dtypes, **kw)

        return launch


def _kernels():
    from mlx_zeta.kernels import attention, ternary
    return (attention._PREFILL, attention._DECODE, attention._COMBINE, ternary._GEMV, ternary._GEMM)


KERNELS = _kernels()


@pytest.fixture
def device(monkeypatch):
    """A Mac whose Metal compiler is a FakeDevice (set ``device.broken`` / ``device.how``)."""
    if compiler() is None:
        pytest.skip("no C++ compiler (g++) to run the kernel emulator")
    fake = FakeDevice()
    monkeypatch.setattr(dispatch, "gpu_backend", lambda: "metal")
    monkeypatch.setattr(mx.fast, "metal_kernel", fake)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.delenv(dispatch.STRICT_ENV_VAR, raising=False)
    dispatch.reset_kernel_failures()
    yield fake
    dispatch.reset_kernel_failures()


def qkv(lq, lk=21, seed=0):
    rng = np.random.default_rng(seed)
    return [mx.array(rng.standard_normal(s).astype(np.float32)) for s in ((1, 4, lq, 64), (1, 2, lk, 64), (1, 2, lk, 64))]


def attention_call(lq):
    q, k, v = qkv(lq)
    return lambda use_kernel=None: fused_attention(q, k, v, causal=True, softcap=2.0, window=7, use_kernel=use_kernel)


def ternary_call(m):
    rng = np.random.default_rng(1)
    x = mx.array(rng.standard_normal((m, 40)).astype(np.float32))
    packed = pack_2bit(mx.array(rng.integers(-1, 2, (12, 40)).astype(np.int8)))
    return lambda use_kernel=None: ternary_matmul(x, packed, 12, use_kernel=use_kernel)


CASES = {"attention_prefill": (attention_call, 17), "attention_decode": (attention_call, 3),
         "attention_decode_combine": (attention_call, 3), "ternary_gemv": (ternary_call, 2),
         "ternary_gemm": (ternary_call, 9)}
FAMILY = {"attention_prefill": "attention", "attention_decode": "attention", "attention_decode_combine": "attention",
          "ternary_gemv": "ternary", "ternary_gemm": "ternary"}


@pytest.mark.parametrize("how", ["build", "call", "eval"])
@pytest.mark.parametrize("kernel", sorted(CASES))
def test_failure_warns_once_and_falls_back_to_the_reference(device, kernel, how):
    device.broken, device.how = {kernel}, how
    make, size = CASES[kernel]
    call = make(size)
    want = call(use_kernel=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = [call() for _ in range(3)]
    fallbacks = [w for w in seen if issubclass(w.category, dispatch.KernelFallbackWarning)]
    assert len(fallbacks) == 1, [str(w.message) for w in seen]
    text = str(fallbacks[0].message)
    assert f"kernel {FAMILY[kernel]}.{kernel} failed to compile or launch on metal" in text
    assert SAYS[how] in text  # the compiler's lines, not only its first
    assert "MLX_ZETA_KERNELS_STRICT=1" in text
    for g in got:
        assert mx.array_equal(g, want).item()  # the reference itself, bit for bit
    assert not dispatch.kernel_usable(f"{FAMILY[kernel]}.{kernel}", "metal")
    assert dispatch.kernel_usable(f"{FAMILY[kernel]}.{kernel}", "cuda")  # per (kernel, backend)
    assert device.launches.count(kernel) <= 1  # never launched again once failed


def test_other_kernels_keep_running_on_the_device(device):
    """Only the failed kernel falls back: the decode kernels still run on the (fake) device."""
    device.broken = {"attention_prefill"}
    prefill, decode = attention_call(17), attention_call(3)
    with pytest.warns(dispatch.KernelFallbackWarning, match="attention.attention_prefill"):
        assert mx.array_equal(prefill(), prefill(use_kernel=False)).item()
    before = len(device.launches)
    np.testing.assert_allclose(np.array(decode()), np.array(decode(use_kernel=False)), rtol=1e-5, atol=1e-5)
    assert device.launches[before:] == ["attention_decode", "attention_decode_combine"]
    ternary = ternary_call(9)
    np.testing.assert_allclose(np.array(ternary()), np.array(ternary(use_kernel=False)), rtol=1e-5, atol=1e-5)
    assert device.launches[-1] == "ternary_gemm"  # the emulated device kernel sums in its own order: close, not equal


def test_gradients_after_a_failure_are_the_references(device):
    device.broken = {"attention_prefill"}
    q, k, v = qkv(17)

    def grads(use_kernel):
        f = lambda q, k, v: (fused_attention(q, k, v, causal=True, softcap=2.0, use_kernel=use_kernel) ** 2).sum()
        return mx.grad(f, argnums=(0, 1, 2))(q, k, v)

    with pytest.warns(dispatch.KernelFallbackWarning):
        got = grads(None)
    for g, w in zip(got, grads(False)):
        assert mx.array_equal(g, w).item()


@pytest.mark.parametrize("setting", ["env", "context"])
@pytest.mark.parametrize("how", ["build", "eval"])
def test_strict_raises_one_line_naming_kernel_and_backend(device, monkeypatch, setting, how):
    device.broken, device.how = {"ternary_gemv"}, how
    call = ternary_call(2)
    if setting == "env":
        monkeypatch.setenv(dispatch.STRICT_ENV_VAR, "1")
    with use_kernels(strict=True if setting == "context" else None), warnings.catch_warnings():
        warnings.simplefilter("error", dispatch.KernelFallbackWarning)  # strict never warns
        with pytest.raises(dispatch.KernelError) as info:
            call()
    assert_one_line(str(info.value), "ternary.ternary_gemv", "metal", "strict",
                    pattern=SAYS[how] + "$")
    assert dispatch.kernel_usable("ternary.ternary_gemv", "metal")  # nothing recorded: the next call tries again
    with use_kernels(strict=False):  # the context overrides the environment
        with pytest.warns(dispatch.KernelFallbackWarning):
            call()


def test_emulated_kernels_always_raise(monkeypatch):
    """The fallback is for device compilers only: the emulator's errors (the tests' signal) propagate."""
    if compiler() is None:
        pytest.skip("no C++ compiler (g++) to run the kernel emulator")
    broken = Kernel("ternary", "no_such_kernel", ("x", "w", "dims"), ("y",))
    with pytest.raises(ValueError, match="has no kernel 'no_such_kernel'"):
        broken([mx.zeros((8,))], template=[], grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(1,)],
               output_dtypes=[mx.float32], mode="emulate")


@pytest.mark.skipif(dispatch.gpu_backend() is not None, reason="checks MLX's own error on a machine without Metal")
def test_this_machine_without_metal_falls_back_with_mlx_message(monkeypatch):
    """Unfaked: MLX's metal_kernel on Linux raises "No Metal back-end" when called."""
    monkeypatch.setattr(dispatch, "gpu_backend", lambda: "metal")
    dispatch.reset_kernel_failures()
    call = attention_call(3)
    try:
        with pytest.warns(dispatch.KernelFallbackWarning, match="No Metal back-end"):
            assert mx.array_equal(call(), call(use_kernel=False)).item()
    finally:
        dispatch.reset_kernel_failures()


@pytest.mark.parametrize("how", ["build", "call", "eval"])
def test_inside_mx_compile(device, how):
    """Under mx.compile a failure while building or calling the kernel is caught as anywhere else;
    one that MLX raises only at evaluation cannot be probed while tracing (the inputs are tracers)
    and surfaces where the compiled function is evaluated (the dispatch docstring says so), unless
    an eager call probed the instantiation first."""
    device.broken, device.how = {"attention_prefill"}, how
    q, k, v = qkv(17)
    want = fused_attention(q, k, v, causal=True, use_kernel=False)
    compiled = mx.compile(lambda q, k, v: fused_attention(q, k, v, causal=True))
    if how == "eval":
        with pytest.raises(RuntimeError, match="LU factorization failed"):
            mx.eval(compiled(q, k, v))
        with pytest.warns(dispatch.KernelFallbackWarning):  # an eager call probes and falls back ...
            fused_attention(q, k, v, causal=True)
        compiled = mx.compile(lambda q, k, v: fused_attention(q, k, v, causal=True) + 0)  # ... and a fresh trace too
    else:
        with pytest.warns(dispatch.KernelFallbackWarning):
            compiled(q, k, v)
    assert mx.array_equal(compiled(q, k, v), want).item()
