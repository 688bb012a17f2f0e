"""Custom kernels: Metal bodies (with CUDA twins) in ``metal/``, dispatched by backend, with the
pure-MLX reference beside each as the definition of correctness.

- :func:`fused_attention`: attention with causal / sliding-window masking, soft-capping and
  ALiBi / T5 biases computed in the kernel from O(L) data (decode split-K and tiled prefill).
- :func:`ternary_matmul`: W1.58A8 (exact int32 accumulation) and W1.58A16 products on the
  packed 2-bit layout (GEMV for up to 8 rows, tiled GEMM above).

``use_kernel``: ``None`` picks the kernel where Metal or CUDA is present and the reference
path elsewhere; ``True`` requires a kernel; ``False`` forces the reference; ``"emulate"``
(``"emulate-cuda"``) runs the shipped Metal (CUDA) text on the CPU
(:mod:`mlx_zeta.kernels.emulate`, for tests and for checking a kernel on Linux). Every
kernel is an ``mx.custom_function`` whose gradient comes from the reference path.
"""

from mlx_zeta.kernels.source import Kernel, KernelSource, backend, gpu_backend, load_source
from mlx_zeta.kernels.attention import fused_attention, t5_relative_buckets  # noqa: E402
from mlx_zeta.kernels.ternary import ternary_matmul  # noqa: E402

__all__ = ["Kernel", "KernelSource", "backend", "gpu_backend", "load_source", "fused_attention",
           "t5_relative_buckets", "ternary_matmul"]
