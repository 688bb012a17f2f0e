"""Every native CPU kernel path this machine can execute, forced by name through the standalone
driver (tests/cpu_kernel_driver.py) and compared with numpy: the portable scalar kernels and each
x86 instruction set the CPU has. AVX-512 paths on CPUs without AVX-512 and the ARM64 NEON paths
are executed by test_cpu_kernels_simde.py and test_cpu_kernels_arm.py."""

import platform

import pytest

from cpu_kernel_driver import Driver, build_driver, check_affine, check_ternary, have

pytestmark = pytest.mark.skipif(not have("g++"), reason="needs g++ to build the kernel driver")


@pytest.fixture(scope="module")
def driver():
    return Driver(build_driver("g++", arch=platform.machine()))


def _isas(driver):
    return driver.isas()


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512vnni", "neon", "neon-dotprod"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_isa_matches_numpy(driver, isa, threads, tmp_path, rng):
    if isa not in _isas(driver):
        pytest.skip(f"this CPU or build has no {isa} (usable: {', '.join(_isas(driver))})")
    check_ternary(driver, isa, tmp_path, rng, threads)
    check_affine(driver, isa, tmp_path, rng, threads)


def test_unknown_isa_is_one_line(driver, tmp_path, rng):
    import numpy as np
    with pytest.raises(RuntimeError, match="CPU ISA 'sse9' is not available on this machine .*usable here: auto"):
        driver.ternary(tmp_path, "sse9", np.zeros((1, 4), np.int8), np.zeros((1, 4), np.uint8), 1)
