// ARM64 NEON (ARMv8.0 Advanced SIMD) kernels: every AArch64 CPU has them, Apple silicon included.
// W1.58A8 multiplies codes by int8 activations with widening multiply-accumulates (exact int32);
// the float paths decode weights to float32 and use FMA. The dot-product file (neon_dotprod.cpp)
// replaces only the int8 kernel and reuses the two float kernels defined here (neon_common.h).
#include "kernels.h"

#if defined(__aarch64__)
#include <algorithm>

#include "neon_common.h"

namespace zeta {
namespace {

// Iterations of 16 bytes of K accumulated in int16 before widening to int32. Each iteration adds
// two products c * x (c in 0..2, x in -128..127, so each in [-256, 254]) to every int16 lane:
// 32 iterations stay within [-16384, 16256], exactly representable (64 would just reach -32768).
constexpr int64_t kI16Iters = 32;

// W1.58A8 on MB rows of x (m0 .. m0 + MB) and the 4 weight rows of packed row p:
// vmull/vmlal_s8 form c * x in int16 lanes, vpadalq_s16 pair-adds them into int32 lanes.
template <int MB>
void ternary_i8_tile(const TernaryProblem& t, const int32_t* xsum, int64_t m0, int64_t p) {
  const auto* x = static_cast<const int8_t*>(t.x) + m0 * t.K;
  const uint8_t* w = t.packed + p * t.K;
  int32x4_t acc[MB][4];
  for (auto& row : acc)
    for (auto& a : row) a = vdupq_n_s32(0);
  const int64_t K16 = t.K & ~int64_t(15);
  for (int64_t k = 0; k < K16;) {
    const int64_t stop = std::min(K16, k + kI16Iters * 16);
    int16x8_t acc16[MB][4];
    for (auto& row : acc16)
      for (auto& a : row) a = vdupq_n_s16(0);
    for (; k < stop; k += 16) {
      int8x16_t c[4];
      neon::ternary_codes(vld1q_u8(w + k), c);
      for (int r = 0; r < MB; ++r) {
        const int8x16_t xv = vld1q_s8(x + r * t.K + k);
        for (int j = 0; j < 4; ++j) {
          acc16[r][j] = vmlal_s8(acc16[r][j], vget_low_s8(c[j]), vget_low_s8(xv));
          acc16[r][j] = vmlal_high_s8(acc16[r][j], c[j], xv);
        }
      }
    }
    for (int r = 0; r < MB; ++r)
      for (int j = 0; j < 4; ++j) acc[r][j] = vpadalq_s16(acc[r][j], acc16[r][j]);
  }
  neon::store_ternary_i8<MB>(t, acc, xsum, m0, p, K16);
}

void ternary_i8(const TernaryProblem& t, int64_t p0, int64_t p1) {
  Buffer<int32_t> xsum(t.M);
  int8_row_sums(static_cast<const int8_t*>(t.x), t.M, t.K, xsum.data());
  int64_t m = 0;
  for (; m + 2 <= t.M; m += 2)  // 2 x rows: 16 int32 + 16 int16 accumulators fill the 32 registers
    for (int64_t p = p0; p < p1; ++p) ternary_i8_tile<2>(t, xsum.data(), m, p);
  for (; m < t.M; ++m)
    for (int64_t p = p0; p < p1; ++p) ternary_i8_tile<1>(t, xsum.data(), m, p);
}

// 16 int8 values -> 4 float32x4 (elements 0-3, 4-7, 8-11, 12-15), exact.
inline void s8_to_f32(int8x16_t v, float32x4_t out[4]) {
  const int16x8_t lo = vmovl_s8(vget_low_s8(v)), hi = vmovl_high_s8(v);
  out[0] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo)));
  out[1] = vcvtq_f32_s32(vmovl_high_s16(lo));
  out[2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi)));
  out[3] = vcvtq_f32_s32(vmovl_high_s16(hi));
}

// W1.58 x float32 on MB rows of x: the codes of 16 k become exact floats w = c - 1, then FMA.
template <int MB>
void ternary_f32_tile(const TernaryProblem& t, int64_t m0, int64_t p) {
  const float* x = static_cast<const float*>(t.x) + m0 * t.K;
  const uint8_t* w = t.packed + p * t.K;
  const int8x16_t one = vdupq_n_s8(1);
  float32x4_t acc[MB][4];
  for (auto& row : acc)
    for (auto& a : row) a = vdupq_n_f32(0.0f);
  const int64_t K16 = t.K & ~int64_t(15);
  for (int64_t k = 0; k < K16; k += 16) {
    int8x16_t c[4];
    neon::ternary_codes(vld1q_u8(w + k), c);
    for (int j = 0; j < 4; ++j) {
      float32x4_t wf[4];
      s8_to_f32(vsubq_s8(c[j], one), wf);
      for (int r = 0; r < MB; ++r)
        for (int i = 0; i < 4; ++i) acc[r][j] = vfmaq_f32(acc[r][j], wf[i], vld1q_f32(x + r * t.K + k + 4 * i));
    }
  }
  auto* y = static_cast<float*>(t.y);
  for (int r = 0; r < MB; ++r) {
    for (int j = 0; j < 4; ++j) {
      const int64_t n = p + j * t.P;
      if (n >= t.N) break;
      float s = vaddvq_f32(acc[r][j]);
      for (int64_t k = K16; k < t.K; ++k) s += float(((w[k] >> (2 * j)) & 3) - 1) * x[r * t.K + k];
      y[(m0 + r) * t.N + n] = s;
    }
  }
}

