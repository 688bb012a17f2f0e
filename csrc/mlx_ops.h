// MLX primitives over the native kernels (CPU only): lazy graph nodes whose eval_cpu runs the
// kernels of the active ISA on MLX's CPU stream. Gradients and the choice between these and the
// pure-MLX paths live in Python (mlx_zeta/kernels/cpu.py).
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace zeta {

namespace mx = mlx::core;

// x (M, K) int8 -> int32 (M, n_out), exact; float32 -> float32. packed uint8 (ceil(n_out/4), K).
mx::array ternary_matmul(const mx::array& x, const mx::array& packed, int n_out);

// x (M, K) float32, w uint32 (N, K * bits / 32), scales / biases (N, K / group_size) float32,
// float16 or bfloat16 -> float32 (M, N) = x @ dequantize(w).T.
mx::array affine_matmul(const mx::array& x, const mx::array& w, const mx::array& scales, const mx::array& biases,
                        int group_size, int bits);

}  // namespace zeta
