"""Run the shipped Metal (or CUDA) kernel text on the CPU, for checking kernels without a GPU.

The body of a kernel is compiled verbatim with g++ against ``metal/emulator.h``, behind a
signature generated as MLX generates it for ``mx.fast.metal_kernel`` (inputs as
``const device T* name``, outputs as ``device T* name``, the template parameters, the
thread-position attributes) or ``mx.fast.cuda_kernel`` (``const T* name``, ``T* name``,
built-in ``threadIdx``/``blockIdx``). The threads of a group run concurrently with real
barriers (see the header), so a missing barrier or a wrong index shows up as a wrong result,
and a barrier not reached by every thread as a deadlock, which the time limit turns into an
error. Each program runs in its own process: a crash never takes the caller down.

Hardening (so that a planted bug cannot hide; ``tests/test_kernels_planted.py`` checks it):

* **Bounds.** Programs are built with AddressSanitizer (``-fsanitize=address``). Each device
  buffer sits in a shared mapping between poisoned gaps of at least its own size, threadgroup
  arrays get redzones (``-fsanitize-sections=emu_tg``), thread-local arrays stack redzones. Any
  out-of-bounds read or write stops the program; a hook in the header prints the buffer and the
  element, and :class:`KernelFault` reports kernel, buffer, index and the body's line. Why not
  the alternatives: checked accessor classes in the signature lose the check as soon as a body
  declares its own pointer (``const device T* kb = k + off;`` is a plain pointer once address
  spaces are erased, and CUDA pointers have no qualifier to hook at all), and guard pages catch
  only one side of a buffer, only past a page boundary, and nothing in threadgroup or thread
  memory. The sanitizer instruments every access the compiler emits, through any pointer, in
  both dialects, with the text untouched.
* **Threadgroup memory** is a static array in the ELF section ``emu_tg`` (the body becomes a
  plain function with its template parameters as constants, because GCC ignores section
  attributes on statics of template instantiations); the launcher fills it with 0xFF bytes
  before every group (NaN in float types, -1 in signed integers), so a read before the group's
  own write is exposed. The arrays' sizes come from the program's symbol table (``nm``).
* **Limits**: at most :data:`MAX_THREADS` threads per group; at most
  :data:`METAL_THREADGROUP_MEMORY` bytes of threadgroup memory (Metal) or
  :data:`CUDA_STATIC_SHARED_MEMORY` of static ``__shared__`` memory (CUDA); ``ValueError``.
* **Address spaces**: besides the real build, a Metal body is compiled with ``-fsyntax-only``
  after :func:`~mlx_zeta.kernels.address_spaces.lower` turns its qualified pointers and arrays
  into distinct types, so a threadgroup pointer where a device pointer is expected (etc.) fails
  to compile, as it does on a Mac. The program that runs keeps the verbatim text.
* **Group order**: inside :func:`concurrent_groups` several groups run at once, in worker
  processes sharing device memory, in reverse order, exposing groups that race on device memory
  or rely on running in order.

Each (source, template) instantiation is compiled once into a small program cached under
``$MLX_ZETA_EMULATOR_CACHE`` (default ``~/.cache/mlx_zeta/emulator``), with a precompiled
header per dialect; :func:`compile_kernel` builds without launching (tests build many at once).
A launch writes the inputs to a temporary folder, runs the program and reads the outputs back.
:func:`kernel_sources` swaps a modified copy of a family's text in for every emulated launch.

Every input is declared ``const device T*``: MLX would declare one of fewer than 8 elements
``constant``, which :class:`~mlx_zeta.kernels.launch.Kernel` prevents by padding small inputs.
Limits: uniform grids only (the grid a multiple of the threadgroup, as our kernels launch); no
atomics; ``threadgroup``/``__shared__`` only on array declarations inside the body; no ``if
constexpr`` on template parameters (they are constants here, so both branches must compile);
bounds checks, poisoning and threadgroup sizes need an ELF platform (Linux) and a compiler
with AddressSanitizer (g++ or clang).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterator, List, Sequence, Tuple

import numpy as np

import mlx.core as mx

from mlx_zeta.common import atomic_path, check_choice, check_int
from mlx_zeta.kernels.address_spaces import lower
from mlx_zeta.kernels.source import CUDA_TYPES, METAL_TYPES, KernelSource, device_sized, load_source

if TYPE_CHECKING:
    from mlx_zeta.kernels.launch import Kernel

__all__ = ["emulate", "compile_kernel", "compiler", "concurrent_groups", "kernel_sources", "KernelFault",
           "MAX_THREADS", "METAL_THREADGROUP_MEMORY", "CUDA_STATIC_SHARED_MEMORY"]

MAX_THREADS = 1024  # per threadgroup / block, on Apple GPUs and NVIDIA alike
METAL_THREADGROUP_MEMORY = 32 * 1024  # bytes per threadgroup (Apple GPUs)
CUDA_STATIC_SHARED_MEMORY = 48 * 1024  # bytes of static __shared__ per block (more needs dynamic shared memory)

_METAL_ATTRIBUTES = (
    "uint3 thread_position_in_grid", "uint3 threadgroup_position_in_grid", "uint3 thread_position_in_threadgroup",
    "uint3 threads_per_threadgroup", "uint3 threadgroups_per_grid", "uint thread_index_in_threadgroup",
    "uint thread_index_in_simdgroup", "uint simdgroup_index_in_threadgroup")
_METAL_ATTRIBUTE_VALUES = "c.gid, c.bid, c.tid, c.block, c.grid_blocks, c.linear, c.lane, c.warp"
# -fno-aggressive-loop-optimizations: an out-of-bounds index is undefined behaviour, from which GCC
# would otherwise deduce a shorter loop and drop the very access the sanitizer should report.
_FLAGS = ["-std=c++20", "-O1", "-g1", "-pthread", "-w", "-fsanitize=address", "-fno-aggressive-loop-optimizations"]


def compiler() -> str | None:
    """The C++ compiler the emulator uses (``$CXX`` or g++), or None when there is none."""
    return shutil.which(os.environ.get("CXX", "g++"))


@functools.lru_cache(maxsize=None)
def _flags(cxx: str) -> Tuple[str, ...]:
    """The flags for ``cxx``: GCC needs ``-fsanitize-sections`` to give threadgroup arrays redzones
    (clang has no such flag)."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    return (*_FLAGS, *(() if "clang" in version else ("-fsanitize-sections=emu_tg",)))


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


