// The portable kernels: plain loops, compiled without any instruction-set flag. They are the
// fallback on every CPU and the baseline the vector paths are tested beside.

#include "kernels.h"

namespace zeta {
namespace {

inline int code_of(const TernaryProblem& t, int64_t p, int j, int64_t k) {
  return (t.packed[p * t.K + k] >> (2 * j)) & 3;
}

void ternary_i8(const TernaryProblem& t, int64_t p0, int64_t p1) {
  const auto* x = static_cast<const int8_t*>(t.x);
  auto* y = static_cast<int32_t*>(t.y);
  Buffer<int32_t> xsum(t.M);
  int8_row_sums(x, t.M, t.K, xsum.data());
  for (int64_t p = p0; p < p1; ++p) {
    for (int j = 0; j < 4; ++j) {
      int64_t n = p + j * t.P;
      if (n >= t.N) break;
      for (int64_t m = 0; m < t.M; ++m) {
        int32_t acc = 0;
        for (int64_t k = 0; k < t.K; ++k) acc += code_of(t, p, j, k) * x[m * t.K + k];
        y[m * t.N + n] = acc - xsum[m];
      }
    }
  }
}

void ternary_f32(const TernaryProblem& t, int64_t p0, int64_t p1) {
  const auto* x = static_cast<const float*>(t.x);
  auto* y = static_cast<float*>(t.y);
  for (int64_t p = p0; p < p1; ++p) {
    for (int j = 0; j < 4; ++j) {
      int64_t n = p + j * t.P;
      if (n >= t.N) break;
      for (int64_t m = 0; m < t.M; ++m) {
        float acc = 0.0f;
        for (int64_t k = 0; k < t.K; ++k) acc += float(code_of(t, p, j, k) - 1) * x[m * t.K + k];
        y[m * t.N + n] = acc;
      }
    }
  }
}

void affine_f32(const AffineProblem& a, int64_t n0, int64_t n1) {
  const int per = 32 / a.bits;
  const uint32_t mask = (1u << a.bits) - 1;
  const int64_t words = a.K / per, groups = a.K / a.group;
  for (int64_t n = n0; n < n1; ++n) {
    const uint32_t* w = a.w + n * words;
    for (int64_t m = 0; m < a.M; ++m) {
      const float* x = a.x + m * a.K;
      float acc = 0.0f;
      for (int64_t g = 0; g < groups; ++g) {
        float dot = 0.0f, xs = 0.0f;
        for (int64_t k = g * a.group; k < (g + 1) * a.group; ++k) {
          float q = float((w[k / per] >> ((k % per) * a.bits)) & mask);
          dot += q * x[k];
          xs += x[k];
        }
        acc += scale_at(a.scales, a.scale_type, n * groups + g) * dot +
               scale_at(a.biases, a.scale_type, n * groups + g) * xs;
      }
      a.y[m * a.N + n] = acc;
    }
  }
}

const IsaKernels kScalar = {"scalar", ternary_i8, ternary_f32, affine_f32};

}  // namespace

const IsaKernels* scalar_kernels() { return &kScalar; }

}  // namespace zeta