// 16 uint8 values -> 4 float32x4 in element order, exact (vmovl widening, then vcvtq_f32_u32).
inline void u8_to_f32(uint8x16_t v, float32x4_t out[4]) {
  const uint16x8_t lo = vmovl_u8(vget_low_u8(v)), hi = vmovl_high_u8(v);
  out[0] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo)));
  out[1] = vcvtq_f32_u32(vmovl_high_u16(lo));
  out[2] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi)));
  out[3] = vcvtq_f32_u32(vmovl_high_u16(hi));
}

// One 32-element unit of an affine row (BITS uint32 words) -> q[i] = elements 4i .. 4i+3.
// Words are little-endian (every AArch64 OS), so byte b of a 4-bit unit holds element 2b in its
// low nibble and 2b + 1 in its high one: zipping the low and high nibbles restores the order.
template <int BITS>
inline void affine_unit(const uint32_t* words, float32x4_t q[8]) {
  const auto* bytes = reinterpret_cast<const uint8_t*>(words);
  if constexpr (BITS == 4) {
    const uint8x16_t v = vld1q_u8(bytes);
    const uint8x16_t lo = vandq_u8(v, vdupq_n_u8(0x0f)), hi = vshrq_n_u8(v, 4);
    u8_to_f32(vzip1q_u8(lo, hi), q);
    u8_to_f32(vzip2q_u8(lo, hi), q + 4);
  } else {
    u8_to_f32(vld1q_u8(bytes), q);
    u8_to_f32(vld1q_u8(bytes + 16), q + 4);
  }
}

// Affine row n against MB rows of x: per group g, dot_g = q_g . x_g (2 accumulators per row),
// then y += scale_g * dot_g + bias_g * sum(x_g) (xsum: (M, K / group) group sums of x).
template <int BITS, int MB>
void affine_row(const AffineProblem& a, const float* xsum, int64_t m0, int64_t n) {
  const int64_t groups = a.K / a.group, units = a.group / 32;
  const uint32_t* w = a.w + n * (a.K * BITS / 32);
  const float* x = a.x + m0 * a.K;
  float32x4_t acc[MB];
  float bias_acc[MB] = {};
  for (auto& v : acc) v = vdupq_n_f32(0.0f);
  for (int64_t g = 0; g < groups; ++g) {
    float32x4_t dot[MB][2];
    for (auto& row : dot)
      for (auto& v : row) v = vdupq_n_f32(0.0f);
    for (int64_t u = 0; u < units; ++u, w += BITS) {
      float32x4_t q[8];
      affine_unit<BITS>(w, q);
      const float* xu = x + g * a.group + u * 32;
      for (int r = 0; r < MB; ++r)
        for (int i = 0; i < 8; ++i) dot[r][i & 1] = vfmaq_f32(dot[r][i & 1], q[i], vld1q_f32(xu + r * a.K + 4 * i));
    }
    const float scale = scale_at(a.scales, a.scale_type, n * groups + g);
    const float bias = scale_at(a.biases, a.scale_type, n * groups + g);
    for (int r = 0; r < MB; ++r) {
      acc[r] = vfmaq_n_f32(acc[r], vaddq_f32(dot[r][0], dot[r][1]), scale);
      bias_acc[r] += bias * xsum[(m0 + r) * groups + g];
    }
  }
  for (int r = 0; r < MB; ++r) a.y[(m0 + r) * a.N + n] = vaddvq_f32(acc[r]) + bias_acc[r];
}

template <int BITS>
void affine_rows(const AffineProblem& a, int64_t n0, int64_t n1) {
  Buffer<float> xsum(a.M * (a.K / a.group));
  for (size_t i = 0; i < xsum.size(); ++i) {
    float s = 0.0f;
    for (int k = 0; k < a.group; ++k) s += a.x[i * a.group + k];
    xsum[i] = s;
  }
  int64_t m = 0;
  for (; m + 4 <= a.M; m += 4)  // one decoded unit (8 registers) serves 4 x rows
    for (int64_t n = n0; n < n1; ++n) affine_row<BITS, 4>(a, xsum.data(), m, n);
  for (; m < a.M; ++m)
    for (int64_t n = n0; n < n1; ++n) affine_row<BITS, 1>(a, xsum.data(), m, n);
}

}  // namespace

namespace neon {

void ternary_f32(const TernaryProblem& t, int64_t p0, int64_t p1) {
  int64_t m = 0;
  for (; m + 4 <= t.M; m += 4)
    for (int64_t p = p0; p < p1; ++p) ternary_f32_tile<4>(t, m, p);
  for (; m < t.M; ++m)
    for (int64_t p = p0; p < p1; ++p) ternary_f32_tile<1>(t, m, p);
}

void affine_f32(const AffineProblem& a, int64_t n0, int64_t n1) {
  if (a.bits == 4) affine_rows<4>(a, n0, n1); else affine_rows<8>(a, n0, n1);
}

}  // namespace neon

namespace {
const IsaKernels kNeon = {"neon", ternary_i8, neon::ternary_f32, neon::affine_f32};
}  // namespace

const IsaKernels* neon_kernels() { return &kNeon; }

}  // namespace zeta

#else

namespace zeta {
const IsaKernels* neon_kernels() { return nullptr; }
}  // namespace zeta

#endif