def _program(kernel: "Kernel", dialect: str, header: str, body: str, in_dtypes, out_dtypes,
             template) -> Tuple[str, str | None]:
    """The C++ program: header, the body as a plain function behind MLX's signature (template
    parameters become constants of its namespace: GCC places the statics of a plain function in
    the section the launcher poisons), and a ``main`` that launches it. For Metal also the
    address-space check: the same header and body with qualifiers as types (:func:`lower`)."""
    types = METAL_TYPES if dialect == "metal" else CUDA_TYPES
    space_in, space_out = ("const device ", "device ") if dialect == "metal" else ("const ", "")
    params = [f"{space_in}{types[d]}* {n}" for n, d in zip(kernel.input_names, in_dtypes)]
    params += [f"{space_out}{types[d]}* {n}" for n, d in zip(kernel.output_names, out_dtypes)]
    constants = "".join(f"using {n} = {types[v]};\n" if isinstance(v, mx.Dtype) else
                        f"constexpr {'bool' if isinstance(v, bool) else 'int'} {n} = {_template_value(v, types)};\n"
                        for n, v in template)
    casts = [f"(const {types[d]}*)b[{i}]" for i, d in enumerate(in_dtypes)]
    casts += [f"({types[d]}*)b[{len(in_dtypes) + i}]" for i, d in enumerate(out_dtypes)]
    if dialect == "metal":
        params += list(_METAL_ATTRIBUTES)
        casts.append(_METAL_ATTRIBUTE_VALUES)
        spaces = ("#define device\n#define constant\n#define thread\n", "#undef device\n#undef constant\n#undef thread\n")
        shared, header_shared = "threadgroup", "#define threadgroup\n"
    else:
        spaces, shared, header_shared = ("", ""), "__shared__", "#define __shared__\n"
    dtypes = list(in_dtypes) + list(out_dtypes)
    info = ", ".join(f'{{"{n}", {d.size}}}' for n, d in zip(kernel.input_names + kernel.output_names, dtypes))

    def kernel_text(head: str, signature: str, text: str, between: str = "") -> List[str]:
        return ['#line 1 "header"\n', head, "\n", between, "namespace emu_kernel {\n", constants,
                f"static void kernel_body({signature}) {{\n", '#line 1 "', kernel.name, '"\n', text, "\n}\n}\n"]

    program = "".join([
        "#include \"emulator.h\"\n",  # EMU_METAL or EMU_CUDA comes from the command line
        spaces[0], header_shared, *kernel_text(header, ", ".join(params), body,
                                               f"#undef {shared}\n#define {shared} EMU_THREADGROUP\n"),
        f"#undef {shared}\n", spaces[1], "#line 1 \"launcher\"\n",
        f"static const emu::BufferInfo emu_buffers[] = {{{info}}};\n",
        "int main(int argc, char** argv) {\n",
        f'  return emu::main(argc, argv, "{kernel.family}.{kernel.name}", emu_buffers, {len(dtypes)}, '
        f'{len(in_dtypes)},\n',
        f"                   [](emu::Ctx& c, void** b) {{ emu_kernel::kernel_body({', '.join(casts)}); }});\n}}\n",
    ])
    if dialect != "metal":
        return program, None
    check = "".join(["#include \"emulator.h\"\n", *kernel_text(lower(header), lower(", ".join(params)), lower(body))])
    return program, check


