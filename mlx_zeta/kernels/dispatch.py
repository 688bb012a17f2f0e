r"""The one place that decides, per call, which path a kernel call takes.

Every caller (the :func:`~mlx_zeta.kernels.fused_attention` and
:func:`~mlx_zeta.kernels.ternary_matmul` entry points, ``FlashAttention``, ``TernaryLinear``)
asks this module; none inspects the backend itself. One vocabulary:

Process-wide **mode** (:func:`kernel_mode`), from the innermost :func:`use_kernels` context,
else the environment variable ``MLX_ZETA_KERNELS``, else ``"auto"``:

* ``"auto"``: the device kernel (Metal on a Mac, CUDA on NVIDIA) where MLX has that backend,
  the pure-MLX reference on the CPU.
* ``"off"``: the reference everywhere (the kernels are never launched).
* ``"emulate"`` / ``"emulate-cuda"``: the shipped Metal / CUDA text run on the CPU
  (:mod:`mlx_zeta.kernels.emulate`), so the kernel path of every block can be tested on Linux.

Per-call switch **use_kernel** (the argument of the kernel entry points): ``None`` follows the
mode; ``False`` is the reference; ``True`` requires a kernel (the device's, or the emulation
under an ``emulate*`` mode) and raises where there is none; a mode string (``"emulate"``, ...)
overrides the mode for that call.

:func:`resolve` turns the two into a **path**: ``"metal" | "cuda" | "emulate" |
"emulate-cuda" | "reference"``. :func:`kernels_active` tells blocks whether a kernel path is
live (they route work to the fused kernels only then). :func:`with_reference_vjp` builds the
custom function every kernel is: its forward on the chosen path, its gradient through the
reference.

Example:
    >>> from mlx_zeta.kernels import use_kernels, resolve
    >>> with use_kernels("emulate"):
    ...     resolve()
    'emulate'
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Callable, Iterator, Optional, Sequence, Union

import mlx.core as mx

__all__ = ["MODES", "ENV_VAR", "gpu_backend", "kernel_mode", "use_kernels", "resolve", "kernels_active",
           "with_reference_vjp"]

MODES = ("auto", "off", "emulate", "emulate-cuda")
ENV_VAR = "MLX_ZETA_KERNELS"
PATHS = ("metal", "cuda", "emulate", "emulate-cuda", "reference")
UseKernel = Union[None, bool, str]

_MODE: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("mlx_zeta_kernel_mode", default=None)


@functools.lru_cache(maxsize=None)
def gpu_backend() -> Optional[str]:
    """``"metal"``, ``"cuda"`` or ``None`` (MLX runs on the CPU only); asked once per process."""
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return None


def _checked_mode(mode: object, where: str) -> str:
    if mode not in MODES:
        raise ValueError(f"[mlx_zeta.kernels] expected {where} in {MODES}, got {mode!r}")
    return mode  # type: ignore[return-value]


def kernel_mode() -> str:
    """The process-wide mode: the innermost :func:`use_kernels`, else ``$MLX_ZETA_KERNELS``, else ``"auto"``."""
    mode = _MODE.get()
    if mode is not None:
        return mode
    return _checked_mode(os.environ.get(ENV_VAR, "auto") or "auto", f"${ENV_VAR}")


@contextlib.contextmanager
def use_kernels(mode: str) -> Iterator[str]:
    """Set the mode (one of :data:`MODES`) inside a ``with`` block; contexts nest and are
    per thread (a ``contextvars`` variable), so concurrent callers do not see each other's."""
    token = _MODE.set(_checked_mode(mode, "mode"))
    try:
        yield mode
    finally:
        _MODE.reset(token)


def resolve(use_kernel: UseKernel = None) -> str:
    """The path of one call (module docstring): ``"metal" | "cuda" | "emulate" | "emulate-cuda" | "reference"``."""
    if use_kernel is False:
        return "reference"
    if use_kernel is None or use_kernel is True:
        mode = kernel_mode()
    elif use_kernel in MODES:
        mode = use_kernel
    else:
        raise ValueError(f"[mlx_zeta.kernels] use_kernel must be None, True, False or one of {MODES}, "
                         f"got {use_kernel!r}")
    if mode.startswith("emulate"):
        return mode
    gpu = gpu_backend() if mode == "auto" else None
    if use_kernel is True and gpu is None:
        raise ValueError(f"[mlx_zeta.kernels] use_kernel=True needs Metal or CUDA (mode {mode!r}; this MLX "
                         f"{'runs on the CPU' if mode == 'auto' else 'has kernels off'}); use_kernel=None picks the "
                         "reference here, 'emulate' runs the Metal text on the CPU")
    return gpu or "reference"


def kernels_active(use_kernel: UseKernel = None) -> bool:
    """True when :func:`resolve` picks a kernel (device or emulated) rather than the reference."""
    return resolve(use_kernel) != "reference"


def with_reference_vjp(forward: Callable[..., mx.array], reference: Callable[..., mx.array],
                       frozen: Sequence[int] = ()) -> Callable[..., mx.array]:
    r"""``forward`` as an ``mx.custom_function`` whose VJP is ``reference``'s.

    ``forward(*primals)`` and ``reference(*primals)`` compute the same function (a kernel and
    its definition of correctness). The cotangent of every floating primal comes from
    ``mx.vjp(reference, ...)``; integer primals and the positions in ``frozen`` (e.g. packed
    weights) get zeros.
    """

    @mx.custom_function
    def f(*primals):
        return forward(*primals)

    @f.vjp
    def f_vjp(primals, cotangent, output):
        wrt = [n for n, x in enumerate(primals) if n not in frozen and mx.issubdtype(x.dtype, mx.floating)]
        out = [mx.zeros_like(x) for x in primals]
        if wrt:
            def partial(*xs):
                args = list(primals)
                for n, x in zip(wrt, xs):
                    args[n] = x
                return reference(*args)

            _, grads = mx.vjp(partial, [primals[n] for n in wrt], [cotangent])
            for n, g in zip(wrt, grads):
                out[n] = g
        return tuple(out)

    return f
