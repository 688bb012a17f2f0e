r"""Ternary (1.58-bit) matmul on packed 2-bit weights: custom kernels and their reference.

For activations :math:`x \in \mathbb{R}^{M \times K}` (or int8) and ternary weights
:math:`W \in \{-1, 0, 1\}^{N \times K}` packed by :func:`~mlx_zeta.kernels.packing.pack_2bit` into
``packed`` uint8 ``(P, K)``, :math:`P = \lceil N / 4 \rceil` (byte ``packed[p, k]`` holds
:math:`W_{p + jP, k} + 1` in bits :math:`2j, 2j+1`), :func:`ternary_matmul` returns the raw

.. math:: A = x W^{\top} \in \mathbb{R}^{M \times N}

* int8 ``x`` (W1.58A8): ``A`` is int32 and exact (every product is :math:`\pm q` or 0, summed
  in int32; exact while :math:`128 K < 2^{31}`).
* float32 / float16 / bfloat16 ``x`` (W1.58A16): ``A`` is float32, accumulated in float32
  from the exactly upcast inputs.

Scales and bias are not applied here: the caller (:class:`~mlx_zeta.quant.TernaryLinear`)
multiplies ``A`` by its activation and weight scales in MLX, one elementwise pass over
``(M, N)``, which keeps the kernels independent of the scale convention and lets the int8
result be compared bit for bit.

Paths (``use_kernel``, resolved by :func:`mlx_zeta.kernels.dispatch.resolve`): on the CPU, the
native kernel of :mod:`mlx_zeta.kernels.cpu` where it is built (int8 ``x`` at every M; float ``x``
up to ``GEMV_MAX_ROWS`` rows, above which the reference's BLAS matmul is faster); the Metal or CUDA
kernels of ``metal/ternary.metal`` / ``metal/ternary.cu`` — ``ternary_gemv`` for
:math:`M \le 8` (decode: a SIMD group per packed row, lanes over K) and ``ternary_gemm``
otherwise (prefill: 32 x 64 output tiles staged through threadgroup memory) — the CPU
emulation of the same text (``"emulate"``), or :func:`ternary_matmul_reference`, the
definition of correctness (unpack, then an MLX matmul).

Gradients: :func:`ternary_matmul` is an ``mx.custom_function`` whose VJP with respect to
``x`` is the reference's, :math:`\partial L / \partial x = (\partial L / \partial A)\, W`.
The packed weights are frozen integers and get no gradient (a zero cotangent), and so
does an int8 ``x``.
"""

from __future__ import annotations

import functools
from typing import Dict, Tuple

import mlx.core as mx

from mlx_zeta.common import check_int
from mlx_zeta.kernels import cpu
from mlx_zeta.kernels.dispatch import resolve, with_reference_vjp
from mlx_zeta.kernels.packing import unpack_2bit
from mlx_zeta.kernels.launch import Kernel

__all__ = ["ternary_matmul", "ternary_matmul_reference", "kernel_launch", "GEMV_MAX_ROWS"]

GEMV_MAX_ROWS = 8  # ternary_gemv up to this many rows of x (a template parameter), ternary_gemm above
GEMV_SIMDGROUPS = 4  # packed rows (one SIMD group each) per GEMV threadgroup
# must match the constants in the ternary_gemm bodies: BM rows x BP packed rows per group of GEMM_THREADS
GEMM_ROWS, GEMM_PACKED_ROWS, GEMM_THREADS = 32, 16, 128
# float32 holds integers up to 2^24: the reference's int8 products are exact in chunks of this many inputs
_EXACT_CHUNK = (1 << 24) // 128
_MAX_K_INT8 = ((1 << 31) - 1) // 128  # int32 accumulation stays exact up to here
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)

_GEMV = Kernel("ternary", "ternary_gemv", ("x", "w", "dims"), ("y",))
_GEMM = Kernel("ternary", "ternary_gemm", ("x", "w", "dims"), ("y",))


