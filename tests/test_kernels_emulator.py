"""The CPU emulator that runs our Metal/CUDA kernel text: its own semantics checked on tiny
kernels (barriers, threadgroup memory, SIMD collectives, half types, junk-filled outputs,
deadlock detection) and its hardening (bounds-checked buffers and arrays, poisoned threadgroup
memory, the device's limits, address spaces as types, threadgroups run concurrently), so that
the kernel tests built on it can be trusted."""

import sys

import numpy as np
import pytest

import mlx.core as mx

from mlx_zeta.kernels import Kernel, KernelSource
from mlx_zeta.kernels.emulate import KernelFault, compiler, concurrent_groups, emulate

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
    with pytest.raises(ValueError, match=r"multiple of the threadgroup"):
        run(REVERSE, mx.ones((100,)), (100,), grid=(100, 1, 1), tg=(64, 1, 1))


# ---------------------------------------------------------------- hardening
# Poisoning and measuring threadgroup memory use an ELF section (emulator.h): Linux, where CI runs.
elf_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="threadgroup memory lives in an ELF section")
# Every index below is hand-picked: one element past either end of a 64-element buffer (2 groups of
# 32 threads), or of a 32-element threadgroup array / a 4-element thread-local array.
OOB = {
    "device read past the end": ("uint i = thread_position_in_grid.x; y[i] = x[i + 1];", "read", "device", "x", 64),
    "device write past the end": ("uint i = thread_position_in_grid.x; y[i + 1] = x[i];", "write", "device", "y", 64),
    "device read before the start": ("int i = thread_position_in_grid.x; y[i] = x[i - 1];", "read", "device", "x", -1),
    "threadgroup write past the end": ("threadgroup float b[32]; uint i = thread_position_in_threadgroup.x; "
                                       "b[i + 1] = 1.0f; y[thread_position_in_grid.x] = 0.0f;",
                                       "write", "threadgroup", "b", 32),
    "thread-local read past the end": ("float a[4] = {1, 2, 3, 4}; uint i = thread_position_in_grid.x; "
                                       "y[i] = a[i % 5];", "read", "thread", "a", 4),
}


@pytest.mark.parametrize("case", sorted(OOB))
def test_out_of_bounds_access_raises_naming_buffer_and_index(case):
    body, kind, space, buffer, index = OOB[case]
    with pytest.raises(KernelFault, match=rf"test\.k: out-of-bounds {kind} of .*{buffer} at index {index}\b") as info:
        run(body, mx.arange(64, dtype=mx.float32), (64,), grid=(64, 1, 1), tg=(32, 1, 1))
    assert (info.value.kind, info.value.space, info.value.buffer, info.value.index) == (kind, space, buffer, index)
    assert "at k:1" in str(info.value)  # the body's line, from the program's debug info


def test_cuda_shared_memory_is_bounds_checked():
    body = "__shared__ float b[32]; b[threadIdx.x + 1] = 1.0f; y[blockIdx.x * 32 + threadIdx.x] = 0.0f;"
    with pytest.raises(KernelFault, match=r"out-of-bounds write of threadgroup array b at index 32"):
        run(body, mx.ones((64,)), (64,), dialect="cuda", grid=(64, 1, 1), tg=(32, 1, 1))


@elf_only
def test_threadgroup_memory_is_poisoned_for_every_group():
    """Each thread reads its slot, then writes it: group 0 must see NaN (not 0), and group 1 NaN
    again (not group 0's values, as a zero-initialised static would give)."""
    body = """
threadgroup float b[32];
threadgroup int n[32];
const uint i = thread_position_in_threadgroup.x;
y[thread_position_in_grid.x] = b[i] + float(n[i]);
threadgroup_barrier(mem_flags::mem_threadgroup);
b[i] = 7.0f;
n[i] = 7;
"""
    y = np.array(run(body, mx.ones((64,)), (64,), grid=(64, 1, 1), tg=(32, 1, 1)))
    assert np.isnan(y).all()
    ints = ("threadgroup int n[32]; const uint i = thread_position_in_threadgroup.x; "
            "y[thread_position_in_grid.x] = n[i]; n[i] = 7;")
    y = np.array(run(ints, mx.ones((64,)), (64,), grid=(64, 1, 1), tg=(32, 1, 1)))
    assert (y == -1).all()  # 0xFFFFFFFF


