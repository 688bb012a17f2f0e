"""Custom kernels: Metal bodies (with CUDA twins) in ``metal/``, dispatched by backend, with the
pure-MLX reference beside each as the definition of correctness.

- :func:`fused_attention`: attention with causal / sliding-window masking, soft-capping and
  ALiBi / T5 biases computed in the kernel from O(L) data (decode split-K and tiled prefill).
- :func:`ternary_matmul`: W1.58A8 (exact int32 accumulation) and W1.58A16 products on the
  packed 2-bit layout (GEMV for up to 8 rows, tiled GEMM above).
- :func:`affine_matmul`: MLX-affine (``mx.quantize``) 4/8-bit products.

Native CPU kernels (:mod:`mlx_zeta.kernels.cpu`, an MLX C++ extension built from ``csrc/`` at
install time, AVX2 / AVX-512 / NEON / scalar chosen at run time) serve ``ternary_matmul`` and
``affine_matmul`` on the CPU when built; :func:`info` says which path each kernel takes here.

Which path a call takes (device kernel, reference, CPU emulation) is decided in one place,
:mod:`mlx_zeta.kernels.dispatch`: a per-call ``use_kernel`` (``None`` follows the process-wide
mode, ``True``, ``False``, or a mode string) and a process-wide mode (:func:`use_kernels`
context, or ``MLX_ZETA_KERNELS=auto|off|emulate|emulate-cuda``). Every kernel is an
``mx.custom_function`` whose gradient comes from the reference path (:func:`with_reference_vjp`).
A device kernel that fails to compile or launch warns once and falls back to its reference
(:class:`KernelError` instead under ``MLX_ZETA_KERNELS_STRICT=1`` / ``use_kernels(strict=True)``).

This package is the lowest compute layer: it imports nothing from ``nn``, ``structs``,
``quant``, ``models`` or ``converters``. The math it shares with them (the 2-bit ternary
layout in :mod:`.packing`, T5 buckets and :class:`PositionBias` in :mod:`.positions`) lives
here and the upper layers import it.
"""

from mlx_zeta.kernels import cpu
from mlx_zeta.kernels.dispatch import (CPU_KERNELS, ENV_VAR, MODES, STRICT_ENV_VAR, KernelError, KernelFallbackWarning,
                                       gpu_backend, info, kernel_mode, kernel_strict, kernels_active, resolve,
                                       use_kernels, with_reference_vjp)
from mlx_zeta.kernels.source import KernelSource, load_source
from mlx_zeta.kernels.launch import Kernel
from mlx_zeta.kernels.positions import PositionBias, relative_position_bucket, t5_relative_buckets
from mlx_zeta.kernels.attention import fused_attention
from mlx_zeta.kernels.ternary import ternary_matmul
from mlx_zeta.kernels.affine import affine_matmul

__all__ = ["cpu", "CPU_KERNELS", "info", "affine_matmul", "ENV_VAR", "MODES", "STRICT_ENV_VAR", "KernelError", "KernelFallbackWarning", "gpu_backend", "kernel_mode",
           "kernel_strict", "kernels_active", "resolve", "use_kernels", "with_reference_vjp", "Kernel", "KernelSource", "load_source", "PositionBias", "relative_position_bucket",
           "t5_relative_buckets", "fused_attention", "ternary_matmul"]
