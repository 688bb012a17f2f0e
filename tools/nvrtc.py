"""Compile every CUDA twin (``metal/*.cu``) exactly as ``mx.fast.cuda_kernel`` would, with NVIDIA's
NVRTC from PyPI and no GPU, and report registers, shared memory and spills per kernel.

MLX's CUDA backend (ml-explore/mlx ``mlx/backend/cuda/custom_kernel.cpp`` ``build_kernel`` and
``jit_module.cpp`` ``compile``, commit 846d176227a0ac13d2667e58d2bb68b322109ab0; the same text
ships in mlx-cuda-13 0.32.4, see ``--verify-wheel``) wraps a kernel body in this source::

    <default header: #include "mlx/backend/cuda/device/utils.cuh" + <cooperative_groups.h>>
    <the header passed to cuda_kernel>
    namespace mlx::core::cu {
    namespace cg = cooperative_groups;
    __global__ void custom_kernel_<name><template hash>(
        const <T>* <input>, [const __grid_constant__ Shape <input>_shape, ... when the body uses them]
        <T>* <output>) {
      constexpr int <N> = <v>; | constexpr bool <B> = <v>; | using <T> = <cuda type>;
    <body>
    }
    } // namespace mlx::core::cu

and compiles it with NVRTC: MLX's device headers in memory (MLX passes 17; the preamble
reaches three, kept in ``tools/mlx_cuda_device/`` as the bytes embedded in libmlx.so),
``--device-as-default-execution-space``, ``--gpu-architecture=sm_80`` or ``sm_90a`` (MLX adds
``a`` from compute capability 9), include paths for CCCL and the CUDA runtime headers.
:meth:`Nvrtc.compile` adds only ``-pch`` (NVRTC reuses the parsed includes across programs:
~0.3 s of CPU instead of ~2 s a kernel; the cubin is byte-identical, which the test checks) and
``--ptxas-options=-v`` (the resource report; it changes only the cubin's toolkit-info note).
The wrapper text is generated from what :class:`mlx_zeta.kernels.launch.Kernel` hands MLX
(:meth:`Kernel.mlx_kernel_args`), for every launch :func:`launches` records from the public
entry points. A check of our sources for CI and kernel authors, not a library feature: it
lives in ``tools/`` because it needs the test extra's NVIDIA wheels and copies of MLX headers.

    python tools/nvrtc.py                    # compile all for sm_80 and sm_90; Markdown table
    python tools/nvrtc.py --arch sm_90
    python tools/nvrtc.py --verify-wheel mlx_cuda_13-0.32.4-....whl   # headers + wrapper vs MLX's binary

Needs the ``nvidia-cuda-nvrtc``, ``nvidia-cuda-runtime`` and ``nvidia-cuda-cccl`` wheels (the
``test`` extra of pyproject.toml; CUDA 13.0, CCCL 3.0.1, where MLX's CUDA wheel bundles CCCL
3.1.3 and takes the newest NVRTC 13). The NVRTC program is named ``<kernel>.cu`` (MLX appends a
hash of the source), which only changes file names in the log.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import struct
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core loads)
import mlx.core as mx

from mlx_zeta.kernels.source import CUDA_TYPES as MLX_CUDA_TYPES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_launches import Launch, recorded_launches  # noqa: E402

MLX_COMMIT = "846d176227a0ac13d2667e58d2bb68b322109ab0"
ARCHS = ("sm_80", "sm_90")
DEVICE_HEADERS = Path(__file__).resolve().parent / "mlx_cuda_device"
INCLUDE_PREFIX = "mlx/backend/cuda/device/"
DEFAULT_HEADER = '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
NAMESPACE_OPEN = "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
NAMESPACE_CLOSE = "\n}\n\n} // namespace mlx::core::cu\n"
MLX_OPTIONS = ("--device-as-default-execution-space",)
EXTRA_OPTIONS = ("-pch", "--ptxas-options=-v")
# dtype_to_cuda_type (mlx/backend/cuda/utils.cpp) and get_type_string (backend/common/compiled.cpp)
CUDA_TYPES = {**MLX_CUDA_TYPES, mx.complex64: "mlx::core::cu::complex64_t"}  # the types MLX can pass
HASH_TYPES = {**CUDA_TYPES, mx.float16: "float16_t", mx.bfloat16: "bfloat16_t", mx.complex64: "complex64_t"}
_PCH_NOTE = re.compile(r"precompiled header|Warning #629-D|warnings can be suppressed with")  # -pch's log lines


class NvrtcError(RuntimeError):
    """NVRTC rejected a program; the message carries the kernel and NVRTC's log."""