@pytest.mark.parametrize("dialect, body, limit", [
    ("metal", "threadgroup float a[4096]; threadgroup float b[4097]; a[0] = b[0] = 1; y[0] = a[0] + b[0];", 32768),
    ("cuda", "__shared__ float a[12289]; a[0] = 1; y[0] = a[0];", 49152)])
@elf_only
def test_threadgroup_memory_limit(dialect, body, limit):
    with pytest.raises(ValueError, match=rf"test\.k: expected at most {limit} bytes of .* per group, got"):
        run(body, mx.ones((8,)), (8,), dialect=dialect, grid=(8, 1, 1), tg=(8, 1, 1))
    fits = body.replace("4097", "4096").replace("12289", "12288")  # exactly at the limit: runs
    y = run(fits, mx.ones((8,)), (8,), dialect=dialect, grid=(8, 1, 1), tg=(8, 1, 1), init_value=0)
    assert float(y[0]) == (2 if dialect == "metal" else 1)  # a[0] + b[0], or a[0]


def test_thread_per_group_limit():
    with pytest.raises(ValueError, match=r"test\.k: expected at most 1024 threads per threadgroup .* = 1088"):
        run("y[0] = x[0];", mx.ones((8,)), (8,), grid=(1088, 1, 1), tg=(1088, 1, 1))


@pytest.mark.parametrize("line, spaces", [  # (what g++ names as the source type, the target type)
    ("threadgroup float b[32]; const device float* p = b;", "tg_array<float, ?32>.*device_space, ?const float"),
    ("threadgroup float* t = y;", "device_space, ?float>.*threadgroup_space, ?float"),
    ("constant float* c = y;", "device_space, ?float>.*constant_space, ?float"),
    ("float r = 1.0f; thread float* t = &r; device float* d = t;", "thread_space, ?float>.*device_space, ?float"),
    ("const constant float* c = nullptr; const device float* d = c;", "constant_space, ?const float>.*device_space")])
def test_mixing_address_spaces_fails_to_compile(line, spaces):
    """Metal rejects a pointer of one address space where another is expected; so must the emulator
    (where the qualifiers are erased, every one of these would compile and run)."""
    with pytest.raises(RuntimeError, match=rf"test\.k: address-space check failed(.|\n)*{spaces}"):
        run(line + " y[0] = x[0];", mx.ones((8,)), (8,), grid=(8, 1, 1), tg=(8, 1, 1))


# Group g (one thread each) appends to a chain that group g - 1 started: right only when the groups
# run one after another in order, which neither Metal nor CUDA promises.
CHAIN = "const uint g = threadgroup_position_in_grid.x; y[g] = g == 0 ? 1.0f : y[g - 1] + 1.0f;"


def test_concurrent_groups_expose_reliance_on_group_order():
    x = mx.ones((8,))
    sequential = np.array(run(CHAIN, x, (8,), grid=(8, 1, 1), tg=(1, 1, 1)))
    np.testing.assert_array_equal(sequential, np.arange(1, 9))
    with concurrent_groups(4):
        assert not np.array_equal(np.array(run(CHAIN, x, (8,), grid=(8, 1, 1), tg=(1, 1, 1))), sequential)
        # the reversal kernel of the tests above has no such reliance: the same answer as in order
        y = np.array(run(REVERSE, mx.arange(128, dtype=mx.float32), (128,)))
    np.testing.assert_array_equal(y, 2 * np.concatenate([np.arange(64)[::-1], np.arange(64, 128)[::-1]]))
