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

:func:`resolve` turns the two into a **path**: ``"metal" | "cuda" | "cpu" | "emulate" |
"emulate-cuda" | "reference"``. ``"cpu"`` is the native CPU kernel of the extension built from
``csrc/`` (:mod:`mlx_zeta.kernels.cpu`): in mode ``"auto"``, on a machine without Metal or CUDA
and with MLX's default device the CPU, the kernels named in :data:`CPU_KERNELS` take it when the
extension is built (``resolve(kernel=...)`` asks per kernel; others keep the reference). :func:`info`
says which path each kernel takes here. :func:`kernels_active` tells blocks whether a kernel path is
live (they route work to the fused kernels only then). :func:`with_reference_vjp` builds the
custom function every kernel is: its forward on the chosen path, its gradient through the
reference.

**Kernel failure on a device.** If a Metal or CUDA kernel fails to compile or launch (MLX's
``metal_kernel`` / ``cuda_kernel`` raising when built, called, or at the first evaluation of each
instantiation, which :class:`~mlx_zeta.kernels.Kernel` runs eagerly), :func:`kernel_failed` warns
once per (kernel, backend) with the compiler's first lines (:class:`KernelFallbackWarning`), and
that kernel's calls run the pure-MLX reference for the rest of the process (results equal to
``use_kernel=False``). In **strict** mode (``MLX_ZETA_KERNELS_STRICT=1``, or
``use_kernels(strict=True)``; the GPU tests use it) the failure raises :class:`KernelError`, one
line naming the kernel, the backend and the compiler's error. Emulated kernels always raise.
Under ``mx.compile`` a kernel not yet run eagerly cannot be probed: its failure surfaces where
the compiled function is evaluated.

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
import re
import warnings
from typing import Callable, Iterator, NoReturn, Optional, Sequence, Set, Tuple, Union

import mlx.core as mx

from mlx_zeta.kernels import cpu

__all__ = ["MODES", "ENV_VAR", "CPU_KERNELS", "info", "STRICT_ENV_VAR", "gpu_backend", "kernel_mode", "kernel_strict", "use_kernels",
           "resolve", "kernels_active", "with_reference_vjp", "kernel_failed", "kernel_usable",
           "reset_kernel_failures", "KernelError", "KernelUnavailable", "KernelFallbackWarning"]

#: The process-wide kernel modes :func:`use_kernels` and ``$MLX_ZETA_KERNELS`` accept (module docstring).
MODES = ("auto", "off", "emulate", "emulate-cuda")
#: The environment variable that sets the mode when no :func:`use_kernels` context does.
ENV_VAR = "MLX_ZETA_KERNELS"
#: The environment variable that turns strict mode on (``1``) or off (``0``, the default).
STRICT_ENV_VAR = "MLX_ZETA_KERNELS_STRICT"
PATHS = ("metal", "cuda", "cpu", "emulate", "emulate-cuda", "reference")
#: The kernels with a native CPU path (:mod:`mlx_zeta.kernels.cpu`), taken in mode ``"auto"`` on a CPU-only machine.
CPU_KERNELS = ("ternary_matmul", "affine_matmul")
UseKernel = Union[None, bool, str]

_MODE: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("mlx_zeta_kernel_mode", default=None)
_STRICT: contextvars.ContextVar[Optional[bool]] = contextvars.ContextVar("mlx_zeta_kernel_strict", default=None)
_FAILED: Set[Tuple[str, str]] = set()  # (kernel, backend) that failed once: the reference from then on


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


def kernel_strict() -> bool:
    """Strict mode (module docstring): the innermost ``use_kernels(strict=...)``, else
    ``$MLX_ZETA_KERNELS_STRICT`` (``1`` / ``0``, unset is ``0``)."""
    strict = _STRICT.get()
    if strict is not None:
        return strict
    value = os.environ.get(STRICT_ENV_VAR, "") or "0"
    if value not in ("0", "1"):
        raise ValueError(f"[mlx_zeta.kernels] expected ${STRICT_ENV_VAR} to be 0 or 1, got {value!r}")
    return value == "1"


@contextlib.contextmanager
def use_kernels(mode: Optional[str] = None, *, strict: Optional[bool] = None) -> Iterator[str]:
    """Set the mode (one of :data:`MODES`) and/or strict mode inside a ``with`` block (``None``
    keeps the outer setting); contexts nest and are per thread (``contextvars`` variables), so
    concurrent callers do not see each other's. Yields the mode in force."""
    if strict is not None and not isinstance(strict, bool):
        raise ValueError(f"[mlx_zeta.kernels] expected strict to be True, False or None, got {strict!r}")
    tokens = [(_MODE, _MODE.set(_checked_mode(mode, "mode")))] if mode is not None else []
    if strict is not None:
        tokens.append((_STRICT, _STRICT.set(strict)))
    try:
        yield kernel_mode()
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def _native_cpu(mode: str, kernel: Optional[str]) -> bool:
    """The native CPU kernel serves ``kernel`` here: mode auto, no GPU, MLX on the CPU, extension built."""
    if kernel is not None and kernel not in CPU_KERNELS:
        raise ValueError(f"[mlx_zeta.kernels] kernel must be None or one of {CPU_KERNELS}, got {kernel!r}")
    return (kernel is not None and mode == "auto" and gpu_backend() is None
            and mx.default_device() == mx.cpu and cpu.available())


