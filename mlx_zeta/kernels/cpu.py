r"""The native CPU kernels: the MLX extension ``mlx_zeta.kernels._cpu`` built from ``csrc/`` at
install time, and the facts the dispatcher asks about it.

Two primitives run inside MLX's graph on the CPU stream (lazy, ``mx.compile``-able):

* :func:`ternary_matmul` — ``x`` (M, K) int8 or float32 times ternary weights in the 2-bit layout
  of :func:`~mlx_zeta.kernels.packing.pack_2bit` (``packed`` uint8 (ceil(N/4), K)):
  :math:`A = x W^\top`, int32 and exact for int8 ``x`` (W1.58A8), float32 otherwise.
* :func:`affine_matmul` — float32 ``x`` (M, K) times MLX-affine 4- or 8-bit weights
  (``mx.quantize`` layout, group size 32, 64 or 128): :math:`x \hat W^\top` in float32, with
  :math:`\hat W = s\,q + b` per group.

Each has an x86-64 path (AVX2, AVX-512, AVX-512 VNNI), an ARM64 path (NEON, dot product) and a
portable scalar one, chosen at run time from the CPU's features (:func:`set_isa` forces one), with
rows split over :func:`num_threads` threads (``$MLX_ZETA_NUM_THREADS``). Callers do not use these
directly: :mod:`mlx_zeta.kernels.dispatch` routes ``ternary_matmul`` / ``affine_matmul`` calls here
when :func:`available` and MLX runs on the CPU; gradients come from the pure-MLX references.

The module is optional: without a compiler at install time, with ``MLX_ZETA_NATIVE=0``, or with
an MLX other than the one it was built against, :func:`available` is False, :func:`reason` says
why, and every call takes the pure-MLX path.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import List, Optional

import mlx.core as mx

__all__ = ["available", "reason", "module", "ternary_matmul", "affine_matmul", "isa", "supported_isas",
           "set_isa", "num_threads", "set_num_threads", "AFFINE_BITS", "AFFINE_GROUPS", "DISABLE_ENV"]

#: The environment variable that turns the native kernels off: ``MLX_ZETA_NATIVE=0`` (at build or run time).
DISABLE_ENV = "MLX_ZETA_NATIVE"
#: The MLX-affine bit widths the native ``affine_matmul`` takes.
AFFINE_BITS = (4, 8)
#: The MLX-affine group sizes the native ``affine_matmul`` takes.
AFFINE_GROUPS = (32, 64, 128)


@functools.lru_cache(maxsize=None)
def _load() -> tuple:
    """``(module or None, reason)``, decided once per process."""
    if os.environ.get(DISABLE_ENV, "1").strip() == "0":
        return None, f"disabled by {DISABLE_ENV}=0"
    try:
        native = importlib.import_module("mlx_zeta.kernels._cpu")
    except ImportError as error:
        return None, (f"the extension mlx_zeta.kernels._cpu is not built ({error}); reinstall mlx-zeta with a C++ "
                      "compiler and CMake to build it")
    if native.mlx_version != mx.__version__.split(".dev")[0]:
        return None, (f"the extension was built against MLX {native.mlx_version} but MLX {mx.__version__} is "
                      "running; reinstall mlx-zeta")
    return native, "built"


def module():
    """The loaded extension module, or ``None``."""
    return _load()[0]


def available() -> bool:
    """True when the native kernels are built for this MLX and not disabled."""
    return module() is not None


def reason() -> str:
    """``"built"``, or one line saying why the native kernels are not in use."""
    return _load()[1]


def _require():
    native = module()
    if native is None:
        raise RuntimeError(f"[mlx_zeta.kernels.cpu] native CPU kernels unavailable: {reason()}")
    return native


def ternary_matmul(x: mx.array, packed: mx.array, n_out: int) -> mx.array:
    """Native :math:`x W^\\top`: x (M, K) int8 -> int32 (exact), float32 -> float32; packed uint8
    (ceil(n_out / 4), K). Raises ``ValueError`` naming the mismatch on bad shapes or dtypes."""
    return _require().ternary_matmul(x, packed, n_out)


def affine_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int,
                  bits: int) -> mx.array:
    """Native ``x @ mx.dequantize(w, scales, biases, group_size, bits).T`` in float32: x (M, K)
    float32, w uint32 (N, K * bits / 32), scales / biases (N, K / group_size) of one float dtype."""
    return _require().affine_matmul(x, w, scales, biases, group_size, bits)


def isa() -> Optional[str]:
    """The instruction set the kernels run on (``"avx2"``, ``"neon-dotprod"``, ...), or ``None``."""
    native = module()
    return native.isa() if native else None


def supported_isas() -> List[str]:
    """The instruction sets this build and CPU can run, best first (empty without the extension)."""
    native = module()
    return list(native.supported_isas()) if native else []


def set_isa(name: str) -> None:
    """Force an instruction set by name (one of :func:`supported_isas`), or ``"auto"`` for the best.
    Raises ``ValueError`` naming the usable ones."""
    _require().set_isa(name)


def num_threads() -> int:
    """Threads the kernels split output rows over (``$MLX_ZETA_NUM_THREADS``, else all cores)."""
    native = module()
    return native.num_threads() if native else 0


def set_num_threads(n: int) -> None:
    """Use ``n >= 1`` threads; ``0`` returns to the default."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"[mlx_zeta.kernels.cpu] set_num_threads expects an int >= 0, got {n!r}")
    _require().set_num_threads(n)
