"""Every kernel instantiation our public entry points launch, recorded without running anything.

Shared by ``tools/metal_sources.py`` (the Metal source ``mx.fast.metal_kernel`` generates per
launch) and ``tools/nvrtc.py`` (the CUDA source ``mx.fast.cuda_kernel`` generates): both turn a
:class:`Launch` into text and keep one launch per distinct text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple
from unittest import mock

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core loads)
import mlx.core as mx

from mlx_zeta.kernels import attention, ternary
from mlx_zeta.kernels.launch import Kernel
from mlx_zeta.kernels.source import device_sized


@dataclass(frozen=True)
class Launch:
    """One kernel instantiation our code launches: what decides the source MLX generates."""

    kernel: Kernel
    inputs: Tuple[Tuple[mx.Dtype, int, int], ...]  # (dtype, ndim, size) per input, after device_sized
    template: Tuple[Tuple[str, object], ...]
    outputs: Tuple[mx.Dtype, ...]

    def label(self) -> str:
        """e.g. ``attention_prefill<T=float16, D=64, BQ=16, BK=32> mask=bool``."""
        def show(v):
            return str(v).split(".")[-1] if isinstance(v, mx.Dtype) else str(v)
        args = ", ".join(f"{n}={show(v)}" for n, v in self.template)
        names = self.kernel.input_names
        extra = "".join(f" {n}={show(self.inputs[names.index(n)][0])}" for n in ("x", "mask") if n in names)
        return f"{self.kernel.name}<{args}>{extra}"


def _recorder(found: Dict[Launch, None]):
    def record(self, inputs, *, template, grid, threadgroup, output_shapes, output_dtypes, init_value=None,
               mode="metal"):
        ins = tuple((x.dtype, x.ndim, x.size) for x in map(device_sized, inputs))  # as Kernel.__call__ passes them
        found[Launch(self, ins, tuple(template), tuple(output_dtypes))] = None
        return [mx.zeros(tuple(s), d) for s, d in zip(output_shapes, output_dtypes)]
    return record


def recorded_launches(mode: str) -> List[Launch]:
    """Every distinct :class:`Launch` of the public entry points under kernel ``mode``
    (``"emulate"`` for the Metal bodies, ``"emulate-cuda"`` for the CUDA twins): ``fused_attention``
    over :data:`~mlx_zeta.kernels.attention.DTYPES` x ``HEAD_DIMS`` x {no mask, keep mask,
    additive mask} x {decode, prefill}, ``ternary_matmul`` over int8 / float32 / float16 /
    bfloat16 x rows 1 .. ``GEMV_MAX_ROWS`` + 1. ``Kernel.__call__`` is replaced by a recorder
    while they run, so nothing executes."""
    found: Dict[Launch, None] = {}
    with mock.patch.object(Kernel, "__call__", _recorder(found)):
        for dtype in attention.DTYPES:
            for d in attention.HEAD_DIMS:
                for lq in (1, attention.DECODE_MAX_QUERIES + 1):
                    q, kv = mx.zeros((1, 2, lq, d), dtype), mx.zeros((1, 1, lq, d), dtype)
                    for mask in (None, mx.ones((lq, lq), mx.bool_), mx.zeros((lq, lq), mx.float16)):
                        attention.fused_attention(q, kv, kv, mask=mask, causal=True, use_kernel=mode)
        for dtype in (mx.int8, mx.float32, mx.float16, mx.bfloat16):
            for m in range(1, ternary.GEMV_MAX_ROWS + 2):
                ternary.ternary_matmul(mx.zeros((m, 16), dtype), mx.zeros((2, 16), mx.uint8), 8, use_kernel=mode)
    return list(found)
