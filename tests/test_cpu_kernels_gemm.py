"""The x86 affine GEMM path (avx2.cpp: from 32 rows of x, a dequantised float32 tile and a 6 x 16
register-blocked FMA kernel; the AVX-512 tables use it too) over shapes that reach it: M past the
threshold with every row remainder of the 6-row kernel that the shapes below give (2, 1, 3), N not
a multiple of the 16-row tile, and K over the 4096 chunk (a second chunk adds into y). Compared
with numpy by cpu_kernel_driver.check_affine, like every other path."""

import platform

import pytest

import cpu_kernel_driver
from cpu_kernel_driver import Driver, build_driver, check_affine, have

pytestmark = pytest.mark.skipif(not have("g++") or platform.machine() not in ("x86_64", "AMD64"),
                                reason="needs g++ on x86-64 to build the kernel driver")

GEMM_SHAPES = [(32, 256, 37), (37, 128, 16), (45, 4352, 19)]


@pytest.fixture(scope="module")
def driver():
    return Driver(build_driver("g++", arch=platform.machine()))


@pytest.mark.parametrize("isa", ["avx2", "avx512", "avx512vnni"])
def test_affine_gemm_matches_numpy(driver, isa, tmp_path, rng, monkeypatch):
    if isa not in driver.isas():
        pytest.skip(f"this CPU or build has no {isa} (usable: {', '.join(driver.isas())})")
    monkeypatch.setattr(cpu_kernel_driver, "AFFINE_SHAPES", GEMM_SHAPES)
    check_affine(driver, isa, tmp_path, rng, threads=2)
