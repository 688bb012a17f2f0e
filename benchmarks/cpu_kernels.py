"""Native CPU kernels (mlx_zeta.kernels._cpu) vs float32 BLAS and MLX's CPU quantized_matmul,
side by side in one process, plus the ternary GEMV's bandwidth and a per-ISA / per-thread view.

For each weight shape (N outputs, K inputs) and rows M of x (1 = one decoded token, 256 = a
prompt chunk), the median time of one evaluated call of:

- float32 ``x @ W.T`` (MLX's CPU matmul, routed to MKL by ``import mlx_zeta``);
- native ternary ``_cpu.ternary_matmul(x, packed, N)`` with int8 x (W1.58A8, int32 out) and with
  float32 x; packed = the HF BitNet 2-bit layout, (ceil(N/4), K) uint8;
- native 4-bit affine ``_cpu.affine_matmul(x, wq, s, b, 64, 4)`` (MLX's ``mx.quantize`` layout),
  and the dequantize + float32 matmul path ``x @ mx.dequantize(wq, s, b, 64, 4).T``;
- MLX's own ``mx.quantized_matmul`` at 4 and 2 bits (group 64).

Speed-ups are time(reference) / time(row) (> 1: faster than the reference). The int8 rows time the
kernel alone (quantizing x to int8 is the caller's). Then: the machine's memory-copy bandwidth
(numpy, 256 MiB, best of several) against the ternary GEMV's achieved GB/s, both with one weight
matrix reused (cache-hot when it fits in the last-level cache) and streaming through copies of it
that together exceed the cache (what decoding a whole model sees); and the M=1 native kernels per
usable ISA (``_cpu.set_isa``) and per thread count (``_cpu.set_num_threads``). Prints Markdown
(for BENCHMARKS.md); progress goes to stderr.

    .venv/bin/python benchmarks/cpu_kernels.py [--repeats 15] [--budget 2.0] [--rounds 1] [--build-dir DIR]
"""

import argparse
import datetime
import os
import platform
import sys
import threading
import time

import numpy as np

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core loads)
import mlx.core as mx

from mlx_zeta.kernels.packing import pack_2bit
from ternary import cpu_model, median_seconds  # benchmarks/ternary.py: the same timing rule and CPU name

SHAPES = [(4096, 4096), (6912, 2560)]  # (N, K); 6912 x 2560: BitNet b1.58 2B4T's FFN up projection
ROWS = [1, 256]
GROUP, BITS = 64, 4


def load_kernels(build_dir=None):
    """The native kernel module as ``mlx_zeta.kernels.cpu`` loads it, else ``_cpu`` from a CMake build
    folder (csrc/ built by hand). The one place that names the module."""
    from mlx_zeta.kernels import cpu

    if cpu.available():
        return cpu.module()
    if not build_dir:
        raise SystemExit(f"native CPU kernels unavailable ({cpu.reason()}); pass --build-dir with a CMake build of csrc/")
    sys.path.insert(0, os.path.abspath(build_dir))
    import _cpu
    return _cpu


class Case:
    """Inputs of one (N, K) shape: float32 W, its ternary and MLX-quantized forms, and x per M."""

    def __init__(self, cpu, n: int, k: int, rng: np.random.Generator):
        self.cpu, self.n, self.k = cpu, n, k
        w3 = rng.integers(-1, 2, size=(n, k), dtype=np.int8)
        self.w3 = w3
        self.packed = pack_2bit(w3)
        self.w = mx.array(rng.standard_normal((n, k), dtype=np.float32) * k ** -0.5)
        self.q4 = mx.quantize(self.w, group_size=GROUP, bits=4)
        self.q2 = mx.quantize(self.w, group_size=GROUP, bits=2)
        self.x = {m: mx.array(rng.standard_normal((m, k), dtype=np.float32)) for m in ROWS}
        self.x8 = {m: mx.array(rng.integers(-127, 128, size=(m, k), dtype=np.int8)) for m in ROWS}
        mx.eval(self.packed, self.w, self.q4, self.q2, self.x, self.x8)
        self.check()

    def check(self):
        """Guards the benchmark's own use of the kernels: exact W1.58A8 result at M=1, and the
        4-bit kernel against MLX's quantized_matmul."""
        x8 = np.array(self.x8[1])
        got = np.array(self.cpu.ternary_matmul(self.x8[1], self.packed, self.n))
        if not np.array_equal(got, x8.astype(np.int64) @ self.w3.T.astype(np.int64)):
            raise SystemExit("native ternary_matmul disagrees with numpy: check the packing")
        ref = mx.quantized_matmul(self.x[1], *self.q4, transpose=True, group_size=GROUP, bits=4)
        got = self.cpu.affine_matmul(self.x[1], *self.q4, GROUP, BITS)
        if not mx.allclose(got, ref, rtol=1e-3, atol=1e-3).item():
            raise SystemExit("native affine_matmul disagrees with mx.quantized_matmul")

    def kernels(self):
        """(row name, M values or None for all, fn(M) -> lazy array)."""
        cpu, n = self.cpu, self.n
        qmm = lambda q, bits: lambda m: mx.quantized_matmul(self.x[m], *q, transpose=True, group_size=GROUP,
                                                            bits=bits)
        return [
            ("float32 `x @ W.T` (BLAS)", lambda m: self.x[m] @ self.w.T),
            ("native ternary, int8 x (W1.58A8)", lambda m: cpu.ternary_matmul(self.x8[m], self.packed, n)),
            ("native ternary, float32 x", lambda m: cpu.ternary_matmul(self.x[m], self.packed, n)),
            ("native 4-bit affine (g64)", lambda m: cpu.affine_matmul(self.x[m], *self.q4, GROUP, BITS)),
            ("4-bit dequantize + float32 matmul", lambda m: self.x[m] @ mx.dequantize(*self.q4, GROUP, BITS).T),
            ("MLX `quantized_matmul` 4-bit (g64)", qmm(self.q4, 4)),
            ("MLX `quantized_matmul` 2-bit (g64)", qmm(self.q2, 2)),
        ]


