"""The ARM64 kernels (csrc/kernels/neon.cpp, neon_dotprod.cpp) executed on this x86 box: the
standalone driver is cross-compiled with aarch64-linux-gnu-g++ (statically, so qemu needs no
aarch64 sysroot) and run under qemu-user, then compared with numpy (tests/cpu_kernel_driver.py).

``-cpu max`` has FEAT_DotProd, so all three ARM paths run there; ``-cpu cortex-a53`` (ARMv8.0)
has none, which checks the run-time detection (isa.cpp, getauxval) and the plain NEON path on a
CPU where the dot-product instructions would fault."""

import numpy as np
import pytest

from cpu_kernel_driver import Driver, build_driver, check_affine, check_ternary, have, pack_ternary

CXX, QEMU = "aarch64-linux-gnu-g++", "qemu-aarch64"

pytestmark = [
    pytest.mark.skipif(not have(CXX), reason=f"needs {CXX} (Debian package g++-aarch64-linux-gnu)"),
    pytest.mark.skipif(not have(QEMU), reason=f"needs {QEMU} (Debian package qemu-user)"),
]


@pytest.fixture(scope="module")
def exe():
    return build_driver(CXX, arch="aarch64", extra=["-static"])


def qemu(exe, cpu: str) -> Driver:
    return Driver(exe, [QEMU, "-cpu", cpu])


@pytest.mark.parametrize("isa", ["neon-dotprod", "neon", "scalar"])
def test_arm_isa_matches_numpy(exe, isa, tmp_path, rng):
    driver = qemu(exe, "max")
    assert isa in driver.isas()
    check_ternary(driver, isa, tmp_path, rng, threads=3)  # 3 threads: uneven shares of the rows
    check_affine(driver, isa, tmp_path, rng, threads=3)


def test_cpu_without_dotprod_uses_plain_neon(exe, tmp_path, rng):
    driver = qemu(exe, "cortex-a53")
    isas = driver.isas()
    assert "neon" in isas and "neon-dotprod" not in isas, isas
    check_ternary(driver, "neon", tmp_path, rng, threads=2)
    check_affine(driver, "neon", tmp_path, rng, threads=2)
    with pytest.raises(RuntimeError, match="'neon-dotprod' is not available on this machine"):
        driver.ternary(tmp_path, "neon-dotprod", np.zeros((1, 16), np.int8), np.zeros((1, 16), np.uint8), 1)


@pytest.mark.parametrize("isa", ["neon-dotprod", "neon"])
def test_int8_extremes_stay_exact(exe, isa, tmp_path):
    """Every product at its extreme (c = 2 against x = -128 or 127) over a long K: the worst case
    for the int16 partial sums of the plain NEON kernel, which random data never reaches."""
    K = 4111
    w = np.ones((5, K), np.int64)
    w[1] = -1
    w[2, ::2] = 0
    x = np.full((3, K), -128, np.int8)
    x[1] = 127
    got = qemu(exe, "max").ternary(tmp_path, isa, x, pack_ternary(w), 5, threads=1)
    assert np.array_equal(got, x.astype(np.int64) @ w.T), got - x.astype(np.int64) @ w.T