_PCH_LOCK = threading.Lock()


def _compile(args: List[str], what: str) -> None:
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"[emulate] compiling {what} failed:\n{proc.stderr[-4000:]}")


def _precompiled_header(cxx: str, flags: List[str], include: Path, key: str) -> Path:
    """A folder holding ``emulator.h.gch`` built with ``flags`` (parsing the header's standard
    library includes is most of a kernel's compile time); g++ falls back to the header itself
    wherever the precompiled one does not apply."""
    folder = _cache_dir() / f"pch-{key}"
    gch = folder / "emulator.h.gch"
    with _PCH_LOCK:
        if not gch.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(gch) as tmp:
                _compile([cxx, *flags, "-x", "c++-header", str(include / "emulator.h"), "-o", str(tmp)],
                         "metal/emulator.h")
    return folder


def _build(programs: Tuple[str, str | None], dialect: str, name: str) -> Tuple[Path, Dict[str, int]]:
    """Compile a program once (cached by content) after its address-space check passes (the two
    compiles run side by side); the program's path and its threadgroup arrays' sizes."""
    from mlx_zeta.metal import __file__ as metal_init

    source, check = programs
    include = Path(metal_init).parent
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("[emulate] no C++ compiler (g++ or $CXX) on PATH; the emulator compiles kernel text")
    flags = [*_flags(cxx), f"-DEMU_{dialect.upper()}"]
    headers = "".join(p.read_text() for p in sorted(include.glob("*.h")))  # emulator.h and what it includes
    header_key = hashlib.sha256((" ".join(flags) + headers).encode()).hexdigest()[:24]
    digest = hashlib.sha256((source + header_key).encode()).hexdigest()[:24]
    exe = _cache_dir() / digest / "kernel"
    sizes = exe.with_name("threadgroup.json")
    if not sizes.is_file():
        pch = _precompiled_header(cxx, flags, include, header_key)
        exe.parent.mkdir(parents=True, exist_ok=True)
        stem = exe.parent / f"kernel-{os.getpid()}-{threading.get_ident()}"
        src, spaces = stem.with_suffix(".cpp"), stem.with_suffix(".spaces.cpp")
        src.write_text(source)
        with atomic_path(exe) as tmp:  # a concurrent build of the same text writes the same program
            build = subprocess.Popen([cxx, *flags, "-I", str(pch), "-I", str(include), str(src), "-o", str(tmp)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            checked = None
            if check is not None:
                spaces.write_text(check)
                checked = subprocess.run([cxx, *flags, "-fsyntax-only", "-fno-elide-type", "-I", str(pch), "-I",
                                          str(include), str(spaces)], capture_output=True, text=True)
            _, err = build.communicate()
            if build.returncode:
                raise RuntimeError(f"[emulate] compiling {src} failed:\n{err[-4000:]}")
            if checked is not None and checked.returncode:  # compiles with qualifiers erased, not as types
                raise RuntimeError(f"[emulate] {name}: address-space check failed (Metal does not convert "
                                   f"pointers between device, constant, threadgroup and thread memory) in "
                                   f"{spaces}:\n{checked.stderr[-4000:]}")
        with atomic_path(sizes) as tmp:
            Path(tmp).write_text(json.dumps(_threadgroup_arrays(exe)))
    return exe, json.loads(sizes.read_text())


def _threadgroup_arrays(exe: Path) -> Dict[str, int]:
    """Name -> bytes of every array in the program's ``emu_tg`` section (its threadgroup memory)."""
    nm = shutil.which("nm")
    if nm is None:
        return {}
    out = subprocess.run([nm, "-C", "-S", "--defined-only", "-f", "sysv", str(exe)], capture_output=True,
                         text=True).stdout
    arrays = {}
    for line in out.splitlines():
        cols = [c.strip() for c in line.split("|")]
        if len(cols) >= 7 and cols[6] == "emu_tg" and cols[4]:
            arrays[cols[0].rsplit("::", 1)[-1]] = int(cols[4], 16)
    return arrays


def _check_limits(name: str, dialect: str, threadgroup: Tuple[int, ...], arrays: Dict[str, int]) -> None:
    threads = int(np.prod(threadgroup))
    if threads > MAX_THREADS:
        raise ValueError(f"[emulate] {name}: expected at most {MAX_THREADS} threads per threadgroup (Metal and CUDA "
                         f"alike), got threadgroup {threadgroup} = {threads}")
    limit, what = (METAL_THREADGROUP_MEMORY, "Metal's threadgroup memory") if dialect == "metal" else \
        (CUDA_STATIC_SHARED_MEMORY, "CUDA's static __shared__ memory")
    if sum(arrays.values()) > limit:
        listed = ", ".join(f"{n} {b}" for n, b in sorted(arrays.items()))
        raise ValueError(f"[emulate] {name}: expected at most {limit} bytes of {what} per group, got "
                         f"{sum(arrays.values())} ({listed})")


_FAULT = re.compile(r"^EMU-FAULT (\S+) (read|write) (\S+) (\S+) (\S+) (\S+) (\d+)$", re.M)
_GLOBAL = re.compile(r"located (\d+) bytes (to the left of|to the right of|inside of) global variable '(\w+)'"
                     r".*? of size (\d+)")
_STACK = re.compile(r"\[(\d+), (\d+)\) '(\w+)'[^\n]*<== Memory access at offset (\d+)")
_WHERE = re.compile(r"#0 0x[0-9a-f]+ in \S+ (?:\S*/)?([\w.]+):(\d+)")


def _fault(name: str, stderr: str) -> "KernelFault | None":
    """The out-of-bounds access the program reported on ``stderr``, as an exception, or None."""
    m = _FAULT.search(stderr)
    if m is None:
        return None
    kind, space, buffer, index, count, size = m.group(2, 3, 4, 5, 6, 7)
    where = _WHERE.search(stderr)
    at = f" at {where.group(1)}:{where.group(2)}" if where else ""
    if space == "device":
        return KernelFault(f"[emulate] {name}: out-of-bounds {kind} of device buffer {buffer} at index {index} "
                           f"(it has {count} elements){at}", kind, "device", buffer, int(index))
    g, st = _GLOBAL.search(stderr), _STACK.search(stderr)
    if space == "threadgroup" and g:
        offset = int(g.group(1)) * (-1 if g.group(2) == "to the left of" else 1)
        offset += int(g.group(4)) if g.group(2) == "to the right of" else 0
        index = offset // int(size)
        return KernelFault(f"[emulate] {name}: out-of-bounds {kind} of threadgroup array {g.group(3)} at index {index} "
                           f"(of {size}-byte elements; it has {int(g.group(4)) // int(size)}){at}", kind, "threadgroup",
                           g.group(3), index)
    if st:
        start, end, offset = (int(st.group(n)) for n in (1, 2, 4))
        index = (offset - start) // int(size)
        return KernelFault(f"[emulate] {name}: out-of-bounds {kind} of thread-local array {st.group(3)} at index "
                           f"{index} (of {size}-byte elements; it has {(end - start) // int(size)}){at}", kind,
                           "thread", st.group(3), index)
    return KernelFault(f"[emulate] {name}: invalid {kind} of {size} bytes ({space} memory){at}", kind, space, None,
                       None)


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


class KernelFault(RuntimeError):
    """An emulated kernel read or wrote outside a buffer: ``kind`` ("read" / "write"), ``space``
    ("device", "threadgroup", "thread"), ``buffer`` (its name) and ``index`` (element) when known."""

    def __init__(self, message: str, kind: str, space: str, buffer: str | None, index: int | None):
        super().__init__(message)
        self.kind, self.space, self.buffer, self.index = kind, space, buffer, index


_GROUPS_AT_ONCE: contextvars.ContextVar[int] = contextvars.ContextVar("mlx_zeta_emulator_groups", default=1)


@contextlib.contextmanager
def concurrent_groups(workers: int = 4) -> Iterator[int]:
    """Inside the block, emulated launches run ``workers`` threadgroups at once (one process each,
    sharing device memory, each taking groups in reverse order), so a kernel whose groups race on
    device memory, or that relies on groups running in order, gives a wrong or varying result."""
    check_int("concurrent_groups", "workers", workers, 1)
    token = _GROUPS_AT_ONCE.set(workers)
    try:
        yield workers
    finally:
        _GROUPS_AT_ONCE.reset(token)


def _run(name: str, args: List[str], timeout: float) -> None:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                            start_new_session=True)  # its own process group: a timeout ends every worker
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as e:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"[emulate] {name} ran past {timeout} s: a barrier that not every thread of a group "
                           "reaches deadlocks on the GPU too") from e
    fault = _fault(name, stderr)
    if fault is not None:
        raise fault
    if proc.returncode:
        raise RuntimeError(f"[emulate] {name} failed (exit {proc.returncode}): {stderr[-2000:]}")


