"""Kernel sources and their launch: one file per kernel family in ``metal/`` (installed as
``mlx_zeta.metal``), Metal bodies in ``<family>.metal`` and CUDA twins in ``<family>.cu``.

A source file holds a header and named kernel bodies, separated by marker lines::

    // ==== header ====
    ... helper functions (Metal/CUDA) ...
    // ==== kernel: ternary_gemv ====
    ... the body of the kernel: MLX generates the signature ...

:class:`Kernel` describes one kernel (its inputs, outputs and template parameters) and
launches it on the backend at hand: ``mx.fast.metal_kernel`` on a Mac,
``mx.fast.cuda_kernel`` on an NVIDIA GPU, or the CPU emulation of the same text
(:mod:`mlx_zeta.kernels.emulate`) for tests on Linux. Compiled kernels are cached per
source, so each file is read and each kernel built once.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple, Union

import mlx.core as mx

__all__ = ["Kernel", "KernelSource", "load_source", "backend", "gpu_backend"]

_MARKER = re.compile(r"^// ==== (header|kernel: (\w+)) ====\s*$", re.M)
TemplateArg = Tuple[str, Union[mx.Dtype, int, bool]]


@dataclass(frozen=True)
class KernelSource:
    """A parsed source file: ``header`` text and ``bodies`` by kernel name."""

    path: str
    header: str
    bodies: Dict[str, str]


@functools.lru_cache(maxsize=None)
def load_source(family: str, dialect: str) -> KernelSource:
    """Parse ``metal/<family>.metal`` (``dialect="metal"``) or ``metal/<family>.cu`` (``"cuda"``)."""
    from mlx_zeta.metal import read_source

    name = f"{family}.{'metal' if dialect == 'metal' else 'cu'}"
    text = read_source(name)
    parts = _MARKER.split(text)
    header, bodies = "", {}
    # split gives [preamble, tag, kernel_name_or_None, text, tag, ...]
    for i in range(1, len(parts), 3):
        tag, kernel, chunk = parts[i], parts[i + 1], parts[i + 2]
        if tag == "header":
            header = chunk
        else:
            bodies[kernel] = chunk
    if not bodies:
        raise ValueError(f"[mlx_zeta.kernels] {name} has no '// ==== kernel: <name> ====' section")
    return KernelSource(name, header, bodies)


def gpu_backend() -> str | None:
    """``"metal"``, ``"cuda"`` or ``None`` (CPU only)."""
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return None


def backend(use_kernel: bool | str | None) -> str:
    """Resolve a ``use_kernel`` switch: ``None`` (kernel where a GPU backend exists), ``True``
    (kernel required), ``False`` (reference path), or ``"emulate"`` (CPU emulation of the
    shipped Metal text, for tests) -> ``"metal" | "cuda" | "reference" | "emulate"``."""
    if use_kernel == "emulate":
        return "emulate"
    if use_kernel is False:
        return "reference"
    gpu = gpu_backend()
    if gpu is None and use_kernel is True:
        raise ValueError("[mlx_zeta.kernels] use_kernel=True needs Metal or CUDA; this MLX runs on the CPU "
                         "(use_kernel=None picks the reference path here, 'emulate' runs the Metal text on the CPU)")
    if use_kernel not in (None, True):
        raise ValueError(f"[mlx_zeta.kernels] use_kernel must be None, True, False or 'emulate', got {use_kernel!r}")
    return gpu or "reference"


@dataclass(frozen=True)
class Kernel:
    """One kernel of a family: names of its inputs and outputs, in signature order."""

    family: str
    name: str
    input_names: Tuple[str, ...]
    output_names: Tuple[str, ...]

    def __call__(self, inputs: Sequence[mx.array], *, template: Sequence[TemplateArg], grid: Tuple[int, int, int],
                 threadgroup: Tuple[int, int, int], output_shapes: Sequence[Sequence[int]],
                 output_dtypes: Sequence[mx.Dtype], init_value: float | None = None,
                 mode: str = "metal") -> List[mx.array]:
        """Launch on ``mode``: ``"metal"``, ``"cuda"``, or ``"emulate"`` / ``"emulate-cuda"`` (the
        Metal / CUDA text run on the CPU). MLX's conventions: the grid counts threads, every input
        is passed row-contiguous; inputs of fewer than 8 elements are padded (:func:`_device_sized`)."""
        inputs = [_device_sized(x) for x in inputs]
        kwargs = dict(template=list(template), grid=grid, threadgroup=threadgroup,
                      output_shapes=[tuple(s) for s in output_shapes], output_dtypes=list(output_dtypes))
        if init_value is not None:
            kwargs["init_value"] = init_value
        if mode in ("emulate", "emulate-cuda"):
            from mlx_zeta.kernels.emulate import emulate

            return emulate(self, list(inputs), dialect="metal" if mode == "emulate" else "cuda", **kwargs)
        return _compiled(self, mode)(inputs=list(inputs), **kwargs)


CONSTANT_LIMIT = 8  # MLX passes inputs of fewer elements in Metal's constant address space


def _device_sized(x: mx.array) -> mx.array:
    """MLX declares an input of fewer than 8 elements ``const constant T*`` instead of
    ``const device T*``; a body that hands it to a helper taking a device pointer would not
    compile on a Mac (the CPU emulator erases address spaces and cannot tell). Our bodies index
    inputs only as flat row-contiguous memory, so small inputs are flattened and zero-padded to
    8 elements: every input is ``device`` on every backend, in the emulator as on the GPU."""
    if x.size >= CONSTANT_LIMIT:
        return x
    return mx.concatenate([x.reshape(-1), mx.zeros((CONSTANT_LIMIT - x.size,), x.dtype)])


@functools.lru_cache(maxsize=None)
def _compiled(kernel: Kernel, mode: str):
    src = load_source(kernel.family, mode)
    body = src.bodies.get(kernel.name)
    if body is None:
        raise ValueError(f"[mlx_zeta.kernels] {src.path} has no kernel {kernel.name!r}; it has {sorted(src.bodies)}")
    make = mx.fast.metal_kernel if mode == "metal" else mx.fast.cuda_kernel
    return make(name=f"mlx_zeta_{kernel.family}_{kernel.name}", input_names=list(kernel.input_names),
                output_names=list(kernel.output_names), source=body, header=src.header)
