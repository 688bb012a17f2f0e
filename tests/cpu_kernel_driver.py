"""Build and run ``csrc/tests/kernel_check`` (the native CPU kernels with no MLX and no Python) and
the numpy references its outputs are compared with.

The driver is compiled here with the same sources and per-ISA flags as the extension
(``csrc/kernels/sources.cmake``), natively or with a cross compiler (``aarch64-linux-gnu-g++``,
run under ``qemu-aarch64``), so every instruction-set path can be executed on a Linux x86_64 box.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
SOURCES_CMAKE = CSRC / "kernels" / "sources.cmake"
BUILD = ROOT / "build" / "kernel_check"


def kernel_sources() -> list[Path]:
    text = SOURCES_CMAKE.read_text()
    block = re.search(r"set\(ZETA_KERNEL_SOURCES(.*?)\)", text, re.S).group(1)
    return [CSRC / "kernels" / name for name in re.findall(r"\$\{_here\}/(\w+\.cpp)", block)]


def isa_flags(isa_file: str) -> list[str]:
    """The flags sources.cmake gives ``<isa_file>.cpp`` (empty for the portable files)."""
    match = re.search(rf'set\(ZETA_FLAGS_{isa_file} "([^"]*)"\)', SOURCES_CMAKE.read_text())
    return match.group(1).split(";") if match else []


def build_driver(cxx: str = "g++", *, arch: str = "x86_64", extra: Sequence[str] = (),
                 per_file: Optional[dict] = None) -> Path:
    """Compile the driver once per (compiler, arch, flags, sources) into build/kernel_check/.

    ``arch`` picks which ISA files get their flags (x86_64: avx*; aarch64: neon_dotprod);
    ``per_file`` overrides the flags of named files (e.g. SIMDe builds of the AVX-512 files).
    Returns the executable; raises ``RuntimeError`` with the compiler's output on failure.
    """
    per_file = dict(per_file or {})
    sources = kernel_sources() + [CSRC / "tests" / "kernel_check.cpp"]
    own = ("avx2", "avx512", "avx512vnni") if arch == "x86_64" else ("neon_dotprod",)
    digest = hashlib.sha256(repr((cxx, arch, list(extra), sorted(per_file.items()))).encode())
    for src in sources + sorted((CSRC / "kernels").glob("*.h")):
        digest.update(src.read_bytes())
    out = BUILD / f"{arch}-{digest.hexdigest()[:16]}" / "kernel_check"
    if out.exists():
        return out
    objects = out.parent / "obj"
    objects.mkdir(parents=True, exist_ok=True)
    for src in sources:
        flags = per_file.get(src.stem, isa_flags(src.stem) if src.stem in own else [])
        cmd = [cxx, "-O2", "-std=c++17", *extra, *flags, "-c", str(src), "-o", str(objects / f"{src.stem}.o")]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {src.name} failed: {' '.join(cmd)}\n{result.stderr[-3000:]}")
    link = [cxx, *map(str, sorted(objects.glob("*.o"))), "-o", str(out), "-pthread", *extra]
    result = subprocess.run(link, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"linking kernel_check failed: {' '.join(link)}\n{result.stderr[-3000:]}")
    return out


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


class Driver:
    """Runs kernels through one built driver: ``prefix`` is e.g. ``["qemu-aarch64", "-cpu", "max"]``."""

    def __init__(self, exe: Path, prefix: Sequence[str] = ()):
        self.cmd = [*prefix, str(exe)]

    def _run(self, *args) -> None:
        result = subprocess.run([*self.cmd, *map(str, args)], capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"kernel_check {' '.join(map(str, args[:3]))} failed: {result.stderr.strip()}")

    def isas(self) -> list[str]:
        result = subprocess.run([*self.cmd, "isas"], capture_output=True, text=True, timeout=120)
        return result.stdout.split()

    def ternary(self, tmp: Path, isa: str, x: np.ndarray, packed: np.ndarray, n_out: int, threads: int = 2):
        M, K = x.shape
        x.tofile(tmp / "x.bin")
        packed.tofile(tmp / "p.bin")
        kind = "ternary_i8" if x.dtype == np.int8 else "ternary_f32"
        self._run(kind, isa, threads, M, K, n_out, tmp / "x.bin", tmp / "p.bin", tmp / "y.bin")
        return np.fromfile(tmp / "y.bin", np.int32 if x.dtype == np.int8 else np.float32).reshape(M, n_out)

    def affine(self, tmp: Path, isa: str, x: np.ndarray, words: np.ndarray, scales: np.ndarray, biases: np.ndarray,
               bits: int, group: int, threads: int = 2):
        M, K = x.shape
        stype = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}[scales.dtype]
        for name, a in (("x", x), ("w", words), ("s", scales), ("b", biases)):
            a.tofile(tmp / f"{name}.bin")
        self._run("affine", isa, threads, M, K, words.shape[0], bits, group, stype, *(tmp / f"{n}.bin" for n in "xwsb"),
                  tmp / "y.bin")
        return np.fromfile(tmp / "y.bin", np.float32).reshape(M, words.shape[0])


# --- numpy references, written from the layouts' definitions (kernels.h), not from the kernels ---

def pack_ternary(w: np.ndarray) -> np.ndarray:
    """(N, K) in {-1, 0, 1} -> uint8 (ceil(N/4), K): bits 2j, 2j+1 of row p hold w[p + j*P] + 1."""
    N, K = w.shape
    P = -(-N // 4)
    codes = np.zeros((4 * P, K), np.uint8)
    codes[:N] = w + 1
    return (codes[:P] | codes[P:2 * P] << 2 | codes[2 * P:3 * P] << 4 | codes[3 * P:] << 6).astype(np.uint8)


def pack_affine(q: np.ndarray, bits: int) -> np.ndarray:
    """(N, K) codes in [0, 2**bits) -> uint32 (N, K * bits / 32), element i of a word at bits i*bits."""
    per = 32 // bits
    words = np.zeros((q.shape[0], q.shape[1] // per), np.uint32)
    for i in range(per):
        words |= q[:, i::per].astype(np.uint32) << np.uint32(bits * i)
    return words


def affine_reference(x, q, scales, biases, group):
    """x @ (scale * q + bias).T in float64."""
    N, K = q.shape
    w = q.reshape(N, K // group, group) * scales.astype(np.float64)[..., None] + biases.astype(np.float64)[..., None]
    return x.astype(np.float64) @ w.reshape(N, K).T


# Odd shapes: K not a multiple of any vector width (32, 64), N not a multiple of 4 (the packed
# rows' ragged end) nor of a thread's share, M over the GEMV/GEMM divide and odd (tile remainder).
TERNARY_SHAPES = [(1, 37, 5), (2, 100, 13), (3, 64, 4), (8, 4103, 30), (9, 161, 7), (17, 2051, 33)]
AFFINE_SHAPES = [(1, 256, 5), (2, 384, 13), (7, 128, 33), (12, 640, 3)]


def check_ternary(driver: Driver, isa: str, tmp: Path, rng: np.random.Generator, threads: int = 2) -> None:
    """W1.58A8 bit-exact against numpy int64 products, float x within float32 rounding."""
    for M, K, N in TERNARY_SHAPES:
        w = rng.integers(-1, 2, (N, K))
        packed = pack_ternary(w)
        x = rng.integers(-128, 128, (M, K)).astype(np.int8)
        x[0, :3] = -128  # the extreme the int16 pair sums must hold
        got = driver.ternary(tmp, isa, x, packed, N, threads)
        want = x.astype(np.int64) @ w.T
        assert np.array_equal(got, want), f"{isa} ternary int8 {M}x{K}x{N}: {np.abs(got - want).max()} off"
        xf = rng.standard_normal((M, K)).astype(np.float32)
        got = driver.ternary(tmp, isa, xf, packed, N, threads)
        want = xf.astype(np.float64) @ w.T
        bound = 4 * np.finfo(np.float32).eps * (np.abs(xf).astype(np.float64) @ np.abs(w).T).max()
        assert np.abs(got - want).max() <= bound, f"{isa} ternary float {M}x{K}x{N}: {np.abs(got - want).max()}"


def check_affine(driver: Driver, isa: str, tmp: Path, rng: np.random.Generator, threads: int = 2) -> None:
    """4/8-bit MLX-affine x float32 within float32 rounding of the float64 product."""
    for bits in (4, 8):
        for group in (32, 64, 128):
            for dtype in (np.float32, np.float16):
                for M, K, N in AFFINE_SHAPES:
                    if K % group:
                        continue
                    q = rng.integers(0, 2 ** bits, (N, K))
                    scales = rng.standard_normal((N, K // group)).astype(dtype)
                    biases = rng.standard_normal((N, K // group)).astype(dtype)
                    x = rng.standard_normal((M, K)).astype(np.float32)
                    got = driver.affine(tmp, isa, x, pack_affine(q, bits), scales, biases, bits, group, threads)
                    want = affine_reference(x, q, scales, biases, group)
                    w_abs = np.abs(q.reshape(N, -1, group) * scales.astype(np.float64)[..., None]) \
                        + np.abs(biases.astype(np.float64))[..., None]
                    bound = 8 * np.finfo(np.float32).eps * (np.abs(x) @ w_abs.reshape(N, K).T).max()
                    err = np.abs(got - want).max()
                    assert err <= bound, f"{isa} affine bits={bits} group={group} {dtype.__name__} {M}x{K}x{N}: {err}"
