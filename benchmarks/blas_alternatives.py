"""Routed BLAS candidates for MLX's Linux CPU backend, each in its own process: float32 matmul and
GEMV times, and the installed size of each candidate.

Every candidate runs as a fresh ``python`` that imports mlx_zeta (which routes the BLAS named by
``MLX_ZETA_BLAS``, see mlx_zeta/_blas.py) and then times MLX: the rows of benchmarks/blas.py
(1024^3 matmul, 4096x4096 GEMV ``m @ v``) plus the two float32 rows of benchmarks/cpu_kernels.py
(``x @ W.T`` with W 4096x4096, M = 1 and 256). Each worker first checks its matmul against numpy,
so a library that loads but computes nonsense fails loudly. Candidates:

- ``reference``: MLX's bundled reference BLAS (``MLX_ZETA_NO_BLAS=1``; 3 calls: it is slow);
- ``default``: whatever mlx_zeta routes by default here (MKL on x86_64), its size being the
  installed files of the BLAS distribution and its dependencies in this environment;
- ``--library LABEL=PATH[@SIZE_DIR]``: a library file to route (it must export ``cblas_sgemm``);
  its size is ``du`` of SIZE_DIR (e.g. the ``pip install --target`` folder of its wheel).

    .venv/bin/python benchmarks/blas_alternatives.py [--repeats 15] [--rounds 3] [--no-reference] \\
        [--library LABEL=/path/to/libopenblas.so.0@/folder/of/its/install] ...

(``pip install --no-deps --target /tmp/blas_alt/NAME NAME`` puts a candidate wheel in its own folder.)
Found on PyPI for x86_64 (2026-12): cmeel-openblas 0.3.31 is built for SKYLAKEX only (no DYNAMIC_ARCH: a
worker dies of SIGILL on a CPU without AVX-512) and needs the system libgfortran.so.5; scipy-openblas32/64
prefix every symbol (``scipy_cblas_sgemm``), so they route only through a small shim library that exports
``cblas_sgemm``/``dgemm``/``cgemm`` (the CBLAS functions libmlx.so imports).
"""

import argparse
import importlib.metadata as metadata
import json
import os
import re
import subprocess
import sys

WORKER = r"""
import json, sys, time
import numpy as np
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
x1, x256 = mx.random.normal((1, 4096)), mx.random.normal((256, 4096))
mx.eval(a, b, m, v, x1, x256)
if not np.allclose(np.array(a @ b), np.array(a) @ np.array(b), rtol=1e-3, atol=1e-3):
    raise SystemExit("matmul disagrees with numpy")
out = {"info": mlx_zeta.blas_info()}
out["matmul_s"] = median_seconds(lambda: mx.eval(a @ b), repeats)
out["gemv_s"] = median_seconds(lambda: mx.eval(m @ v), repeats)
out["linear1_s"] = median_seconds(lambda: mx.eval(x1 @ m.T), repeats)
out["linear256_s"] = median_seconds(lambda: mx.eval(x256 @ m.T), repeats)
print(json.dumps(out))
"""

ROWS = [("matmul_s", "matmul 1024^3"), ("gemv_s", "GEMV `m @ v` 4096x4096"),
        ("linear1_s", "`x @ W.T` M=1, 4096x4096"), ("linear256_s", "`x @ W.T` M=256, 4096x4096")]


def run(env_update: dict, repeats: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLX_ZETA_NO_BLAS", "MLX_ZETA_BLAS")}
    env.update(env_update)
    proc = subprocess.run([sys.executable, "-c", WORKER, str(repeats)], env=env, capture_output=True, text=True)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def du_bytes(folder: str) -> int:
    """Bytes of the regular files under ``folder`` (links not followed, hard links counted once)."""
    seen, total = set(), 0
    for root, _, files in os.walk(folder):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if os.path.islink(os.path.join(root, name)) or (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def distribution_bytes(name: str) -> tuple[int, list]:
    """Installed bytes of distribution ``name`` and its (unconditional) dependencies here."""
    todo, done, total = [name], [], 0
    while todo:
        dist_name = todo.pop()
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            continue
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in done:
            continue
        done.append(key)
        for f in dist.files or []:
            path = dist.locate_file(f)
            if os.path.isfile(path) and not os.path.islink(path):
                total += os.path.getsize(path)
        todo += [re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0] for r in dist.requires or [] if "extra ==" not in r]
    return total, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--library", action="append", default=[], metavar="LABEL=PATH[@SIZE_DIR]")
    parser.add_argument("--no-reference", action="store_true", help="skip MLX's slow bundled reference BLAS")
    parser.add_argument("--rounds", type=int, default=3,
                        help="processes per library, interleaved; each row keeps the best median")
    args = parser.parse_args()
    results = [] if args.no_reference else [("reference (MLX bundled)", run({"MLX_ZETA_NO_BLAS": "1"}, 3), None)]
    candidates = [("default", {}, None)]
    for spec in args.library:
        label, rest = spec.split("=", 1)
        path, _, size_dir = rest.partition("@")
        candidates.append((label, {"MLX_ZETA_BLAS": path}, du_bytes(size_dir) if size_dir else None))
    best = {label: {} for label, _, _ in candidates}
    for _ in range(args.rounds):  # interleaved, so a busy spell of the machine hits every library alike
        for label, env, _ in candidates:
            res = run(env, args.repeats)
            kept = best[label]
            if "error" in res or "error" in kept:
                best[label] = kept or res
                continue
            kept["info"] = res["info"]
            for key, _ in ROWS:
                kept[key] = min(kept.get(key, float("inf")), res[key])
    default = best["default"]
    vendor = default.get("info", {}).get("vendor", "?")
    size, dists = distribution_bytes({"mkl": "mkl", "openblas": "cmeel-openblas"}.get(vendor, vendor))
    results.append((f"default: {vendor} ({', '.join(dists)})", default, size))
    results += [(label, best[label], nbytes) for label, _, nbytes in candidates[1:]]
    base = default
    print(f"Best over {args.rounds} interleaved processes per library of the median of {args.repeats} calls after "
          f"a warm-up; {os.cpu_count()} cores. Ratio = time / default's time (> 1: slower).\n")
    print("| library | installed MiB | threads | " + " | ".join(f"{title} ms | ratio" for _, title in ROWS) + " |")
    print("|---|---|---|" + "---|---|" * len(ROWS))
    for label, res, nbytes in results:
        size_cell = f"{nbytes / 2**20:.0f}" if nbytes else "-"
        if "error" in res:
            print(f"| {label} | {size_cell} | - | failed: {res['error']} |")
            continue
        cells = " | ".join(f"{res[k] * 1e3:.2f} | {res[k] / base[k]:.2f}x" if k in base else f"{res[k] * 1e3:.2f} | -"
                           for k, _ in ROWS)
        print(f"| {label} | {size_cell} | {res['info']['threads']} | {cells} |")


if __name__ == "__main__":
    main()
