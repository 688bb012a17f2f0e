r"""MLX-affine quantized matmul (``mx.quantize``'s layout) on the path the dispatcher picks: the one
home of the choice between MLX's ``quantized_matmul``, the native CPU kernel, and dequantizing for
the BLAS.

.. math:: y = x\,\hat W^\top, \qquad \hat W_{n,k} = s_{n,g}\,q_{n,k} + b_{n,g},\quad g = \lfloor k / G \rfloor

On the CPU (MLX's default device), with ``mode="affine"``:

* ``bits`` 4 or 8 and ``group_size`` 32, 64 or 128, with the native extension built: the native
  kernel at every row count (:func:`mlx_zeta.kernels.cpu.affine_matmul`, path ``"cpu"`` of
  :func:`~mlx_zeta.kernels.resolve`: a GEMV per decoding step, a tiled GEMM on dequantized
  register tiles for a prompt or a batch; faster than the float32 BLAS at 256 rows, BENCHMARKS.md);
* otherwise, from :data:`DEQUANTIZE_ROWS` rows on: :math:`\hat W` dequantized and multiplied by the
  BLAS, as MLX's CPU ``quantized_matmul`` cost grows with the rows; the float weight is transient,
  one layer at a time;
* otherwise ``mx.quantized_matmul``.

The backward pass of the first two is ``dL/dx = dL/dy \hat W`` on a transiently dequantized
weight (QLoRA on a quantized base holds one layer's float weight at a time).
On a GPU every call is ``mx.quantized_matmul``. All paths compute the same :math:`x \hat W^\top`,
summed in different orders (equal to float32 rounding); gradients flow to ``x`` only (the
quantized arrays are frozen and get zeros).
"""

from __future__ import annotations

import functools

import mlx.core as mx

from mlx_zeta.kernels import cpu
from mlx_zeta.kernels.dispatch import UseKernel, resolve, with_reference_vjp

__all__ = ["affine_matmul", "DEQUANTIZE_ROWS"]

DEQUANTIZE_ROWS = 8  # rows of x from which the CPU dequantizes for the BLAS (measured crossover: 4-8 rows)


def affine_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int,
                  mode: str = "affine", *, use_kernel: UseKernel = None) -> mx.array:
    """``x @ dequantize(w, scales, biases, group_size, bits).T`` (module docstring), as
    ``mx.quantized_matmul(x, w, scales, biases, transpose=True, ...)`` computes it.

    Args:
        x: ``(..., K)`` float activations.
        w: uint32 ``(N, K * bits / 32)``; scales, biases: ``(N, K / group_size)``.
        mode: MLX's quantization mode; only ``"affine"`` has the CPU paths.
        use_kernel: as for every kernel (:mod:`mlx_zeta.kernels.dispatch`); ``False`` skips the
            native kernel (dequantize + BLAS from ``DEQUANTIZE_ROWS`` rows, else ``quantized_matmul``).

    Returns:
        ``(..., N)`` in ``x``'s dtype.
    """
    rows = x.size // max(x.shape[-1], 1)
    on_cpu = mx.default_device() == mx.cpu
    if mode != "affine" or not on_cpu or biases is None:
        return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits, mode=mode)
    if (bits in cpu.AFFINE_BITS and group_size in cpu.AFFINE_GROUPS and rows > 0
            and resolve(use_kernel, "affine_matmul") == "cpu"):
        return _native_matmul(group_size, bits)(x, w, scales, biases)
    if rows >= DEQUANTIZE_ROWS:
        return _dequantized_matmul(group_size, bits)(x, w, scales, biases)
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)


@functools.lru_cache(maxsize=None)
def _native_matmul(group_size: int, bits: int):
    """The native kernel on ``x`` flattened to float32 rows; its VJP is the dequantized matmul's."""

    def forward(x, w, scales, biases):
        x2 = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        y = cpu.affine_matmul(x2, w, scales, biases, group_size, bits)
        return y.reshape(*x.shape[:-1], w.shape[0]).astype(x.dtype)

    return with_reference_vjp(forward, _dequantized_matmul(group_size, bits), frozen=(1, 2, 3))


@functools.lru_cache(maxsize=None)
def _dequantized_matmul(group_size: int, bits: int):
    r""":math:`(x, W_q, s, z) \mapsto x\,\hat W^T`, dequantizing :math:`\hat W` only once ``x`` exists
    (MLX would otherwise schedule every layer's independent dequantize early, holding the whole
    model in float during a prefill), and again in the backward pass once the incoming gradient
    exists, instead of keeping the forward's float copy alive: a prefill, or training adapters on a
    quantized base (QLoRA), holds one layer's float weight at a time. The quantized arrays are
    frozen and get zero gradients."""

    @mx.custom_function
    def matmul(x, w, scales, biases):
        w, scales, biases = mx.depends([w, scales, biases], [x])  # not before x exists: one float weight at a time
        return x @ mx.dequantize(w, scales, biases, group_size, bits).T

    @matmul.vjp
    def matmul_vjp(primals, cotangent, _output):
        x, w, scales, biases = primals
        w, scales, biases = mx.depends([w, scales, biases], [cotangent])  # not before the gradient arrives
        dx = cotangent @ mx.dequantize(w, scales, biases, group_size, bits)
        return dx, mx.zeros_like(w), mx.zeros_like(scales), mx.zeros_like(biases)

    return matmul
