// ARM64 NEON dot-product (FEAT_DotProd, ARMv8.2+: Apple M1 and later, Cortex-A55/A76 and later,
// Neoverse) kernels. This file is compiled with -march=armv8.2-a+dotprod (sources.cmake) and only
// called after the CPU was checked (isa.cpp). Only W1.58A8 gains from sdot; the float kernels are
// neon.cpp's (neon_common.h).
#include "kernels.h"

#if defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)

#include "neon_common.h"

namespace zeta {
namespace {

// W1.58A8 on MB rows of x and the 4 weight rows of packed row p. Codes 0..2 are valid int8, so
// vdotq_s32(acc, c, x) adds sum over 4 adjacent k of c * x to each int32 lane: exact, no int16
// stage (a lane gains at most 4 * 256 per 16 k, far from the int32 range for any real K).
template <int MB>
void ternary_i8_tile(const TernaryProblem& t, const int32_t* xsum, int64_t m0, int64_t p) {
  const auto* x = static_cast<const int8_t*>(t.x) + m0 * t.K;
  const uint8_t* w = t.packed + p * t.K;
  int32x4_t acc[MB][4];
  for (auto& row : acc)
    for (auto& a : row) a = vdupq_n_s32(0);
  const int64_t K16 = t.K & ~int64_t(15);
  for (int64_t k = 0; k < K16; k += 16) {
    int8x16_t c[4];
    neon::ternary_codes(vld1q_u8(w + k), c);
    for (int r = 0; r < MB; ++r) {
      const int8x16_t xv = vld1q_s8(x + r * t.K + k);
      for (int j = 0; j < 4; ++j) acc[r][j] = vdotq_s32(acc[r][j], c[j], xv);
    }
  }
  neon::store_ternary_i8<MB>(t, acc, xsum, m0, p, K16);
}

void ternary_i8(const TernaryProblem& t, int64_t p0, int64_t p1) {
  Buffer<int32_t> xsum(t.M);
  int8_row_sums(static_cast<const int8_t*>(t.x), t.M, t.K, xsum.data());
  int64_t m = 0;
  for (; m + 4 <= t.M; m += 4)  // 4 x rows: 16 accumulators, the packed bytes decoded once for all
    for (int64_t p = p0; p < p1; ++p) ternary_i8_tile<4>(t, xsum.data(), m, p);
  for (; m < t.M; ++m)
    for (int64_t p = p0; p < p1; ++p) ternary_i8_tile<1>(t, xsum.data(), m, p);
}

const IsaKernels kNeonDotprod = {"neon-dotprod", ternary_i8, neon::ternary_f32, neon::affine_f32};

}  // namespace

const IsaKernels* neon_dotprod_kernels() { return &kNeonDotprod; }

}  // namespace zeta

#else

namespace zeta {
const IsaKernels* neon_dotprod_kernels() { return nullptr; }
}  // namespace zeta

#endif
