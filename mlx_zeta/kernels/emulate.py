"""Run the shipped Metal (or CUDA) kernel text on the CPU, for checking kernels without a GPU.

The body of a kernel is compiled verbatim with g++ against ``metal/emulator.h``, behind a
signature generated as MLX generates it for ``mx.fast.metal_kernel`` (inputs as
``const device T* name``, outputs as ``device T* name``, the template parameters, the
thread-position attributes) or ``mx.fast.cuda_kernel`` (``const T* name``, ``T* name``,
built-in ``threadIdx``/``blockIdx``). Threadgroups run in sequence and the threads of a
group run concurrently with real barriers (see the header), so a missing barrier or a
wrong index shows up as a wrong result, and a barrier not reached by every thread as a
deadlock, which the time limit turns into an error.

Each (source, template) instantiation is compiled once into a small program cached under
``$MLX_ZETA_EMULATOR_CACHE`` (default ``~/.cache/mlx_zeta/emulator``); a launch writes the
inputs to a temporary folder, runs the program and reads the outputs back.

Every input is declared ``const device T*``: MLX would declare one of fewer than 8 elements
``constant``, which :class:`~mlx_zeta.kernels.launch.Kernel` prevents by padding small inputs.
Limits: uniform grids only (the grid a multiple of the threadgroup, as our kernels launch);
at most 1024 threads per group; no atomics; ``threadgroup``/``__shared__`` only on array
declarations inside the body.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, List, Sequence

import numpy as np

import mlx.core as mx

from mlx_zeta.common import atomic_path
from mlx_zeta.kernels.source import device_sized, load_source

if TYPE_CHECKING:
    from mlx_zeta.kernels.launch import Kernel

__all__ = ["emulate", "compiler"]

_METAL_TYPES = {mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t", mx.int32: "int32_t",
                mx.uint32: "uint32_t", mx.int8: "int8_t", mx.uint8: "uint8_t", mx.int64: "int64_t",
                mx.int16: "int16_t", mx.uint16: "uint16_t", mx.bool_: "bool"}
_CUDA_TYPES = {**_METAL_TYPES, mx.float16: "__half", mx.bfloat16: "__nv_bfloat16"}
_METAL_ATTRIBUTES = (
    "uint3 thread_position_in_grid", "uint3 threadgroup_position_in_grid", "uint3 thread_position_in_threadgroup",
    "uint3 threads_per_threadgroup", "uint3 threadgroups_per_grid", "uint thread_index_in_threadgroup",
    "uint thread_index_in_simdgroup", "uint simdgroup_index_in_threadgroup")
_METAL_ATTRIBUTE_VALUES = "c.gid, c.bid, c.tid, c.block, c.grid_blocks, c.linear, c.lane, c.warp"
_FLAGS = ["-std=c++20", "-O1", "-pthread", "-w"]


def compiler() -> str | None:
    """The C++ compiler the emulator uses (``$CXX`` or g++), or None when there is none."""
    return shutil.which(os.environ.get("CXX", "g++"))


def _cache_dir() -> Path:
    return Path(os.environ.get("MLX_ZETA_EMULATOR_CACHE", Path.home() / ".cache" / "mlx_zeta" / "emulator"))


def _template_value(value, types) -> str:
    if isinstance(value, mx.Dtype):
        return types[value]
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    raise ValueError(f"[emulate] template values must be mx dtypes, ints or bools, got {value!r}")


def _program(kernel: "Kernel", dialect: str, header: str, body: str, in_dtypes, out_dtypes, template) -> str:
    types = _METAL_TYPES if dialect == "metal" else _CUDA_TYPES
    space_in, space_out = ("const device ", "device ") if dialect == "metal" else ("const ", "")
    params = [f"{space_in}{types[d]}* {n}" for n, d in zip(kernel.input_names, in_dtypes)]
    params += [f"{space_out}{types[d]}* {n}" for n, d in zip(kernel.output_names, out_dtypes)]
    if dialect == "metal":
        params += list(_METAL_ATTRIBUTES)
    tparams = ", ".join(("typename " if isinstance(v, mx.Dtype) else "bool " if isinstance(v, bool) else "int ") + n
                        for n, v in template)
    targs = ", ".join(_template_value(v, types) for _, v in template)
    casts = [f"(const {types[d]}*)bufs[{i}]" for i, d in enumerate(in_dtypes)]
    casts += [f"({types[d]}*)bufs[{len(in_dtypes) + i}]" for i, d in enumerate(out_dtypes)]
    if dialect == "metal":
        casts.append(_METAL_ATTRIBUTE_VALUES)
        spaces = ("#define device\n#define constant\n#define thread\n", "#undef device\n#undef constant\n#undef thread\n")
        shared = "#define threadgroup static\n", "#undef threadgroup\n"
        header_shared = "#define threadgroup\n", "#undef threadgroup\n"
    else:
        spaces = ("", "")
        shared = "#define __shared__ static\n", "#undef __shared__\n"
        header_shared = ("#define __shared__\n", "#undef __shared__\n")
    template_line = f"template <{tparams}>\n" if template else ""
    call = f"kernel_body<{targs}>" if template else "kernel_body"
    return "".join([
        f"#define EMU_{dialect.upper()}\n#include \"emulator.h\"\n#include <cstdio>\n",
        spaces[0], header_shared[0], header, "\n", header_shared[1],
        template_line, f"void kernel_body({', '.join(params)}) {{\n", shared[0], "#line 1 \"", kernel.name, "\"\n",
        body, "\n", shared[1], "}\n", spaces[1], "#line 1 \"launcher\"\n",
        "int main(int argc, char** argv) {\n",
        "  // argv: folder, number of buffers, then grid xyz and threadgroup xyz\n",
        "  std::string dir = argv[1]; int n = std::atoi(argv[2]);\n",
        "  unsigned g[3], t[3]; for (int i = 0; i < 3; ++i) { g[i] = std::atoi(argv[3 + i]); t[i] = std::atoi(argv[6 + i]); }\n",
        "  std::vector<std::vector<unsigned char>> data(n); std::vector<void*> bufs(n);\n",
        "  for (int i = 0; i < n; ++i) {\n",
        "    FILE* f = std::fopen((dir + \"/\" + std::to_string(i)).c_str(), \"rb\");\n",
        "    std::fseek(f, 0, SEEK_END); long size = std::ftell(f); std::fseek(f, 0, SEEK_SET);\n",
        "    data[i].resize(size + 64); if (std::fread(data[i].data(), 1, size, f) != size_t(size)) return 3;\n",
        "    std::fclose(f); bufs[i] = data[i].data();\n  }\n",
        "  emu::launch({g[0] / t[0], g[1] / t[1], g[2] / t[2]}, {t[0], t[1], t[2]}, {g[0], g[1], g[2]},\n",
        f"              [&](emu::Ctx& c) {{ {call}({', '.join(casts)}); }});\n",
        f"  for (int i = {len(in_dtypes)}; i < n; ++i) {{\n",
        "    FILE* f = std::fopen((dir + \"/\" + std::to_string(i)).c_str(), \"wb\");\n",
        "    std::fwrite(data[i].data(), 1, data[i].size() - 64, f); std::fclose(f);\n  }\n  return 0;\n}\n",
    ])


def _build(source: str) -> Path:
    from mlx_zeta.metal import __file__ as metal_init

    include = Path(metal_init).parent
    digest = hashlib.sha256((source + " ".join(_FLAGS) + (include / "emulator.h").read_text()).encode()).hexdigest()[:24]
    exe = _cache_dir() / digest / "kernel"
    if exe.is_file():
        return exe
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("[emulate] no C++ compiler (g++ or $CXX) on PATH; the emulator compiles kernel text")
    exe.parent.mkdir(parents=True, exist_ok=True)
    src = exe.parent / f"kernel-{os.getpid()}.cpp"
    src.write_text(source)
    with atomic_path(exe) as tmp:  # a concurrent build of the same text writes the same program
        proc = subprocess.run([cxx, *_FLAGS, "-I", str(include), str(src), "-o", str(tmp)], capture_output=True,
                              text=True)
        if proc.returncode:
            raise RuntimeError(f"[emulate] compiling {src} failed:\n{proc.stderr[-4000:]}")
    return exe


def _to_bytes(x: mx.array) -> bytes:
    x = mx.contiguous(x)
    if x.dtype == mx.bfloat16:
        x = x.view(mx.uint16)
    return np.ascontiguousarray(np.array(x)).tobytes()


def _from_bytes(raw: bytes, shape, dtype: mx.Dtype) -> mx.array:
    if dtype == mx.bfloat16:
        return mx.array(np.frombuffer(raw, np.uint16).reshape(shape)).view(mx.bfloat16)
    np_dtype = np.dtype(str(dtype).split(".")[-1].replace("bool_", "bool"))
    return mx.array(np.frombuffer(raw, np_dtype).reshape(shape))


def emulate(kernel: "Kernel", inputs: Sequence[mx.array], *, template, grid, threadgroup, output_shapes,
            output_dtypes, init_value: float | None = None, dialect: str = "metal", timeout: float = 120.0,
            source=None) -> List[mx.array]:
    """Launch ``kernel`` (its shipped text, or ``source`` — a :class:`KernelSource` — when given,
    e.g. a deliberately broken copy in a test) on the CPU with MLX's launch conventions.

    Raises ``RuntimeError`` naming the kernel when compilation fails, the program crashes,
    or it runs past ``timeout`` seconds (a barrier some thread never reaches)."""
    src = source if source is not None else load_source(kernel.family, dialect)
    if kernel.name not in src.bodies:
        raise ValueError(f"[emulate] {src.path} has no kernel {kernel.name!r}; it has {sorted(src.bodies)}")
    grid, threadgroup = tuple(int(g) for g in grid), tuple(min(int(t), int(g)) for t, g in zip(threadgroup, grid))
    if any(g % t for g, t in zip(grid, threadgroup)) or np.prod(threadgroup) > 1024:
        raise ValueError(f"[emulate] {kernel.name}: expected a grid that is a multiple of a threadgroup of at most "
                         f"1024 threads, got grid {grid}, threadgroup {threadgroup}")
    inputs = [device_sized(mx.array(x)) for x in inputs]
    program = _program(kernel, dialect, src.header, src.bodies[kernel.name], [x.dtype for x in inputs],
                       list(output_dtypes), list(template))
    exe = _build(program)
    with tempfile.TemporaryDirectory(prefix="mlx_zeta_emu_") as tmp:
        for i, x in enumerate(inputs):
            Path(tmp, str(i)).write_bytes(_to_bytes(x))
        for j, (shape, dtype) in enumerate(zip(output_shapes, output_dtypes)):
            # Without init_value the GPU hands out uninitialised memory: fill with junk (0x7f bytes,
            # about 3.4e38 as float32) so a kernel that forgets to write an element is caught.
            size = int(np.prod(shape)) * dtype.size
            raw = _to_bytes(mx.full(tuple(shape), init_value, dtype=dtype)) if init_value is not None else b"\x7f" * size
            Path(tmp, str(len(inputs) + j)).write_bytes(raw)
        args = [str(exe), tmp, str(len(inputs) + len(output_shapes)), *map(str, grid), *map(str, threadgroup)]
        try:
            proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"[emulate] {kernel.family}.{kernel.name} ran past {timeout} s: a barrier that not "
                               "every thread of a group reaches deadlocks on the GPU too") from e
        if proc.returncode:
            raise RuntimeError(f"[emulate] {kernel.family}.{kernel.name} failed (exit {proc.returncode}): "
                               f"{proc.stderr[-2000:]}")
        return [_from_bytes(Path(tmp, str(len(inputs) + j)).read_bytes(), tuple(shape), dtype)
                for j, (shape, dtype) in enumerate(zip(output_shapes, output_dtypes))]
