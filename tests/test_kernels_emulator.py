"""The CPU emulator that runs our Metal/CUDA kernel text: its own semantics checked on tiny
kernels (barriers, threadgroup memory, SIMD collectives, half types, junk-filled outputs,
deadlock detection), so that the kernel tests built on it can be trusted."""

import numpy as np
import pytest

import mlx.core as mx

from mlx_zeta.kernels import Kernel, KernelSource
from mlx_zeta.kernels.emulate import compiler, emulate

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C++ compiler (g++) to run the kernel emulator")

# Reverse 64 values through threadgroup memory: each thread writes its slot, then reads its
# mirror's. Correct only if every write lands before any read, i.e. with the barrier.
REVERSE = """
threadgroup float buf[64];
const uint i = thread_position_in_threadgroup.x;
buf[i] = x[threadgroup_position_in_grid.x * 64 + i] * 2.0f;
threadgroup_barrier(mem_flags::mem_threadgroup);
y[threadgroup_position_in_grid.x * 64 + i] = buf[63 - i];
"""

SIMD = """
const uint i = thread_position_in_grid.x;
const float v = x[i];
const float s = simd_sum(v);
const float m = simd_max(v);
const float n = simd_shuffle_xor(v, 1u);
const float b = simd_broadcast(v, 3u);
y[i * 4 + 0] = s;
y[i * 4 + 1] = m;
y[i * 4 + 2] = n;
y[i * 4 + 3] = b;
"""

CUDA_REVERSE = """
__shared__ float buf[64];
const int i = threadIdx.x;
buf[i] = x[blockIdx.x * 64 + i] * 2.0f;
__syncthreads();
float v = buf[63 - i];
v += __shfl_xor_sync(0xffffffffu, v, 16);
y[blockIdx.x * 64 + i] = v;
"""


def run(body, x, out_shape, *, dialect="metal", grid=(128, 1, 1), tg=(64, 1, 1), template=(), out_dtype=mx.float32,
        timeout=60.0, init_value=None):
    kernel = Kernel("test", "k", ("x",), ("y",))
    src = KernelSource("test-inline", "", {"k": body})
    return emulate(kernel, [x], template=list(template), grid=grid, threadgroup=tg, output_shapes=[out_shape],
                   output_dtypes=[out_dtype], dialect=dialect, source=src, timeout=timeout, init_value=init_value)[0]


def test_threadgroup_memory_and_barrier():
    x = np.arange(128, dtype=np.float32)
    y = np.array(run(REVERSE, mx.array(x), (128,)))
    expected = np.concatenate([2 * x[:64][::-1], 2 * x[64:][::-1]])  # two groups, each reversed
    np.testing.assert_array_equal(y, expected)


def test_removing_the_barrier_is_caught():
    """Without the barrier, threads read slots their neighbours have not written yet (or, in the
    second group, still hold the first group's values): some run of 5 must go wrong."""
    x = mx.array(np.arange(128, dtype=np.float32))
    expected = np.concatenate([2 * np.arange(64)[::-1], 2 * np.arange(64, 128)[::-1]])
    broken = REVERSE.replace("threadgroup_barrier(mem_flags::mem_threadgroup);", "")
    wrong = sum(not np.array_equal(np.array(run(broken, x, (128,))), expected) for _ in range(5))
    assert wrong >= 1


def test_simd_collectives_by_hand():
    x = np.arange(64, dtype=np.float32) * 0.5
    y = np.array(run(SIMD, mx.array(x), (64 * 4,), grid=(64, 1, 1), tg=(64, 1, 1))).reshape(64, 4)
    for lane in range(64):
        group = x[(lane // 32) * 32:(lane // 32) * 32 + 32]
        assert y[lane, 0] == group.sum() and y[lane, 1] == group.max()
        assert y[lane, 2] == x[lane ^ 1] and y[lane, 3] == group[3]


def test_cuda_dialect_shared_memory_and_shuffle():
    x = np.arange(128, dtype=np.float32)
    y = np.array(run(CUDA_REVERSE, mx.array(x), (128,), dialect="cuda"))
    rev = np.concatenate([2 * x[:64][::-1], 2 * x[64:][::-1]])
    lane = np.arange(128) % 64
    partner = (lane % 32 ^ 16) + (lane // 32) * 32 + (np.arange(128) // 64) * 64
    np.testing.assert_array_equal(y, rev + rev[partner])


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_types_round_to_nearest_even(dtype):
    body = "const uint i = thread_position_in_grid.x; y[i] = T(static_cast<float>(x[i]) * 3.0f);"
    x = mx.array(np.random.default_rng(0).standard_normal(64).astype(np.float32))
    y = run(body, x, (64,), grid=(64, 1, 1), tg=(32, 1, 1), template=[("T", dtype)], out_dtype=dtype)
    assert y.dtype == dtype
    np.testing.assert_array_equal(np.array(y.astype(mx.float32)), np.array((x * 3).astype(dtype).astype(mx.float32)))


def test_unwritten_outputs_are_junk_unless_init_value():
    body = "const uint i = thread_position_in_grid.x; if (i % 2 == 0) { y[i] = x[i]; }"
    x = mx.ones((64,))
    y = np.array(run(body, x, (64,), grid=(64, 1, 1), tg=(32, 1, 1)))
    assert np.all(y[::2] == 1) and np.all(y[1::2] > 1e38)
    y = np.array(run(body, x, (64,), grid=(64, 1, 1), tg=(32, 1, 1), init_value=0.0))
    assert np.all(y[1::2] == 0)


def test_deadlock_and_compile_errors_are_named():
    stuck = "if (thread_position_in_threadgroup.x == 0) { threadgroup_barrier(mem_flags::mem_threadgroup); } y[0] = 1;"
    with pytest.raises(RuntimeError, match=r"test\.k ran past 3\.0 s: a barrier"):
        run(stuck, mx.ones((4,)), (4,), grid=(4, 1, 1), tg=(4, 1, 1), timeout=3.0)
    with pytest.raises(RuntimeError, match=r"compiling .* failed:(.|\n)*not_a_function"):
        run("y[0] = not_a_function(x[0]);", mx.ones((4,)), (4,), grid=(4, 1, 1), tg=(4, 1, 1))
    with pytest.raises(ValueError, match=r"multiple of a threadgroup"):
        run(REVERSE, mx.ones((100,)), (100,), grid=(100, 1, 1), tg=(64, 1, 1))