def resolve(use_kernel: UseKernel = None, kernel: Optional[str] = None) -> str:
    """The path of one call (module docstring): ``"metal" | "cuda" | "cpu" | "emulate" |
    "emulate-cuda" | "reference"``; ``kernel`` names a kernel of :data:`CPU_KERNELS` whose native
    CPU path may serve the call."""
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
    native = _native_cpu(mode, kernel)
    if use_kernel is True and gpu is None and not native:
        raise ValueError(f"[mlx_zeta.kernels] use_kernel=True needs Metal, CUDA or a native CPU kernel (mode {mode!r}; "
                         f"this MLX {'runs on the CPU' if mode == 'auto' else 'has kernels off'}"
                         f"{'' if kernel is None else '; native CPU kernels: ' + cpu.reason()}); use_kernel=None "
                         "picks the reference here, 'emulate' runs the Metal text on the CPU")
    if gpu is not None:
        kernel_strict()  # a malformed $MLX_ZETA_KERNELS_STRICT fails at the first device call, not at a failure
        return gpu
    return "cpu" if native else "reference"


def kernels_active(use_kernel: UseKernel = None, kernel: Optional[str] = None) -> bool:
    """True when :func:`resolve` picks a kernel (device, native CPU or emulated) rather than the reference."""
    return resolve(use_kernel, kernel) != "reference"


def info() -> dict:
    """What runs here: the mode, the GPU backend, the native CPU kernels (built or why not, the
    instruction set and threads) and, per kernel, the path a call with ``use_kernel=None`` takes
    (``"mlx"`` for an affine product that MLX's ``quantized_matmul`` / dequantize computes).

    Example (a Linux box with the extension built)::

        {'mode': 'auto', 'gpu': None, 'native_cpu': True, 'native_cpu_reason': 'built',
         'cpu_isa': 'avx2', 'cpu_isas': ['avx2', 'scalar'], 'cpu_threads': 2,
         'kernels': {'fused_attention': 'reference', 'ternary_matmul': 'cpu', 'affine_matmul': 'cpu'}}
    """
    paths = {"fused_attention": resolve(), "ternary_matmul": resolve(None, "ternary_matmul")}
    # affine products have no device kernel of ours: off the native path they are MLX's own
    paths["affine_matmul"] = "cpu" if resolve(None, "affine_matmul") == "cpu" else "mlx"
    return {"mode": kernel_mode(), "gpu": gpu_backend(), "native_cpu": cpu.available(),
            "native_cpu_reason": cpu.reason(), "cpu_isa": cpu.isa(), "cpu_isas": cpu.supported_isas(),
            "cpu_threads": cpu.num_threads(), "kernels": paths}


def with_reference_vjp(forward: Callable[..., mx.array], reference: Callable[..., mx.array],
                       frozen: Sequence[int] = ()) -> Callable[..., mx.array]:
    r"""``forward`` as an ``mx.custom_function`` whose VJP is ``reference``'s.

    ``forward(*primals)`` and ``reference(*primals)`` compute the same function (a kernel and
    its definition of correctness). The cotangent of every floating primal comes from
    ``mx.vjp(reference, ...)``; integer primals and the positions in ``frozen`` (e.g. packed
    weights) get zeros. A forward whose kernel is unavailable (``KernelUnavailable``) is
    replaced by ``reference`` for that call.
    """

    @mx.custom_function
    def f(*primals):
        try:
            return forward(*primals)
        except KernelUnavailable:  # the kernel failed on this device (kernel_failed warned): the reference
            return reference(*primals)

    @f.vjp
    def f_vjp(primals, cotangent, output):
        if isinstance(primals, mx.array):  # MLX hands a single primal over bare, not in a tuple
            primals = (primals,)
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


class KernelError(RuntimeError):
    """A device kernel failed to compile or launch in strict mode (one line: kernel, backend, error)."""


class KernelUnavailable(RuntimeError):
    """A launch of a kernel that failed on this backend; :func:`with_reference_vjp` runs the reference."""


class KernelFallbackWarning(RuntimeWarning):
    """A device kernel failed once and its calls now run the pure-MLX reference."""


def _first_error(message: str) -> str:
    """The compiler's most telling line: the first with a word ``error`` (``file:12:3: error: ...``),
    else the first non-empty one."""
    lines = [line.strip() for line in message.splitlines() if line.strip()] or ["(no message)"]
    return next((line for line in lines if re.search(r"(?<![A-Za-z])error\b", line)), lines[0])


def kernel_usable(kernel: str, backend: str) -> bool:
    """False once ``kernel`` (``"family.name"``) has failed on ``backend`` in this process."""
    return (kernel, backend) not in _FAILED


def kernel_failed(kernel: str, backend: str, error: BaseException) -> NoReturn:
    """Report that ``kernel`` failed to compile or launch on ``backend`` (module docstring): raise
    :class:`KernelError` in strict mode; otherwise warn once, remember it, and raise
    :class:`KernelUnavailable` so the caller's custom function runs the reference."""
    message = f"{type(error).__name__}: {error}"
    if kernel_strict():
        raise KernelError(f"[mlx_zeta.kernels] kernel {kernel} failed to compile or launch on {backend} "
                          f"(strict mode): {_first_error(message)}") from error
    if (kernel, backend) not in _FAILED:
        _FAILED.add((kernel, backend))
        head = "\n    ".join(message.splitlines()[:6])
        warnings.warn(f"[mlx_zeta.kernels] kernel {kernel} failed to compile or launch on {backend}; it runs the "
                      f"pure-MLX reference for the rest of the process (${STRICT_ENV_VAR}=1 raises instead). "
                      f"The {backend} compiler said:\n    {head}", KernelFallbackWarning, stacklevel=2)
    raise KernelUnavailable(f"[mlx_zeta.kernels] kernel {kernel} is unavailable on {backend}") from error


def reset_kernel_failures() -> None:
    """Forget every recorded failure (the next call tries each device kernel again), e.g. in tests."""
    _FAILED.clear()
