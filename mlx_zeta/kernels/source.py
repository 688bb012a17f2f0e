"""Kernel sources: one file per kernel family in ``metal/`` (installed as ``mlx_zeta.metal``),
Metal bodies in ``<family>.metal`` and CUDA twins in ``<family>.cu``.

A source file holds a header and named kernel bodies, separated by marker lines::

    // ==== header ====
    ... helper functions (Metal/CUDA) ...
    // ==== kernel: ternary_gemv ====
    ... the body of the kernel: MLX generates the signature ...

:func:`load_source` parses a file once (cached); :func:`device_sized` is the input convention
every launch follows (:mod:`mlx_zeta.kernels.launch` on the GPU, :mod:`mlx_zeta.kernels.emulate`
on the CPU).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Dict

import mlx.core as mx

__all__ = ["KernelSource", "load_source", "device_sized", "CONSTANT_LIMIT", "METAL_TYPES", "CUDA_TYPES"]

# How MLX spells each dtype in the kernel source it generates around a body (its
# ``get_type_string``): Metal names, and the CUDA ones where they differ. The emulator declares
# the same signature; tools/metal_sources.py and tools/nvrtc.py rebuild MLX's own text with them.
METAL_TYPES = {mx.bool_: "bool", mx.int8: "int8_t", mx.int16: "int16_t", mx.int32: "int32_t", mx.int64: "int64_t",
               mx.uint8: "uint8_t", mx.uint16: "uint16_t", mx.uint32: "uint32_t", mx.uint64: "uint64_t",
               mx.float16: "float16_t", mx.bfloat16: "bfloat16_t", mx.float32: "float"}
CUDA_TYPES = {**METAL_TYPES, mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.float64: "double"}

_MARKER = re.compile(r"^// ==== (header|kernel: (\w+)) ====\s*$", re.M)


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


CONSTANT_LIMIT = 8  # MLX passes inputs of fewer elements in Metal's constant address space


def device_sized(x: mx.array) -> mx.array:
    """MLX declares an input of fewer than 8 elements ``const constant T*`` instead of
    ``const device T*``; a body that hands it to a helper taking a device pointer would not
    compile on a Mac (the CPU emulator erases address spaces and cannot tell). Our bodies index
    inputs only as flat row-contiguous memory, so small inputs are flattened and zero-padded to
    8 elements: every input is ``device`` on every backend, in the emulator as on the GPU."""
    if x.size >= CONSTANT_LIMIT:
        return x
    return mx.concatenate([x.reshape(-1), mx.zeros((CONSTANT_LIMIT - x.size,), x.dtype)])
