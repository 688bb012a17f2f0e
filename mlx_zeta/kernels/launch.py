"""Launching one kernel of a family on the path :mod:`mlx_zeta.kernels.dispatch` chose:
``mx.fast.metal_kernel`` on a Mac, ``mx.fast.cuda_kernel`` on an NVIDIA GPU, or the CPU
emulation of the same text (:mod:`mlx_zeta.kernels.emulate`) for tests on Linux. Compiled
kernels are cached, so each kernel is built once per backend.

MLX compiles a device kernel when its output is first evaluated, so the first launch of each
instantiation (template values and dtypes) on a device is evaluated at once: a kernel that fails
to build, launch or run there is reported to :func:`mlx_zeta.kernels.dispatch.kernel_failed`
(a warning and the reference from then on, or an error in strict mode).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, List, Sequence, Set, Tuple, Union

import mlx.core as mx

from mlx_zeta.kernels.dispatch import KernelUnavailable, kernel_failed, kernel_usable
from mlx_zeta.kernels.emulate import emulate
from mlx_zeta.kernels.source import device_sized, load_source

__all__ = ["Kernel"]

TemplateArg = Tuple[str, Union[mx.Dtype, int, bool]]
_PROBED: Set[tuple] = set()  # instantiations that ran once on their device


@dataclass(frozen=True)
class Kernel:
    """One kernel of a family: names of its inputs and outputs, in signature order."""

    family: str
    name: str
    input_names: Tuple[str, ...]
    output_names: Tuple[str, ...]

    @property
    def qualname(self) -> str:
        """``"family.name"``, as warnings and errors name the kernel."""
        return f"{self.family}.{self.name}"

    def __call__(self, inputs: Sequence[mx.array], *, template: Sequence[TemplateArg], grid: Tuple[int, int, int],
                 threadgroup: Tuple[int, int, int], output_shapes: Sequence[Sequence[int]],
                 output_dtypes: Sequence[mx.Dtype], init_value: float | None = None,
                 mode: str = "metal") -> List[mx.array]:
        """Launch on ``mode``: ``"metal"``, ``"cuda"``, or ``"emulate"`` / ``"emulate-cuda"`` (the
        Metal / CUDA text run on the CPU). MLX's conventions: the grid counts threads, every input
        is passed row-contiguous; inputs of fewer than 8 elements are padded (``device_sized``)."""
        inputs = [device_sized(x) for x in inputs]
        kwargs = dict(template=list(template), grid=grid, threadgroup=threadgroup,
                      output_shapes=[tuple(s) for s in output_shapes], output_dtypes=list(output_dtypes))
        if init_value is not None:
            kwargs["init_value"] = init_value
        if mode in ("emulate", "emulate-cuda"):
            return emulate(self, list(inputs), dialect="metal" if mode == "emulate" else "cuda", **kwargs)
        return self._on_device(inputs, kwargs, mode)

    def mlx_kernel_args(self, dialect: str) -> dict:
        """The arguments this kernel hands ``mx.fast.metal_kernel`` (``dialect="metal"``) or
        ``mx.fast.cuda_kernel`` (``"cuda"``): name, input and output names, body and header."""
        src = load_source(self.family, dialect)
        body = src.bodies.get(self.name)
        if body is None:
            raise ValueError(f"[mlx_zeta.kernels] {src.path} has no kernel {self.name!r}; it has {sorted(src.bodies)}")
        return dict(name=f"mlx_zeta_{self.family}_{self.name}", input_names=list(self.input_names),
                    output_names=list(self.output_names), source=body, header=src.header)

    def _on_device(self, inputs: List[mx.array], kwargs: dict, mode: str) -> List[mx.array]:
        """Build (cached) and launch on Metal / CUDA; the first launch of an instantiation is
        evaluated at once so that a compile or launch failure is caught here (module docstring)."""
        if not kernel_usable(self.qualname, mode):
            raise KernelUnavailable(f"[mlx_zeta.kernels] kernel {self.qualname} is unavailable on {mode}")
        key = (self, mode, str(kwargs["template"]), tuple(x.dtype for x in inputs), str(kwargs["output_dtypes"]))
        probe = key not in _PROBED
        if probe:
            try:
                mx.eval(inputs)
            except (ValueError, RuntimeError):  # tracers (inside mx.compile): no eager run possible here
                probe = False
        make = mx.fast.metal_kernel if mode == "metal" else mx.fast.cuda_kernel
        try:
            outputs = _compiled(self, mode, make)(inputs=list(inputs), **kwargs)
            if probe:
                mx.eval(outputs)
        except Exception as error:  # noqa: BLE001 - whatever MLX or the driver raised is reported as is
            kernel_failed(self.qualname, mode, error)
        if probe:
            _PROBED.add(key)
        return outputs


@functools.lru_cache(maxsize=None)
def _compiled(kernel: Kernel, mode: str, make: Callable):
    """``make(...)`` (MLX's kernel builder for ``mode``) for ``kernel``'s body, once per builder."""
    return make(**kernel.mlx_kernel_args(mode))