class Resources(NamedTuple):
    """What ptxas reports for one kernel (bytes, but registers per thread)."""

    registers: int
    shared: int  # static shared memory, bytes
    spill_stores: int
    spill_loads: int
    stack: int


class Compiled(NamedTuple):
    """One program NVRTC accepted: the cubin, the kernel's mangled name, NVRTC's log, wall seconds."""

    cubin: bytes
    lowered_name: str
    log: str
    seconds: float


# ------------------------------------------------------------------ the source MLX generates
def _template_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def template_hash(template: Sequence[Tuple[str, object]]) -> str:
    """``template_arguments_hash``: ``_<int>``, ``_t``/``_f``, ``_<type string>`` per argument."""
    def part(v) -> str:
        if isinstance(v, mx.Dtype):
            return HASH_TYPES[v]
        return ("t" if v else "f") if isinstance(v, bool) else str(v)
    return "".join("_" + part(v) for _, v in template)


def mlx_source(launch: Launch) -> Tuple[str, str]:
    """(kernel function name, full source) that ``mx.fast.cuda_kernel`` builds for ``launch``."""
    args = launch.kernel.mlx_kernel_args("cuda")
    body, names = args["source"], args["input_names"]
    func = "custom_kernel_" + args["name"] + template_hash(launch.template)
    lines = []
    for name, (dtype, ndim, _) in zip(names, launch.inputs):
        lines.append(f"    const {CUDA_TYPES[dtype]}* {name},\n")
        if ndim > 0:
            for suffix, kind in (("_shape", "Shape"), ("_strides", "Strides"), ("_ndim", "int")):
                if name + suffix in body:
                    lines.append(f"    const __grid_constant__ {kind} {name}{suffix},\n")
    outs = [f"    {CUDA_TYPES[d]}* {n}" for n, d in zip(args["output_names"], launch.outputs)]
    consts = []
    for name, v in launch.template:
        if isinstance(v, mx.Dtype):
            consts.append(f"  using {name} = {CUDA_TYPES[v]};\n")
        else:
            consts.append(f"  constexpr {'bool' if isinstance(v, bool) else 'int'} {name} = {_template_value(v)};\n")
    text = "".join([DEFAULT_HEADER, args["header"], NAMESPACE_OPEN, f"__global__ void {func}(\n", *lines,
                    ",\n".join(outs), ") {\n", *consts, "\n" if consts else "", body, NAMESPACE_CLOSE])
    return func, text


# ------------------------------------------------------------------ what our code launches
def launches() -> List[Launch]:
    """One launch per distinct CUDA source among :func:`recorded_launches` (inputs that differ
    only in ndim give one source when the body reads no ``<name>_shape``)."""
    return list({mlx_source(launch)[1]: launch for launch in recorded_launches("emulate-cuda")}.values())


# ------------------------------------------------------------------ NVRTC through ctypes
def _nvidia_root() -> Path:
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError as e:
        raise FileNotFoundError("no 'nvidia' package: pip install the test extra (nvidia-cuda-nvrtc, "
                                "nvidia-cuda-runtime, nvidia-cuda-cccl)") from e
    for base in nvidia.__path__:
        root = Path(base) / "cu13"
        if (root / "lib" / "libnvrtc.so.13").is_file():
            return root
    raise FileNotFoundError(f"no cu13/lib/libnvrtc.so.13 under {list(nvidia.__path__)}: pip install nvidia-cuda-nvrtc")


