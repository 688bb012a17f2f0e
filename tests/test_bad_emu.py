"""Malformed input to the kernel emulator (mlx_zeta.kernels.emulate): launches past the device's
limits, bad settings; each a one-line error naming the kernel or setting and what was expected."""

import sys

import mlx_zeta  # noqa: F401
import pytest

import mlx.core as mx

from mlx_zeta.kernels import Kernel, KernelSource
from mlx_zeta.kernels.emulate import compiler, concurrent_groups, emulate, kernel_sources
from badinput import api_error

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C++ compiler (g++) to run the kernel emulator")

KERNEL = Kernel("bad", "k", ("x",), ("y",))
BODY = KernelSource("bad-inline", "", {"k": "y[0] = x[0];"})


def _launch(grid, threadgroup, body=BODY, dialect="metal"):
    return emulate(KERNEL, [mx.ones((8,))], template=[], grid=grid, threadgroup=threadgroup, output_shapes=[(8,)],
                   output_dtypes=[mx.float32], source=body, dialect=dialect)


@pytest.mark.parametrize("grid, threadgroup, pattern", [
    ((2048, 1, 1), (2048, 1, 1), r"at most 1024 threads per threadgroup"),
    ((64, 32, 1), (64, 32, 1), r"at most 1024 threads per threadgroup .* = 2048"),
    ((100, 1, 1), (64, 1, 1), r"grid that is a multiple of the threadgroup, got grid \(100, 1, 1\)"),
])
def test_bad_launch_geometry(grid, threadgroup, pattern):
    api_error(ValueError, _launch, grid, threadgroup, names=("bad.k",), pattern=pattern)


@pytest.mark.parametrize("dialect, body, limit", [
    ("metal", "threadgroup float big[16384]; big[0] = x[0]; y[0] = big[0];", 32768),  # 64 KiB
    ("cuda", "__shared__ double big[8192]; big[0] = x[0]; y[0] = big[0];", 49152),
])
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="threadgroup memory is measured in an ELF section")
def test_threadgroup_memory_past_the_limit(dialect, body, limit):
    src = KernelSource("bad-inline", "", {"k": body})
    api_error(ValueError, _launch, (8, 1, 1), (8, 1, 1), src, dialect, names=("bad.k", "big"),
              pattern=rf"expected at most {limit} bytes")


def test_concurrent_groups_needs_a_positive_count():
    api_error(ValueError, concurrent_groups(0).__enter__, names=("concurrent_groups", "workers"))


def test_kernel_sources_needs_a_dialect():
    api_error(ValueError, kernel_sources("bad", "opencl", BODY).__enter__, names=("kernel_sources", "dialect"))
