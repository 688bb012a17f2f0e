"""mlx_zeta.kernels.dispatch, the one place that picks a kernel path: the mode vocabulary (context
manager, environment variable, per-call use_kernel), its errors, thread isolation, and the
custom-VJP factory every kernel uses (gradients come from the reference, frozen and integer
inputs get zeros)."""

import threading

import mlx_zeta  # noqa: F401
import numpy as np
import pytest

import mlx.core as mx

from mlx_zeta.kernels import ENV_VAR, gpu_backend, kernel_mode, kernels_active, resolve, use_kernels, with_reference_vjp

GPU = gpu_backend()
needs_cpu = pytest.mark.skipif(GPU is not None, reason="expectations for a machine without Metal/CUDA")


@needs_cpu
def test_cpu_machine_resolves_to_the_reference(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert kernel_mode() == "auto"
    assert resolve() == resolve(None) == resolve(False) == "reference"
    assert not kernels_active()
    with pytest.raises(ValueError, match=r"use_kernel=True needs Metal, CUDA or a native CPU kernel"):
        resolve(True)


def test_modes_per_call_and_by_context(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve("emulate") == "emulate" and resolve("emulate-cuda") == "emulate-cuda"
    assert resolve("off") == "reference"
    with use_kernels("emulate"):
        assert kernel_mode() == "emulate" and kernels_active()
        assert resolve() == resolve(True) == "emulate"  # True: a kernel; here the emulated one
        assert resolve(False) == "reference"
        with use_kernels("off"):  # contexts nest
            assert resolve() == "reference" and not kernels_active()
            with pytest.raises(ValueError, match=r"use_kernel=True needs Metal, CUDA or a native CPU kernel \(mode 'off'"):
                resolve(True)
        assert resolve() == "emulate"
    assert kernel_mode() == "auto"


def test_environment_variable_sets_the_process_default(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "emulate-cuda")
    assert resolve() == "emulate-cuda"
    with use_kernels("off"):  # a context wins over the environment
        assert resolve() == "reference"
    monkeypatch.setenv(ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match=r"expected \$MLX_ZETA_KERNELS in \('auto', 'off', 'emulate', 'emulate-cuda'\)"):
        resolve()


def test_bad_values_are_named():
    with pytest.raises(ValueError, match=r"use_kernel must be None, True, False or one of"):
        resolve("metal")
    with pytest.raises(ValueError, match=r"use_kernel must be None, True, False or one of"):
        resolve(1)
    with pytest.raises(ValueError, match=r"expected mode in \('auto', 'off', 'emulate', 'emulate-cuda'\), got 'gpu'"):
        with use_kernels("gpu"):
            pass


def test_context_is_per_thread():
    seen = {}
    inside, release = threading.Event(), threading.Event()

    def other():
        inside.wait()
        seen["other"] = kernel_mode()
        release.set()

    t = threading.Thread(target=other)
    t.start()
    with use_kernels("emulate"):
        inside.set()
        release.wait()
        seen["here"] = kernel_mode()
    t.join()
    assert seen["here"] == "emulate" and seen["other"] != "emulate"


def test_with_reference_vjp_takes_the_gradient_of_the_reference():
    """forward and reference differ on purpose (a planted forward: 3 x + w, reference 2 x + w): the
    value is forward's and the gradient the reference's, so a kernel needs no backward of its own;
    the frozen position and integer inputs get zero cotangents."""
    def reference(x, w, n):
        return 2 * x * w + n.astype(mx.float32)

    def forward(x, w, n):
        return 3 * x * w + n.astype(mx.float32)

    f = with_reference_vjp(forward, reference, frozen=(1,))
    x, w, n = mx.array([1.0, -2.0]), mx.array([0.5, 4.0]), mx.array([1, 2], dtype=mx.int32)
    np.testing.assert_array_equal(np.array(f(x, w, n)), [2.5, -22.0])
    ct = mx.array([1.0, 10.0])
    _, (dx, dw, dn) = mx.vjp(f, [x, w, n], [ct])
    np.testing.assert_array_equal(np.array(dx), [1.0, 80.0])  # d(2 x w)/dx * ct = 2 w ct
    assert not np.any(np.array(dw)) and not np.any(np.array(dn))
    g = with_reference_vjp(forward, reference)  # w not frozen: its gradient is 2 x ct
    _, (_, dw, _) = mx.vjp(g, [x, w, n], [ct])
    np.testing.assert_array_equal(np.array(dw), [2.0, -40.0])
