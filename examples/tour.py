"""The `make tour` tour: runs every example in this folder, one block family at a time
(except the main job, train_addition.py, which `make demo` runs).

Each example builds its blocks with the arguments zeta's README uses, runs them on
random inputs, and prints what it computed.

    .venv/bin/python examples/tour.py            # every family
    .venv/bin/python examples/tour.py attention  # only the named ones
"""

import runpy
import sys
import time
from pathlib import Path

import mlx_zeta

HERE = Path(__file__).resolve().parent


def examples() -> list:
    """Every example script beside this one, in a stable order."""
    skip = {Path(__file__).name, "train_addition.py"}
    return sorted(p for p in HERE.glob("*.py") if p.name not in skip and not p.name.startswith("_"))


def main(names: list) -> None:
    info = mlx_zeta.blas_info()
    print(f"mlx_zeta {mlx_zeta.__version__}; CPU BLAS: {info['vendor']} ({info['reason']})")
    chosen = [p for p in examples() if not names or p.stem in names]
    unknown = set(names) - {p.stem for p in examples()}
    if unknown:
        raise SystemExit(f"[tour] unknown example(s) {sorted(unknown)}; available: {[p.stem for p in examples()]}")
    for path in chosen:
        print(f"\n=== {path.stem} " + "=" * (60 - len(path.stem)))
        start = time.perf_counter()
        runpy.run_path(str(path), run_name="__main__")
        print(f"--- {path.stem}: {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
