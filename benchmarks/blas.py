"""Float32 matmul and GEMV on MLX's CPU backend, with and without BLAS routing.

Both variants run as the same kind of process (a fresh ``python`` that imports
mlx_zeta and then times MLX), one with ``MLX_ZETA_NO_BLAS=1``, side by side in one
run. Prints a Markdown table of medians and the speed-up ratio.

    .venv/bin/python benchmarks/blas.py [--repeats 15]
"""

import argparse
import json
import os
import subprocess
import sys

WORKER = r"""
import json, sys, time
import mlx_zeta
import mlx.core as mx

def median_seconds(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]

repeats = int(sys.argv[1])
mx.random.seed(0)
a, b = mx.random.normal((1024, 1024)), mx.random.normal((1024, 1024))
m, v = mx.random.normal((4096, 4096)), mx.random.normal((4096,))
mx.eval(a, b, m, v)
matmul = median_seconds(lambda: mx.eval(a @ b), repeats)
gemv = median_seconds(lambda: mx.eval(m @ v), repeats)
print(json.dumps({"info": mlx_zeta.blas_info(), "matmul_s": matmul, "gemv_s": gemv}))
"""


def run(disabled: bool, repeats: int) -> dict:
    env = dict(os.environ)
    env.pop("MLX_ZETA_NO_BLAS", None)
    if disabled:
        env["MLX_ZETA_NO_BLAS"] = "1"
    out = subprocess.run([sys.executable, "-c", WORKER, str(repeats)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    ref, routed = run(True, args.repeats), run(False, args.repeats)
    flops = 2 * 1024**3
    print(f"reference BLAS: {ref['info']['vendor']}; routed: {routed['info']['vendor']} "
          f"({routed['info']['library']}, {routed['info']['threads']} threads); "
          f"median of {args.repeats} runs, {os.cpu_count()} cores\n")
    print("| op | reference BLAS | routed BLAS | speed-up |")
    print("|---|---|---|---|")
    print(f"| matmul 1024x1024x1024 f32 | {ref['matmul_s']*1e3:.1f} ms ({flops/ref['matmul_s']/1e9:.1f} GFLOP/s) "
          f"| {routed['matmul_s']*1e3:.2f} ms ({flops/routed['matmul_s']/1e9:.1f} GFLOP/s) "
          f"| {ref['matmul_s']/routed['matmul_s']:.1f}x |")
    print(f"| GEMV 4096x4096 f32 | {ref['gemv_s']*1e3:.2f} ms | {routed['gemv_s']*1e3:.2f} ms "
          f"| {ref['gemv_s']/routed['gemv_s']:.1f}x |")


if __name__ == "__main__":
    main()