_SOURCES: contextvars.ContextVar[Dict[Tuple[str, str], "KernelSource"]] = contextvars.ContextVar(
    "mlx_zeta_emulator_sources", default={})


@contextlib.contextmanager
def kernel_sources(family: str, dialect: str, source: "KernelSource") -> Iterator["KernelSource"]:
    """Inside the block, every emulated launch of a ``family`` kernel in ``dialect`` (``"metal"`` /
    ``"cuda"``) runs ``source`` instead of the shipped text: a modified copy of a kernel (a planted
    bug) exercised through the whole stack, e.g. ``fused_attention(..., use_kernel="emulate")``."""
    check_choice("kernel_sources", "dialect", dialect, ("metal", "cuda"))
    token = _SOURCES.set({**_SOURCES.get(), (family, dialect): source})
    try:
        yield source
    finally:
        _SOURCES.reset(token)


def compile_kernel(kernel: "Kernel", input_dtypes: Sequence[mx.Dtype], *, template, output_dtypes,
                   dialect: str = "metal", source=None) -> Path:
    """Compile (or find in the cache) the program :func:`emulate` runs for these dtypes and template
    values, without launching it; :func:`emulate` calls it. Thread-safe, so callers may build many
    kernels at once. Returns the program's path; raises ``RuntimeError`` naming the kernel on a
    compile error (the address-space check included) and ``ValueError`` past the device's
    threadgroup-memory limit."""
    src = source if source is not None else _SOURCES.get().get((kernel.family, dialect)) or \
        load_source(kernel.family, dialect)
    name = f"{kernel.family}.{kernel.name}"
    if kernel.name not in src.bodies:
        raise ValueError(f"[emulate] {src.path} has no kernel {kernel.name!r}; it has {sorted(src.bodies)}")
    programs = _program(kernel, dialect, src.header, src.bodies[kernel.name], list(input_dtypes),
                        list(output_dtypes), list(template))
    exe, arrays = _build(programs, dialect, name)
    _check_limits(name, dialect, (1,), arrays)
    return exe


