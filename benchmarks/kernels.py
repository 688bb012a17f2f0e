"""Custom kernels vs MLX's own paths, side by side in one process, on whatever backend is here.

Attention (causal, ALiBi or T5 bias, B=1, H=8, D=128): ``fused_attention`` (the Metal / CUDA
kernel where present, the reference path on the CPU) vs ``mx.fast.scaled_dot_product_attention``
with the bias and the causal mask materialised as one (H, L, L) array, plus the bytes of that
array (the kernel reads O(L) bias data instead).

Ternary GEMV (M=1): ``ternary_matmul`` on the packed 2-bit weights (int8 activations) vs
``mx.quantized_matmul`` 2-bit (group 64) and a float16 matmul, at (4096, 4096) and (2560, 6912).

Prints Markdown tables with ratios (> 1: the kernel path is faster).

    .venv/bin/python benchmarks/kernels.py [--seq 512 2048] [--repeats 9] [--budget 2.0]
"""

import argparse
import datetime
import platform

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core loads)
import mlx.core as mx
import numpy as np

from mlx_zeta.kernels import fused_attention, gpu_backend, t5_relative_buckets, ternary_matmul
from mlx_zeta.kernels import PositionBias
from mlx_zeta.nn.positional import AlibiPositionalBias
from mlx_zeta.kernels.packing import pack_2bit
from ternary import cpu_model, median_seconds  # benchmarks/ternary.py: the same timer

HEADS, DIM_HEAD = 8, 128


def attention_rows(seq: int, repeats: int, budget: float, dtype: mx.Dtype):
    q, k, v = (mx.random.normal((1, HEADS, seq, DIM_HEAD)).astype(dtype) for _ in range(3))
    biases = {
        "ALiBi": dict(alibi_slopes=AlibiPositionalBias(heads=HEADS)._slopes),
        "T5": dict(t5_table=mx.random.normal((32, HEADS)),
                   t5_buckets=t5_relative_buckets(seq, seq, bidirectional=False)),
    }
    causal = mx.arange(seq)[None, :] <= mx.arange(seq)[:, None]
    scale = DIM_HEAD ** -0.5
    for name, extra in biases.items():
        def fused():
            mx.eval(fused_attention(q, k, v, scale=scale, causal=True, **extra))

        def materialised():
            bias = mx.where(causal, PositionBias(**extra).materialize(seq, seq), -mx.inf).astype(dtype)
            mx.eval(mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=bias))

        t_fused, _ = median_seconds(fused, repeats, budget)
        t_mat, _ = median_seconds(materialised, repeats, budget)
        bias_bytes = HEADS * seq * seq * dtype.size
        yield name, seq, t_fused, t_mat, bias_bytes


def ternary_rows(repeats: int, budget: float):
    rng = np.random.default_rng(0)
    for k_in, n_out in ((4096, 4096), (2560, 6912)):
        w = mx.array(rng.integers(-1, 2, (n_out, k_in)).astype(np.int8))
        packed = pack_2bit(w)
        x8 = mx.array(rng.integers(-128, 128, (1, k_in)).astype(np.int8))
        x16 = mx.random.normal((1, k_in)).astype(mx.float16)
        w16 = w.astype(mx.float16)
        wq, scales, biases = mx.quantize(w16, group_size=64, bits=2)
        mx.eval(packed, w16, wq, scales, biases)
        paths = {
            "ternary_matmul (int8)": lambda: mx.eval(ternary_matmul(x8, packed, n_out)),
            "mx.quantized_matmul 2-bit": lambda: mx.eval(
                mx.quantized_matmul(x16, wq, scales, biases, transpose=True, group_size=64, bits=2)),
            "float16 matmul": lambda: mx.eval(x16 @ w16.T),
        }
        times = {name: median_seconds(fn, repeats, budget)[0] for name, fn in paths.items()}
        yield (k_in, n_out), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--budget", type=float, default=2.0)
    a = parser.parse_args()
    where = gpu_backend() or f"cpu ({cpu_model()}; kernels fall back to the reference path)"
    print(f"# {datetime.date.today()}, {platform.system()} {platform.machine()}, mlx {mx.__version__}, "
          f"backend: {where}\n")
    print(f"| attention, causal, H={HEADS}, D={DIM_HEAD}, {a.dtype} | L | fused_attention ms | "
          "mx.fast + materialised bias ms | speed-up | bias array bytes avoided |")
    print("|---|---|---|---|---|---|")
    for seq in a.seq:
        for name, n, t_f, t_m, nbytes in attention_rows(seq, a.repeats, a.budget, getattr(mx, a.dtype)):
            print(f"| {name} | {n} | {1e3 * t_f:.2f} | {1e3 * t_m:.2f} | {t_m / t_f:.2f}x | {nbytes:,} |")
    print("\n| ternary GEMV, M=1 | (in, out) | ternary_matmul ms | 2-bit quantized_matmul ms | float16 matmul ms "
          "| vs 2-bit | vs float16 |")
    print("|---|---|---|---|---|---|---|")
    for shape, t in ternary_rows(a.repeats, a.budget):
        ours = t["ternary_matmul (int8)"]
        print(f"| packed 2-bit, int8 x | {shape} | {1e3 * ours:.3f} | {1e3 * t['mx.quantized_matmul 2-bit']:.3f} "
              f"| {1e3 * t['float16 matmul']:.3f} | {t['mx.quantized_matmul 2-bit'] / ours:.2f}x "
              f"| {t['float16 matmul'] / ours:.2f}x |")
    print(f"\nReproduce: .venv/bin/python benchmarks/kernels.py --seq {' '.join(map(str, a.seq))} --dtype {a.dtype}")


if __name__ == "__main__":
    main()