def kernel_table(case: Case, args) -> list:
    times = {}
    for _ in range(args.rounds):  # rounds interleave the rows; each keeps its best median (busy machines)
        for name, fn in case.kernels():
            for m in ROWS:
                t = median_seconds(lambda: mx.eval(fn(m)), args.repeats, args.budget)
                times[name, m] = min(times.get((name, m), t), t)
            print(f"  {case.n}x{case.k} {name}: " + ", ".join(f"M={m} {times[name, m][0] * 1e3:.3f} ms" for m in ROWS),
                  file=sys.stderr, flush=True)
    names = [name for name, _ in case.kernels()]
    f32, q4 = names[0], names[5]
    lines = [f"### N={case.n}, K={case.k} ({case.n * case.k / 1e6:.1f} M weights)", "",
             "| kernel | " + " | ".join(f"M={m} ms | vs f32 | vs MLX q4" for m in ROWS) + " |",
             "|---|" + "---|---|---|" * len(ROWS)]
    for name in names:
        cells = []
        for m in ROWS:
            t, count = times[name, m]
            cells.append(f"{t * 1e3:.3f}{' (1 call)' if count == 1 else ''} | {times[f32, m][0] / t:.2f}x "
                         f"| {times[q4, m][0] / t:.2f}x")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def copy_bandwidth(mib: int = 256, tries: int = 7) -> dict:
    """Memory-copy bandwidth in GB/s (bytes read + written per second, best of ``tries``): one
    numpy thread, and one thread per core each copying its slice (numpy releases the GIL)."""
    src = np.ones(mib * 2**20 // 8, np.float64)
    dst = np.empty_like(src)
    result = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        bounds = np.linspace(0, src.size, threads + 1).astype(int)
        parts = [(dst[a:b], src[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        best = float("inf")
        for _ in range(tries):
            workers = [threading.Thread(target=np.copyto, args=p) for p in parts]
            start = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            best = min(best, time.perf_counter() - start)
        result[threads] = 2 * src.nbytes / best / 1e9
    return result


def llc_bytes() -> int:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        return int(text[:-1]) * {"K": 2**10, "M": 2**20}[text[-1]]
    except (OSError, ValueError, KeyError):
        return 32 * 2**20


def bandwidth_table(cases, args) -> list:
    copy = copy_bandwidth()
    ref = max(copy.values())
    lines = ["### Ternary GEMV bandwidth (M=1, int8 x)", "",
             "Memory copy (numpy, 256 MiB, read + write, best of 7): " +
             ", ".join(f"{t} thread{'s' if t > 1 else ''} {bw:.1f} GB/s" for t, bw in copy.items()) +
             f". Achieved = (packed weight bytes + x bytes) / time, against the best copy figure ({ref:.1f} GB/s). "
             f"Hot: one weight matrix, evaluated {args.chain} times in one graph; streamed: distinct copies "
             f"totalling >= 4x the last-level cache ({llc_bytes() >> 20} MiB), one graph.", "",
             "| shape | packed MiB | hot ms | hot GB/s | hot / copy | streamed ms | streamed GB/s | streamed / copy |",
             "|---|---|---|---|---|---|---|---|"]
    for case in cases:
        x, n = case.x8[1], case.n
        nbytes = case.packed.nbytes + x.nbytes
        copies = [case.packed] + [mx.array(case.packed) + 0 for _ in range(max(1, 4 * llc_bytes() // nbytes))]
        mx.eval(copies)
        hot = median_seconds(lambda: mx.eval([case.cpu.ternary_matmul(x, case.packed, n)
                                              for _ in range(args.chain)]), args.repeats, args.budget)[0] / args.chain
        cold = median_seconds(lambda: mx.eval([case.cpu.ternary_matmul(x, p, n) for p in copies]),
                              args.repeats, args.budget)[0] / len(copies)
        copies.clear()
        cells = " | ".join(f"{t * 1e3:.3f} | {nbytes / t / 1e9:.1f} | {nbytes / t / 1e9 / ref:.0%}"
                           for t in (hot, cold))
        lines.append(f"| {n}x{case.k} | {case.packed.nbytes / 2**20:.2f} | {cells} |")
        print(f"  bandwidth {n}x{case.k}: hot {nbytes / hot / 1e9:.1f} GB/s, streamed {nbytes / cold / 1e9:.1f} GB/s",
              file=sys.stderr, flush=True)
    return lines + [""]


def isa_table(cpu, cases, args) -> list:
    """M=1 native kernels per usable ISA (all threads) and per thread count (ISA auto)."""
    settings = [(isa, 0) for isa in cpu.supported_isas()] + [("auto", t) for t in range(1, (os.cpu_count() or 1) + 1)]
    lines = ["### Native GEMV (M=1) per ISA and thread count", "",
             "| ISA | threads | " + " | ".join(f"{c.n}x{c.k} ternary int8 ms | {c.n}x{c.k} 4-bit ms" for c in cases)
             + " |",
             "|---|---|" + "---|---|" * len(cases)]
    try:
        for isa, threads in settings:
            cpu.set_isa(isa)
            cpu.set_num_threads(threads)
            cells = []
            for c in cases:
                for fn in (lambda: cpu.ternary_matmul(c.x8[1], c.packed, c.n),
                           lambda: cpu.affine_matmul(c.x[1], *c.q4, GROUP, BITS)):
                    cells.append(f"{median_seconds(lambda: mx.eval(fn()), args.repeats, args.budget)[0] * 1e3:.3f}")
            lines.append(f"| {cpu.isa()}{' (auto)' if isa == 'auto' else ''} | {cpu.num_threads()} | "
                         + " | ".join(cells) + " |")
            print(f"  {isa} threads={threads}: {cells}", file=sys.stderr, flush=True)
    finally:
        cpu.set_isa("auto")
        cpu.set_num_threads(0)
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls per case at most")
    parser.add_argument("--chain", type=int, default=32, help="GEMVs per graph in the hot bandwidth row")
    parser.add_argument("--rounds", type=int, default=1, help="passes over the kernel rows, best median kept")
    parser.add_argument("--build-dir", help="CMake build folder of csrc/ holding _cpu*.so (when not installed)")
    args = parser.parse_args()
    cpu = load_kernels(args.build_dir)
    mx.set_default_device(mx.cpu)
    info = mlx_zeta.blas_info()
    lines = [
        f"Command: `.venv/bin/python benchmarks/cpu_kernels.py --repeats {args.repeats} --budget {args.budget} "
        f"--rounds {args.rounds}`",
        f"Date: {datetime.date.today()}; CPU: {cpu_model()}, {os.cpu_count()} cores; {platform.platform()}",
        f"mlx {mx.__version__}; BLAS: {info['vendor']} ({os.path.basename(str(info['library']))}, "
        f"{info['threads']} threads); native kernels: ISA {cpu.isa()} (usable: {', '.join(cpu.supported_isas())}), "
        f"{cpu.num_threads()} threads",
        f"Median of up to {args.repeats} evaluated calls after one warm-up ({args.budget:.0f} s per case at most; "
        f"best of {args.rounds} interleaved rounds). "
        "vs f32 / vs MLX q4 = time of float32 `x @ W.T` / MLX 4-bit `quantized_matmul` divided by the row's "
        "time (> 1: faster). Compare within one run only.",
        "",
    ]
    rng = np.random.default_rng(0)
    cases = [Case(cpu, n, k, rng) for n, k in SHAPES]
    for case in cases:
        lines += kernel_table(case, args)
    lines += bandwidth_table(cases, args)
    lines += isa_table(cpu, cases, args)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
