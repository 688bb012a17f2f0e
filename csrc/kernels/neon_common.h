// Helpers shared by the ARM64 NEON kernels (neon.cpp) and the dot-product ones (neon_dotprod.cpp).
// Included only under __aarch64__. The float kernels (ternary x float32, affine x float32) need
// no dot-product instruction, so neon.cpp defines them once and the neon-dotprod table reuses
// them through the declarations below instead of compiling a second copy.
#pragma once

#include <arm_neon.h>

#include <cstdint>

#include "kernels.h"

namespace zeta {
namespace neon {
// The inline helpers have internal linkage (unnamed namespace): neon_dotprod.cpp is compiled with
// +dotprod, and an out-of-line copy from it (the K-tail loop may be vectorised with sdot) could
// otherwise be the one the linker keeps for neon.cpp too, on CPUs without the dot product.
namespace {

// The 4 code vectors of 16 packed bytes: lane i of c[j] = bits 2j..2j+1 of b[i], a code 0..2
// (weight w = c - 1 of row p + j * P), as int8 so it multiplies signed activations directly.
inline void ternary_codes(uint8x16_t b, int8x16_t c[4]) {
  const uint8x16_t three = vdupq_n_u8(3);
  c[0] = vreinterpretq_s8_u8(vandq_u8(b, three));
  c[1] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(b, 2), three));
  c[2] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(b, 4), three));
  c[3] = vreinterpretq_s8_u8(vshrq_n_u8(b, 6));  // the top two bits need no mask
}

// sum_k c[j, k] * x[k] for the K tail k in [k0, K) that the vector loop left over.
inline int32_t ternary_tail_i8(const uint8_t* w, const int8_t* x, int j, int64_t k0, int64_t K) {
  int32_t s = 0;
  for (int64_t k = k0; k < K; ++k) s += ((w[k] >> (2 * j)) & 3) * x[k];
  return s;
}

// Writes the int8 tile's outputs: y[m0 + r, p + j*P] = the lanes of acc[r][j] summed, plus the K
// tail from K16 on, minus sum(x[m0 + r]) (the code offset, kernels.h); rows past N are skipped.
template <int MB>
inline void store_ternary_i8(const TernaryProblem& t, const int32x4_t acc[MB][4], const int32_t* xsum, int64_t m0,
                             int64_t p, int64_t K16) {
  const auto* x = static_cast<const int8_t*>(t.x) + m0 * t.K;
  const uint8_t* w = t.packed + p * t.K;
  auto* y = static_cast<int32_t*>(t.y);
  for (int r = 0; r < MB; ++r) {
    for (int j = 0; j < 4; ++j) {
      const int64_t n = p + j * t.P;
      if (n >= t.N) break;  // the ragged end: the last packed rows hold fewer than 4 weight rows
      const int32_t s = vaddvq_s32(acc[r][j]) + ternary_tail_i8(w, x + r * t.K, j, K16, t.K);
      y[(m0 + r) * t.N + n] = s - xsum[m0 + r];
    }
  }
}

}  // namespace

// The float kernels of neon.cpp (row-range functions, see kernels.h).
void ternary_f32(const TernaryProblem& t, int64_t p0, int64_t p1);
void affine_f32(const AffineProblem& a, int64_t n0, int64_t n1);

}  // namespace neon
}  // namespace zeta
