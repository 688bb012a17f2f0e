"""Packed ternary TernaryLinear vs float32 nn.Linear and MLX 4-bit / 2-bit QuantizedLinear on
MLX's CPU backend (after mlx_zeta's BLAS routing), side by side in one process.

For each (in_features, out_features) and each number of rows M of x (1 = one decoded token,
256 = a prompt chunk): the median time of a forward pass, its ratio to float32 ``nn.Linear``
(> 1 = slower), the layer's resident parameter bytes (TernaryLinear's affine path includes
its cached MLX words) and the transient peak memory of the M=256 call. Prints a Markdown
table (recorded in BENCHMARKS.md).

    .venv/bin/python benchmarks/ternary.py [--repeats 9] [--budget 2.0]
"""

import argparse
import datetime
import os
import platform
import sys
import time

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core loads)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_zeta.quant import BitLinear, TernaryLinear

SHAPES = [(4096, 4096), (2560, 6912)]  # (in_features, out_features); 2560 -> 6912: BitNet b1.58 2B4T's FFN up
ROWS = [1, 256]


def median_seconds(fn, repeats: int, budget: float):
    """(median seconds, calls timed) over up to ``repeats`` calls after a warm-up call, fewer
    when a call is slow; a call slower than ``budget`` is timed once (its warm-up call, which
    follows earlier calls of the same layer, so one-off setup is already done)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    if first > budget:
        return first, 1
    n = max(1, min(repeats, int(budget / first)))
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2], n


def param_bytes(layer: nn.Module) -> int:
    if isinstance(layer, TernaryLinear):
        return layer.nbytes(cache=True)
    return sum(v.nbytes for _, v in tree_flatten(layer.parameters()))


def layers_for(cols: int, out: int):
    linear = nn.Linear(cols, out, bias=False)
    bit = BitLinear.from_linear(linear, norm=False)
    yield "float32 nn.Linear", linear
    yield "MLX 4-bit QuantizedLinear (g64)", nn.QuantizedLinear.from_linear(linear, group_size=64, bits=4)
    yield "MLX 2-bit QuantizedLinear (g64)", nn.QuantizedLinear.from_linear(linear, group_size=64, bits=2)
    for activation in ("int8", "float"):
        for kernel in ("unpack", "affine"):
            yield (f"TernaryLinear {activation}, {kernel}",
                   TernaryLinear.from_bitlinear(bit, activation=activation, kernel=kernel))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls per case at most")
    args = parser.parse_args()
    mx.set_default_device(mx.cpu)
    mx.random.seed(0)
    info = mlx_zeta.blas_info()
    lines = [
        f"Command: `.venv/bin/python benchmarks/ternary.py --repeats {args.repeats} --budget {args.budget}`",
        f"Date: {datetime.date.today()}; CPU: {cpu_model()}, {os.cpu_count()} cores; {platform.platform()}",
        f"mlx {mx.__version__}; BLAS: {info['vendor']} ({os.path.basename(str(info['library']))}, "
        f"{info['threads']} threads, {info['reason']})",
        f"Median of up to {args.repeats} calls after one warm-up (fewer when a call is slow, "
        f"{args.budget:.0f} s per case at most; a call slower than that is timed once). "
        "Ratio = time / float32 nn.Linear time (> 1: slower).",
        "Resident: parameter bytes (TernaryLinear affine: plus its cached MLX words). Caching the "
        "unpacked float32 weights instead would make TernaryLinear the float32 nn.Linear row: "
        "same time, 4 bytes per weight.",
        "",
    ]
    for cols, out in SHAPES:
        rows = []
        xs = {m: mx.random.normal((m, cols)) for m in ROWS}
        mx.eval(xs)
        for name, layer in layers_for(cols, out):
            mx.eval(layer.parameters())
            times, counts = {}, {}
            mx.eval(layer(xs[min(ROWS)]))  # one-off setup (the affine path's cached words)
            for m in ROWS:
                x = xs[m]
                if m == max(ROWS):  # peak above the resident arrays over the M=256 calls
                    mx.reset_peak_memory()
                    base = mx.get_active_memory()
                times[m], counts[m] = median_seconds(lambda: mx.eval(layer(x)), args.repeats, args.budget)
                if m == max(ROWS):
                    peak = mx.get_peak_memory() - base
            rows.append((name, param_bytes(layer), peak, times, counts))
            print(f"  {cols}->{out} {name}: " + ", ".join(f"M={m} {t * 1e3:.1f} ms" for m, t in times.items()),
                  file=sys.stderr, flush=True)
            del layer
        ref = rows[0][3]
        lines += [f"### in_features={cols} -> out_features={out} ({cols * out / 1e6:.1f} M weights)", ""]
        header = "| layer | resident MiB (bytes/weight) | transient peak, M=256 (MiB) | " + \
            " | ".join(f"M={m} ms | M={m} ratio" for m in ROWS) + " |"
        lines += [header, "|" + "---|" * (3 + 2 * len(ROWS))]
        for name, nbytes, peak, times, counts in rows:
            cells = " | ".join(f"{times[m] * 1e3:.2f}{' (1 call)' if counts[m] == 1 else ''} | "
                               f"{times[m] / ref[m]:.2f}x" for m in ROWS)
            lines.append(f"| {name} | {nbytes / 2**20:.1f} ({nbytes / (cols * out):.3f}) | {peak / 2**20:.0f} "
                         f"| {cells} |")
        lines.append("")
    lines += [
        "Paths: `unpack` decodes the 2-bit codes to float32 in 2 MiB slabs and multiplies each with "
        "BLAS (the default); `affine` maps the codes exactly onto MLX's 2-bit affine "
        "`mx.quantized_matmul` (scale 1, bias -1), whose CPU kernel grows linearly with M. "
        "Compare ratios within one run only.",
        "",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
