"""Route MLX's Linux CPU matmuls to an optimized BLAS.

MLX's Linux CPU wheel (``mlx[cpu]``) resolves ``cblas_sgemm`` and friends from a
bundled reference BLAS, which runs a float32 1024x1024 matmul at a few GFLOP/s.
The dynamic linker resolves a symbol from the first library in the global scope
that defines it, so loading an optimized BLAS with ``RTLD_GLOBAL`` *before*
``libmlx.so`` is loaded makes MLX call it instead: Intel MKL (PyPI ``mkl``) on
x86_64, OpenBLAS (PyPI ``cmeel-openblas``) on aarch64.

``import mlx_zeta`` calls :func:`route_blas` before it imports ``mlx.core``.
Nothing changes on macOS, where MLX uses Accelerate and Metal.

Environment variables:
    MLX_ZETA_NO_BLAS=1       keep MLX's bundled reference BLAS.
    MLX_ZETA_BLAS=/path.so   load this BLAS library instead of the default search.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import Optional

DISABLE_ENV = "MLX_ZETA_NO_BLAS"
LIBRARY_ENV = "MLX_ZETA_BLAS"

# (file name, vendor) in order of preference, per machine.
_CANDIDATES = {
    "x86_64": [("libmkl_rt.so.3", "mkl"), ("libmkl_rt.so.2", "mkl"), ("libopenblas.so.0", "openblas")],
    "aarch64": [("libopenblas.so.0", "openblas"), ("libopenblas.so", "openblas")],
}

_state = {"library": None, "vendor": None, "handle": None, "reason": "not attempted"}
_hinted = False


def _disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _search_dirs() -> list[Path]:
    """Folders where pip puts shared libraries of the environment's packages."""
    dirs = [Path(sys.prefix) / "lib", Path(sysconfig.get_paths()["data"]) / "lib"]
    for key in ("purelib", "platlib"):
        site = Path(sysconfig.get_paths()[key])
        dirs += [site / "cmeel.prefix" / "lib", site]
    seen, unique = set(), []
    for d in dirs:
        if d not in seen and d.is_dir():
            seen.add(d)
            unique.append(d)
    return unique


def find_blas() -> tuple[Optional[Path], Optional[str]]:
    """The optimized BLAS library to route to on this machine, and its vendor."""
    override = os.environ.get(LIBRARY_ENV)
    if override:
        path = Path(override)
        if not path.is_file():
            raise FileNotFoundError(f"[mlx_zeta] {LIBRARY_ENV}={override!r} is not a file")
        return path, "mkl" if "mkl" in path.name else "openblas" if "openblas" in path.name else "custom"
    for name, vendor in _CANDIDATES.get(platform.machine(), []):
        for folder in _search_dirs():
            if (folder / name).is_file():
                return folder / name, vendor
    return None, None


def route_blas() -> Optional[str]:
    """Load an optimized BLAS into the global symbol scope for MLX's CPU backend.

    Returns the loaded library's path, or ``None`` when nothing was routed; the
    reason is kept in :func:`blas_info`. Safe to call more than once.
    """
    global _hinted
    if _state["library"] is not None:
        return _state["library"]
    if sys.platform != "linux":
        _state["reason"] = "not Linux: MLX uses Accelerate/Metal"
        return None
    if _disabled():
        _state["reason"] = f"disabled by {DISABLE_ENV}"
        return None
    if "mlx.core" in sys.modules:
        _state["reason"] = "mlx.core was imported before mlx_zeta"
        if not _hinted:
            _hinted = True
            warnings.warn(
                "[mlx_zeta] mlx.core was imported before mlx_zeta, so MLX keeps its slow reference "
                "BLAS on this Linux machine. Import mlx_zeta first for ~25x faster CPU matmuls, "
                f"or set {DISABLE_ENV}=1 to silence this hint.",
                RuntimeWarning,
                stacklevel=3,
            )
        return None
    path, vendor = find_blas()
    if path is None:
        _state["reason"] = "no optimized BLAS found (pip install mkl on x86_64, cmeel-openblas on aarch64)"
        return None
    try:
        _state["handle"] = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as err:
        _state["reason"] = f"could not load {path}: {err}"
        return None
    _state.update(library=str(path), vendor=vendor, reason="routed")
    return _state["library"]


def blas_threads() -> Optional[int]:
    """Threads the routed BLAS will use, or ``None`` when nothing was routed."""
    handle, vendor = _state["handle"], _state["vendor"]
    if handle is None:
        return None
    getter = {"mkl": "MKL_Get_Max_Threads", "openblas": "openblas_get_num_threads"}.get(vendor)
    if getter is None or not hasattr(handle, getter):
        return None
    return int(getattr(handle, getter)())


def blas_info() -> dict:
    """Which BLAS MLX's CPU backend calls in this process, and why."""
    return {
        "library": _state["library"],
        "vendor": _state["vendor"] or "reference",
        "threads": blas_threads(),
        "reason": _state["reason"],
    }