class Nvrtc:
    """libnvrtc of the ``nvidia-cuda-nvrtc`` wheel; include paths as MLX's ``include_path_args``."""

    def __init__(self):
        root = _nvidia_root()
        for header in ("cuda_fp16.h", "cooperative_groups.h", "cccl/cuda/std/array"):
            if not (root / "include" / header).is_file():
                raise FileNotFoundError(f"no {header} under {root / 'include'}: pip install nvidia-cuda-runtime "
                                        "nvidia-cuda-cccl")
        # libnvrtc dlopens its builtins by soname: load them first so that lookup succeeds
        ctypes.CDLL(str(next((root / "lib").glob("libnvrtc-builtins.so.*"))), mode=ctypes.RTLD_GLOBAL)
        self.lib = ctypes.CDLL(str(root / "lib" / "libnvrtc.so.13"))
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        self.includes = [f"--include-path={root / 'include' / 'cccl'}", f"--include-path={root / 'include'}"]
        names = sorted(p.name for p in DEVICE_HEADERS.iterdir() if p.suffix in (".h", ".cuh"))
        self.headers = [(INCLUDE_PREFIX + n).encode() for n in names]
        self.texts = [(DEVICE_HEADERS / n).read_bytes() for n in names]

    @staticmethod
    def check_arch(arch: str) -> int:
        """The compute capability of ``sm_<cc>`` (e.g. 90), or ValueError."""
        if not isinstance(arch, str) or not re.fullmatch(r"sm_\d{2,3}", arch):
            raise ValueError(f"[nvrtc] expected an arch such as sm_80 or sm_90, got {arch!r}")
        return int(arch[3:])

    def version(self) -> Tuple[int, int]:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
        return major.value, minor.value

    def _check(self, result: int, what: str) -> None:
        if result:
            raise NvrtcError(f"[nvrtc] {what} failed: {self.lib.nvrtcGetErrorString(result).decode()}")

    def _bytes(self, prog, size_fn, get_fn) -> bytes:
        size = ctypes.c_size_t()
        self._check(getattr(self.lib, size_fn)(prog, ctypes.byref(size)), size_fn)
        buf = ctypes.create_string_buffer(size.value)
        self._check(getattr(self.lib, get_fn)(prog, buf), get_fn)
        return buf.raw

    def compile(self, source: str, func: str, arch: str, extra: Sequence[str] = EXTRA_OPTIONS) -> Compiled:
        """Compile ``source`` for ``arch`` (``sm_80``, ``sm_90``, ...) as MLX does; raise
        :class:`NvrtcError` with NVRTC's log when it fails."""
        cc = self.check_arch(arch)
        options = [*MLX_OPTIONS, f"--gpu-architecture=sm_{cc}{'a' if cc >= 90 else ''}", *self.includes, *extra]
        prog = ctypes.c_void_p()
        n = len(self.headers)
        self._check(self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), f"{func}.cu".encode(), n,
                                                (ctypes.c_char_p * n)(*self.texts),
                                                (ctypes.c_char_p * n)(*self.headers)), "nvrtcCreateProgram")
        try:
            name = f"mlx::core::cu::{func}".encode()
            self._check(self.lib.nvrtcAddNameExpression(prog, name), "nvrtcAddNameExpression")
            start = time.perf_counter()
            result = self.lib.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(
                *[o.encode() for o in options]))
            seconds = time.perf_counter() - start
            log = self._bytes(prog, "nvrtcGetProgramLogSize", "nvrtcGetProgramLog").rstrip(b"\0").decode()
            if result:  # without the notes about the precompiled header
                errors = "\n".join(line for line in log.splitlines() if not _PCH_NOTE.search(line)).strip()
                raise NvrtcError(f"[nvrtc] {func} ({arch}) failed to compile:\n{errors}")
            lowered = ctypes.c_char_p()
            self._check(self.lib.nvrtcGetLoweredName(prog, name, ctypes.byref(lowered)), "nvrtcGetLoweredName")
            cubin = self._bytes(prog, "nvrtcGetCUBINSize", "nvrtcGetCUBIN")
            return Compiled(cubin, lowered.value.decode(), log, seconds)
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


def resources(compiled: Compiled) -> Resources:
    """Parse ptxas' ``-v`` report of the kernel's entry function in the NVRTC log."""
    entry = compiled.log.split(f"Function properties for {compiled.lowered_name}\n", 1)
    if len(entry) != 2:
        raise ValueError(f"[nvrtc] no ptxas report for {compiled.lowered_name} in the log:\n{compiled.log}")
    text = entry[1].split("Compile time", 1)[0]

    def number(pattern: str) -> int:
        found = re.search(pattern, text)
        return int(found.group(1)) if found else 0

    return Resources(number(r"Used (\d+) registers"), number(r"(\d+) bytes smem"),
                     number(r"(\d+) bytes spill stores"), number(r"(\d+) bytes spill loads"),
                     number(r"(\d+) bytes stack frame"))


def compile_all(archs: Sequence[str] = ARCHS, workers: Optional[int] = None,
                nv: Optional[Nvrtc] = None) -> Dict[Tuple[str, Launch], Union[Compiled, NvrtcError]]:
    """Compile every launch of :func:`launches` for every arch, ``workers`` threads at a time
    (default: one per core); a failed instantiation maps to its :class:`NvrtcError`."""
    nv, todo = nv or Nvrtc(), [(arch, launch) for arch in archs for launch in launches()]

    def one(item):
        arch, launch = item
        func, text = mlx_source(launch)
        try:
            return item, nv.compile(text, func, arch)
        except NvrtcError as e:
            return item, e

    # the first program of each arch builds NVRTC's precompiled header; the rest reuse it
    firsts = [next(i for i in todo if i[0] == arch) for arch in archs]
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2) as pool:
        results = dict(pool.map(one, firsts))
        results.update(pool.map(one, [i for i in todo if i not in results]))
    return results


