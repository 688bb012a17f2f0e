"""The AVX-512 and AVX-512 VNNI kernel paths executed on any x86-64 CPU: the standalone driver is
built with -DZETA_SIMDE, which compiles avx512.cpp / avx512vnni.cpp against SIMDe's portable
implementation of the intrinsics (Debian libsimde-dev, header-only) instead of the compiler's, and
makes isa.cpp report those two ISAs usable in that build only. The numpy comparisons are the same
as for the native paths (cpu_kernel_driver.check_ternary / check_affine). On a CPU with AVX-512 the
native paths are also run by test_cpu_kernels_isa.py."""

import platform
from pathlib import Path

import pytest

from cpu_kernel_driver import Driver, build_driver, check_affine, check_ternary, have

SIMDE = Path("/usr/include/simde/x86/avx512.h")

pytestmark = [
    pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="SIMDe AVX-512 build targets x86-64"),
    pytest.mark.skipif(not have("g++"), reason="needs g++ to build the kernel driver"),
    pytest.mark.skipif(not SIMDE.exists(), reason="needs SIMDe headers (Debian/Ubuntu: apt install libsimde-dev)"),
]

# SIMDe's AVX-512 emulation is slow to compile at -O2; -O1 (after the driver's -O2) halves that.
EMULATED = {"avx512": ["-mavx2", "-mfma", "-O1"], "avx512vnni": ["-mavx2", "-mfma", "-O1"]}


@pytest.fixture(scope="module")
def driver():
    return Driver(build_driver("g++", extra=["-DZETA_SIMDE"], per_file=EMULATED))


def test_emulated_isas_are_usable(driver):
    assert {"avx512", "avx512vnni", "scalar"} <= set(driver.isas())


@pytest.mark.parametrize("isa", ["avx512", "avx512vnni"])
@pytest.mark.parametrize("threads", [1, 2])
def test_emulated_isa_matches_numpy(driver, isa, threads, tmp_path, rng):
    check_ternary(driver, isa, tmp_path, rng, threads)
    check_affine(driver, isa, tmp_path, rng, threads)