def emulate(kernel: "Kernel", inputs: Sequence[mx.array], *, template, grid, threadgroup, output_shapes,
            output_dtypes, init_value: float | None = None, dialect: str = "metal", timeout: float = 120.0,
            source=None) -> List[mx.array]:
    """Launch ``kernel`` (its shipped text; the one of an enclosing :func:`kernel_sources`; or
    ``source`` — a :class:`KernelSource` — when given, e.g. a deliberately broken copy in a test)
    on the CPU with MLX's launch conventions.

    Raises :class:`KernelFault` (a ``RuntimeError``) naming the kernel, the buffer and the index on
    an out-of-bounds access; ``ValueError`` for a launch past the device's limits (threads per
    group, threadgroup memory); ``RuntimeError`` naming the kernel when compilation fails, the
    program crashes, or it runs past ``timeout`` seconds (a barrier some thread never reaches)."""
    name = f"{kernel.family}.{kernel.name}"
    grid, threadgroup = tuple(int(g) for g in grid), tuple(min(int(t), int(g)) for t, g in zip(threadgroup, grid))
    if any(g % t for g, t in zip(grid, threadgroup)):
        raise ValueError(f"[emulate] {name}: expected a grid that is a multiple of the threadgroup, got grid {grid}, "
                         f"threadgroup {threadgroup}")
    _check_limits(name, dialect, threadgroup, {})
    inputs = [device_sized(mx.array(x)) for x in inputs]
    exe = compile_kernel(kernel, [x.dtype for x in inputs], template=template, output_dtypes=output_dtypes,
                         dialect=dialect, source=source)
    with tempfile.TemporaryDirectory(prefix="mlx_zeta_emu_") as tmp:
        for i, x in enumerate(inputs):
            Path(tmp, str(i)).write_bytes(_to_bytes(x))
        for j, (shape, dtype) in enumerate(zip(output_shapes, output_dtypes)):
            # Without init_value the GPU hands out uninitialised memory: fill with junk (0x7f bytes,
            # about 3.4e38 as float32) so a kernel that forgets to write an element is caught.
            size = int(np.prod(shape)) * dtype.size
            raw = _to_bytes(mx.full(tuple(shape), init_value, dtype=dtype)) if init_value is not None else b"\x7f" * size
            Path(tmp, str(len(inputs) + j)).write_bytes(raw)
        _run(name, [str(exe), tmp, str(_GROUPS_AT_ONCE.get()), *map(str, grid), *map(str, threadgroup)], timeout)
        return [_from_bytes(Path(tmp, str(len(inputs) + j)).read_bytes(), tuple(shape), dtype)
                for j, (shape, dtype) in enumerate(zip(output_shapes, output_dtypes))]