def failures(results: Dict[Tuple[str, Launch], Union[Compiled, NvrtcError]]) -> List[str]:
    """``"<arch> <launch>: <NVRTC log>"`` for every instantiation of ``results`` that failed."""
    return [f"{arch} {launch.label()}: {err}" for (arch, launch), err in results.items() if isinstance(err, NvrtcError)]


def elf_sections(cubin: bytes) -> Dict[str, bytes]:
    """Sections of a cubin (ELF64, little-endian) by name; NOBITS sections are empty."""
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    entsize, count, names = struct.unpack_from("<HHH", cubin, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * entsize) for i in range(count)]
    table = headers[names][4]
    return {cubin[table + h[0]:cubin.index(b"\0", table + h[0])].decode(): b"" if h[1] == 8 else cubin[h[4]:h[4] + h[5]]
            for h in headers}


# the literal pieces of build_kernel / compile that mlx_source and Nvrtc.compile reproduce
WRAPPER_FRAGMENTS = (DEFAULT_HEADER, NAMESPACE_OPEN, NAMESPACE_CLOSE, *MLX_OPTIONS, "custom_kernel_",
                     "const __grid_constant__ Shape ", "  constexpr int {} = {};\n", "  using {} = {};\n",
                     "--gpu-architecture={}_{}{}{}", *CUDA_TYPES.values())


def verify_wheel(wheel: Path) -> List[str]:
    """Differences between what this module compiles and an mlx-cuda wheel's libmlx.so: each
    vendored device header must be one of its embedded strings, and every fragment of the
    wrapper must appear in it. Returns the problems (empty: they agree)."""
    try:
        with zipfile.ZipFile(wheel) as z:
            lib = [n for n in z.namelist() if n.endswith("mlx/lib/libmlx.so")]
            if not lib:
                raise ValueError(f"[nvrtc] {wheel} holds no mlx/lib/libmlx.so: expected an mlx-cuda wheel")
            data = z.read(lib[0])
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"[nvrtc] cannot read {wheel} as a wheel (zip): {e}") from None
    problems = []
    for path in sorted(DEVICE_HEADERS.iterdir()):
        if path.suffix in (".h", ".cuh") and b"\0" + path.read_bytes() + b"\0" not in data:
            problems.append(f"{path.name} differs from the copy embedded in {wheel.name}")
    problems += [f"fragment {f!r} not found in {wheel.name}" for f in WRAPPER_FRAGMENTS if f.encode() not in data]
    return problems


def _table(results: Dict[Tuple[str, Launch], Compiled], archs: Sequence[str]) -> str:
    rows = ["| kernel instantiation | " + " | ".join(f"{a} regs / smem B / stack B / spills B" for a in archs) + " |",
            "|---|" + "---|" * len(archs)]
    for launch in dict.fromkeys(launch for _, launch in results):
        cells = []
        for arch in archs:
            r = resources(results[(arch, launch)])
            cells.append(f"{r.registers} / {r.shared} / {r.stack} / {r.spill_stores + r.spill_loads}")
        rows.append(f"| `{launch.label()}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=list(ARCHS), help="targets, e.g. sm_80 sm_90")
    parser.add_argument("--verify-wheel", type=Path, help="an mlx-cuda-13 wheel to compare against")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"nvrtc.py: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.verify_wheel:
        problems = verify_wheel(args.verify_wheel)
        print("\n".join(problems) or f"device headers and wrapper fragments match {args.verify_wheel.name}")
        return 1 if problems else 0
    for arch in args.arch:
        Nvrtc.check_arch(arch)
    start = time.perf_counter()
    results = compile_all(args.arch)
    if failures(results):
        print("\n".join(failures(results)), file=sys.stderr)
        return 1
    print(_table(results, args.arch))
    major, minor = Nvrtc().version()
    wall, calls = time.perf_counter() - start, sum(c.seconds for c in results.values())
    print(f"\n{len(results)} programs (MLX {MLX_COMMIT[:7]}'s wrapper) compiled by NVRTC {major}.{minor} "
          f"in {wall:.1f} s (sum of compile calls {calls:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