def _check(x: mx.array, packed: mx.array, n_out: int) -> None:
    if not isinstance(x, mx.array) or not isinstance(packed, mx.array):
        raise ValueError("[ternary_matmul] expected mx.array inputs for x and packed")
    if x.dtype != mx.int8 and x.dtype not in _FLOATS:
        raise ValueError(f"[ternary_matmul] expected x of dtype int8, float32, float16 or bfloat16, got {x.dtype}")
    if packed.dtype != mx.uint8 or packed.ndim != 2:
        raise ValueError(f"[ternary_matmul] expected packed to be a 2-D uint8 array (pack_2bit layout), "
                         f"got {packed.dtype} of shape {tuple(packed.shape)}")
    check_int("ternary_matmul", "n_out", n_out, 1)
    if -(-n_out // 4) != packed.shape[0]:
        raise ValueError(f"[ternary_matmul] n_out={n_out} packs 4 outputs to a byte into ceil(n_out / 4) = "
                         f"{-(-n_out // 4)} rows, but packed has {packed.shape[0]} (shape {tuple(packed.shape)}); "
                         f"n_out % 4 != 0 is allowed only with the padded last row")
    if x.ndim < 1 or x.shape[-1] != packed.shape[1]:
        raise ValueError(f"[ternary_matmul] expected x of shape (..., {packed.shape[1]}) to match packed "
                         f"{tuple(packed.shape)}, got {tuple(x.shape)}")
    if x.dtype == mx.int8 and x.shape[-1] > _MAX_K_INT8:
        raise ValueError(f"[ternary_matmul] int8 x with K={x.shape[-1]} > {_MAX_K_INT8} could overflow int32")


def _out_dtype(x: mx.array) -> mx.Dtype:
    return mx.int32 if x.dtype == mx.int8 else mx.float32


def ternary_matmul_reference(x: mx.array, packed: mx.array, n_out: int) -> mx.array:
    """The definition of correctness: unpack ``packed`` to ``W`` (n_out, K) and return ``x @ W.T``.

    x (..., K) int8 -> int32 (..., n_out), exact (float32 matmuls over chunks of at most
    131072 inputs, each exact, summed in int32); float x -> float32 (..., n_out), computed
    from ``x.astype(float32)``. Differentiable in float ``x``.
    """
    _check(x, packed, n_out)
    w = unpack_2bit(packed, n_out).astype(mx.float32)  # (N, K) in {-1, 0, 1}
    if x.dtype != mx.int8:
        return x.astype(mx.float32) @ w.T
    K = x.shape[-1]
    xf = x.astype(mx.float32)
    parts = [(xf[..., k:k + _EXACT_CHUNK] @ w[:, k:k + _EXACT_CHUNK].T).astype(mx.int32)
             for k in range(0, K, _EXACT_CHUNK)]
    return functools.reduce(mx.add, parts)


def kernel_launch(x: mx.array, packed: mx.array, n_out: int) -> Tuple[Kernel, list, Dict]:
    """The launch of the kernel that :func:`ternary_matmul` picks for 2-D ``x`` (M, K):
    ``(kernel, inputs, kwargs)`` such that ``kernel(inputs, **kwargs, mode=...)`` (or
    ``emulate(kernel, inputs, **kwargs, source=...)``) returns ``[A]``, ``A`` (M, n_out).

    GEMV (M <= 8): template ``ROWS=M, ACC``; grid ``(32, G * ceil(P/G), 1)``, threadgroup
    ``(32, G, 1)``, G = ``min(GEMV_SIMDGROUPS, P)``. GEMM: template ``ACC``; grid
    ``(128 * ceil(P/16), ceil(M/32), 1)``, threadgroup ``(128, 1, 1)``.
    """
    _check(x, packed, n_out)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"[ternary_matmul] kernel_launch expects x of shape (M >= 1, K), got {tuple(x.shape)}")
    (M, K), P = x.shape, packed.shape[0]
    acc = _out_dtype(x)
    dims = mx.array([M, K, n_out], dtype=mx.int32)
    common = dict(output_shapes=[(M, n_out)], output_dtypes=[acc])
    if M <= GEMV_MAX_ROWS:
        groups = min(GEMV_SIMDGROUPS, P)
        launch = dict(template=[("ROWS", M), ("ACC", acc)], grid=(32, groups * -(-P // groups), 1),
                      threadgroup=(32, groups, 1), **common)
        return _GEMV, [x, packed, dims], launch
    launch = dict(template=[("ACC", acc)], grid=(GEMM_THREADS * -(-P // GEMM_PACKED_ROWS), -(-M // GEMM_ROWS), 1),
                  threadgroup=(GEMM_THREADS, 1, 1), **common)
    return _GEMM, [x, packed, dims], launch


def _kernel_forward(x: mx.array, packed: mx.array, n_out: int, mode: str) -> mx.array:
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 0:
        return mx.zeros((*lead, n_out), dtype=_out_dtype(x))
    kernel, inputs, launch = kernel_launch(x2, packed, n_out)
    return kernel(inputs, mode=mode, **launch)[0].reshape(*lead, n_out)


def _native_forward(x: mx.array, packed: mx.array, n_out: int) -> mx.array:
    """The native CPU kernel (int8 x at any M, float x up to GEMV_MAX_ROWS rows), else the reference."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 0:
        return mx.zeros((*lead, n_out), dtype=_out_dtype(x))
    if x.dtype != mx.int8:
        if x2.shape[0] > GEMV_MAX_ROWS:
            return ternary_matmul_reference(x, packed, n_out)
        x2 = x2.astype(mx.float32)
    return cpu.ternary_matmul(x2, packed, n_out).reshape(*lead, n_out)


@functools.lru_cache(maxsize=None)
def _differentiable(n_out: int, mode: str):
    """``f(x, packed) -> A`` on ``mode``, with the reference's VJP in x (one per n_out and mode);
    the packed integers (and an int8 x) get zero cotangents."""

    def reference(x, packed):
        return ternary_matmul_reference(x, packed, n_out)

    def forward(x, packed):
        if mode == "cpu":
            return _native_forward(x, packed, n_out)
        return reference(x, packed) if mode == "reference" else _kernel_forward(x, packed, n_out, mode)

    return with_reference_vjp(forward, reference, frozen=(1,))


def ternary_matmul(x: mx.array, packed: mx.array, n_out: int, *, use_kernel=None) -> mx.array:
    r"""Raw ternary product :math:`A = x W^{\top}` on packed 2-bit weights (module docstring).

    Args:
        x (array): ``(..., K)`` activations, int8 (W1.58A8) or float32/float16/bfloat16 (W1.58A16).
        packed (array): uint8 ``(ceil(n_out / 4), K)``, :func:`~mlx_zeta.kernels.packing.pack_2bit` layout.
        n_out (int): output features N (the padding slots of a ragged last packed row are dropped).
        use_kernel: ``None`` (follow the process-wide mode: the Metal/CUDA kernel where present, the
            native CPU kernel where built, else the reference), ``True`` (a kernel, or ``ValueError``), ``False`` (reference), or a mode
            such as ``"emulate"`` (the shipped Metal text on the CPU); see
            :mod:`mlx_zeta.kernels.dispatch`. GEMV for at most ``GEMV_MAX_ROWS`` rows of ``x``, else GEMM.

    Returns:
        ``(..., n_out)``: int32 for int8 ``x`` (exact), float32 otherwise.

    Raises:
        ValueError: on dtypes other than those above, a shape mismatch between ``x`` and
            ``packed``, ``n_out`` not matching ``packed``'s rows, or an unknown ``use_kernel``.
    """
    _check(x, packed, n_out)
    return _differentiable(n_out, resolve(use_kernel, "ternary_matmul"))(x, packed)
