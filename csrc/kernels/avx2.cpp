// x86-64 AVX2 + FMA kernels (this file is compiled with -mavx2 -mfma and only called after the
// CPU was checked, isa.cpp). The AVX-512 file reuses the x-permutation and decode helpers in
// x86_common.h.
#include "kernels.h"

#if defined(__x86_64__) && defined(__AVX2__)
#include <algorithm>
#include <cstring>

#include "x86_common.h"

namespace zeta {
namespace {

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// W1.58A8 on MB rows of x (m0 .. m0 + MB) and the 4 weight rows of packed row p. Products of a
// code (0..2) and an int8 (-128..127) pair-summed by maddubs lie in [-512, 508], so 64 of them
// fit an int16 accumulator exactly before it is widened to int32.
template <int MB>
void ternary_i8_tile(const TernaryProblem& t, const int32_t* xsum, int64_t m0, int64_t p) {
  const auto* x = static_cast<const int8_t*>(t.x) + m0 * t.K;
  const uint8_t* w = t.packed + p * t.K;
  const __m256i three = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
  __m256i acc[MB][4];
  for (auto& row : acc)
    for (auto& a : row) a = _mm256_setzero_si256();
  const int64_t K32 = t.K & ~int64_t(31);
  for (int64_t k = 0; k < K32;) {
    const int64_t stop = std::min(K32, k + 64 * 32);
    __m256i acc16[MB][4];
    for (auto& row : acc16)
      for (auto& a : row) a = _mm256_setzero_si256();
    for (; k < stop; k += 32) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
      const __m256i c[4] = {_mm256_and_si256(b, three), _mm256_and_si256(_mm256_srli_epi16(b, 2), three),
                            _mm256_and_si256(_mm256_srli_epi16(b, 4), three),
                            _mm256_and_si256(_mm256_srli_epi16(b, 6), three)};
      for (int r = 0; r < MB; ++r) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + r * t.K + k));
        for (int j = 0; j < 4; ++j) acc16[r][j] = _mm256_add_epi16(acc16[r][j], _mm256_maddubs_epi16(c[j], xv));
      }
    }
    for (int r = 0; r < MB; ++r)
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(acc16[r][j], ones));
  }
  auto* y = static_cast<int32_t*>(t.y);
  for (int r = 0; r < MB; ++r) {
    for (int j = 0; j < 4; ++j) {
      const int64_t n = p + j * t.P;
      if (n >= t.N) break;
      int32_t s = hsum_epi32(acc[r][j]);
      for (int64_t k = K32; k < t.K; ++k) s += ((w[k] >> (2 * j)) & 3) * x[r * t.K + k];
      y[(m0 + r) * t.N + n] = s - xsum[m0 + r];
    }
  }
}

void ternary_i8(const TernaryProblem& t, int64_t p0, int64_t p1) {
  Buffer<int32_t> xsum(t.M);
  int8_row_sums(static_cast<const int8_t*>(t.x), t.M, t.K, xsum.data());
  int64_t m = 0;
  for (; m + 2 <= t.M; m += 2)  // x rows stay in L1 while the weights stream past them
    for (int64_t p = p0; p < p1; ++p) ternary_i8_tile<2>(t, xsum.data(), m, p);
  for (; m < t.M; ++m)
    for (int64_t p = p0; p < p1; ++p) ternary_i8_tile<1>(t, xsum.data(), m, p);
}

// W1.58 x float32 on MB rows of x: weights decoded to exact floats w = c - 1, then FMA.
template <int MB>
void ternary_f32_tile(const TernaryProblem& t, int64_t m0, int64_t p) {
  const float* x = static_cast<const float*>(t.x) + m0 * t.K;
  const uint8_t* w = t.packed + p * t.K;
  const __m256i three = _mm256_set1_epi32(3);
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256 acc[MB][4];
  for (auto& row : acc)
    for (auto& a : row) a = _mm256_setzero_ps();
  const int64_t K8 = t.K & ~int64_t(7);
  for (int64_t k = 0; k < K8; k += 8) {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k)));
    __m256 wj[4];
    for (int j = 0; j < 4; ++j)
      wj[j] = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(b, 2 * j), three)), one);
    for (int r = 0; r < MB; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * t.K + k);
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_fmadd_ps(wj[j], xv, acc[r][j]);
    }
  }
  auto* y = static_cast<float*>(t.y);
  for (int r = 0; r < MB; ++r) {
    for (int j = 0; j < 4; ++j) {
      const int64_t n = p + j * t.P;
      if (n >= t.N) break;
      float s = hsum_ps(acc[r][j]);
      for (int64_t k = K8; k < t.K; ++k) s += float(((w[k] >> (2 * j)) & 3) - 1) * x[r * t.K + k];
      y[(m0 + r) * t.N + n] = s;
    }
  }
}

void ternary_f32(const TernaryProblem& t, int64_t p0, int64_t p1) {
  int64_t m = 0;
  for (; m + 2 <= t.M; m += 2)
    for (int64_t p = p0; p < p1; ++p) ternary_f32_tile<2>(t, m, p);
  for (; m < t.M; ++m)
    for (int64_t p = p0; p < p1; ++p) ternary_f32_tile<1>(t, m, p);
}

inline float dot_f32(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum_ps(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// NR output rows n0.. against MB rows of the permuted x (x rows m0..): per group g,
// dot_g = q_g . x_g accumulates in 2 vectors per (x row, output row), then acc += scale_g * dot_g;
// the bias terms sum_g bias_g * sum(x_g) are one dot product per output at the end. The group
// size is a template argument so the unit loop unrolls and the accumulators stay in registers;
// NR = 2 at M = 1 gives the core two independent rows to interleave. sc / bi: the rows' scales and
// biases as float32.
template <int BITS, int G, int MB, int NR>
void affine_tile(const AffineProblem& a, const float* xp, const float* xsum, const float* const* sc,
                 const float* const* bi, int64_t m0, int64_t n0) {
  constexpr int kUnits = G / 32, kWordsPerUnit = BITS;  // 32 elements of BITS bits = BITS words
  constexpr int kPrefetchBytes = 4096;
  const int64_t groups = a.K / G, row_words = a.K * BITS / 32;
  const uint32_t* w[NR];
  for (int j = 0; j < NR; ++j) w[j] = a.w + (n0 + j) * row_words;
  __m256 acc[MB][NR];
  for (auto& row : acc)
    for (auto& v : row) v = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 dot[MB][NR][2];
    for (auto& row : dot)
      for (auto& col : row) col[0] = col[1] = _mm256_setzero_ps();
    for (int j = 0; j < NR; ++j)  // the weights are read once: fetch ahead of the hardware prefetcher
      _mm_prefetch(reinterpret_cast<const char*>(w[j] + g * kUnits * kWordsPerUnit) + kPrefetchBytes, _MM_HINT_T0);
#pragma GCC unroll 4
    for (int u = 0; u < kUnits; ++u) {
      const float* xu = xp + (g * kUnits + u) * 32;
#pragma GCC unroll 2
      for (int j = 0; j < NR; ++j) {
        __m256 q[4];
        const uint32_t* wu = w[j] + (g * kUnits + u) * kWordsPerUnit;
        if constexpr (BITS == 4) x86_decode4(wu, q); else x86_decode8(wu, q);
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i)
          for (int r = 0; r < MB; ++r)
            dot[r][j][i & 1] = _mm256_fmadd_ps(q[i], _mm256_loadu_ps(xu + r * a.K + 8 * i), dot[r][j][i & 1]);
      }
    }
    for (int j = 0; j < NR; ++j) {
      const __m256 scale = _mm256_set1_ps(sc[j][g]);
      for (int r = 0; r < MB; ++r) acc[r][j] = _mm256_fmadd_ps(_mm256_add_ps(dot[r][j][0], dot[r][j][1]), scale, acc[r][j]);
    }
  }
  for (int r = 0; r < MB; ++r)
    for (int j = 0; j < NR; ++j)
      a.y[(m0 + r) * a.N + n0 + j] = hsum_ps(acc[r][j]) + dot_f32(bi[j], xsum + (m0 + r) * groups, groups);
}

// The register tile as x86_affine_rows (x86_common.h) calls it.
struct AffineTile {
  template <int BITS, int G, int MB, int NR>
  static void run(const AffineProblem& a, const float* xp, const float* xsum, const float* const* sc,
                  const float* const* bi, int64_t m0, int64_t n0) {
    affine_tile<BITS, G, MB, NR>(a, xp, xsum, sc, bi, m0, n0);
  }
};

// ---- affine GEMM (M >= kGemmMinRows): the decode is amortised over all rows of x ----
// K is walked in chunks of up to kChunkK; per chunk, 16 output rows at a time are dequantised
// (w = scale * q + bias, float32) into a k-major tile wt[k * 16 + j] (up to 256 KB, L2), then a 6 x 16 register-blocked float kernel runs over all rows of x: per
// k, two loads of wt, 6 broadcasts of x, 12 FMAs (12 accumulators + 3 registers). Later chunks
// add to y.
// From kGemmMinRows rows of x the tile's dequantisation (a strided scatter, ~16 ms for 4096 x 4096
// on one core) costs less than decoding the weights again for every pair of rows: measured
// crossover between 32 and 64 rows (M=32: 27 vs 26 ms, M=256: 104 vs 235 ms).
constexpr int kTileN = 16, kTileM = 6, kGemmMinRows = 32;
// A multiple of every group size. Whole rows of K (one chunk) measured fastest up to K = 4096:
// the rows of x stream well through the hardware prefetcher; y is then written once.
constexpr int64_t kChunkK = 4096;

template <int BITS>
void dequantize_tile(const AffineProblem& a, int64_t n0, int64_t n1, int64_t k0, int64_t kc, float* sbuf, float* wt) {
  const int64_t groups = a.K / a.group, row_words = a.K * BITS / 32, cg = kc / a.group;
  for (int j = 0; j < kTileN; ++j) {
    const int64_t n = n0 + j;
    if (n >= n1) {  // past the ragged end: zero columns, never stored
      for (int64_t k = 0; k < kc; ++k) wt[k * kTileN + j] = 0.0f;
      continue;
    }
    const float* sc = x86_row_scales(a.scales, a.scale_type, n * groups + k0 / a.group, cg, sbuf);
    const float* bi = x86_row_scales(a.biases, a.scale_type, n * groups + k0 / a.group, cg, sbuf + cg);
    const uint32_t* w = a.w + n * row_words + k0 * BITS / 32;
    for (int64_t u = 0; u < kc / 32; ++u) {  // a unit: 32 elements in x86_decode4/8's order
      const int64_t g = u * 32 / a.group;
      const __m256 s = _mm256_set1_ps(sc[g]), b = _mm256_set1_ps(bi[g]);
      __m256 q[4];
      if constexpr (BITS == 4) x86_decode4(w + u * BITS, q); else x86_decode8(w + u * BITS, q);
      alignas(32) float v[32];
      for (int i = 0; i < 4; ++i) _mm256_store_ps(v + 8 * i, _mm256_fmadd_ps(q[i], s, b));
      float* out = wt + u * 32 * kTileN + j;
      for (int e = 0; e < 32; ++e) out[(BITS == 4 ? (e < 16 ? 2 * e : 2 * e - 31) : e) * kTileN] = v[e];
    }
  }
}

// y[r, 0:cols] (+)= x[r, 0:kc] . wt[0:kc, 0:cols] for the MR rows of x at x (row stride xs).
template <int MR>
void gemm_micro(const float* x, int64_t xs, int64_t kc, const float* wt, float* y, int64_t ldy, int64_t cols,
                bool accumulate) {
  __m256 acc[MR][2];
#pragma GCC unroll 6  // unrolled early, so the accumulators are registers rather than stack slots
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 w0 = _mm256_loadu_ps(wt + k * kTileN), w1 = _mm256_loadu_ps(wt + k * kTileN + 8);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 xb = _mm256_broadcast_ss(x + r * xs + k);
      acc[r][0] = _mm256_fmadd_ps(xb, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xb, w1, acc[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    alignas(32) float out[kTileN];
    _mm256_store_ps(out, acc[r][0]);
    _mm256_store_ps(out + 8, acc[r][1]);
    for (int64_t j = 0; j < cols; ++j) y[r * ldy + j] = accumulate ? y[r * ldy + j] + out[j] : out[j];
  }
}

template <int MR>
void gemm_rows(const AffineProblem& a, int64_t m, int64_t k0, int64_t kc, const float* wt, int64_t nb, int64_t cols) {
  gemm_micro<MR>(a.x + m * a.K + k0, a.K, kc, wt, a.y + m * a.N + nb, a.N, cols, k0 > 0);
}

template <int BITS>
void affine_gemm(const AffineProblem& a, int64_t n0, int64_t n1) {
  const int64_t chunk = std::min(kChunkK, a.K);
  Buffer<float> wt(chunk * kTileN), sbuf(2 * chunk);
  for (int64_t k0 = 0; k0 < a.K; k0 += chunk) {
    const int64_t kc = std::min(chunk, a.K - k0);
    for (int64_t nb = n0; nb < n1; nb += kTileN) {
      dequantize_tile<BITS>(a, nb, n1, k0, kc, sbuf.data(), wt.data());
      const int64_t cols = std::min<int64_t>(kTileN, n1 - nb);
      int64_t m = 0;
      for (; m + kTileM <= a.M; m += kTileM) gemm_rows<kTileM>(a, m, k0, kc, wt.data(), nb, cols);
      switch (a.M - m) {
        case 5: gemm_rows<5>(a, m, k0, kc, wt.data(), nb, cols); break;
        case 4: gemm_rows<4>(a, m, k0, kc, wt.data(), nb, cols); break;
        case 3: gemm_rows<3>(a, m, k0, kc, wt.data(), nb, cols); break;
        case 2: gemm_rows<2>(a, m, k0, kc, wt.data(), nb, cols); break;
        case 1: gemm_rows<1>(a, m, k0, kc, wt.data(), nb, cols); break;
        default: break;
      }
    }
  }
}

void affine_f32(const AffineProblem& a, int64_t n0, int64_t n1) {
  if (a.M >= kGemmMinRows) {
    if (a.bits == 4) affine_gemm<4>(a, n0, n1); else affine_gemm<8>(a, n0, n1);
  } else {
    if (a.bits == 4) x86_affine_gemv<AffineTile, 4>(a, n0, n1); else x86_affine_gemv<AffineTile, 8>(a, n0, n1);
  }
}

const IsaKernels kAvx2 = {"avx2", ternary_i8, ternary_f32, affine_f32};

}  // namespace

const IsaKernels* avx2_kernels() { return &kAvx2; }

}  // namespace zeta

#else

namespace zeta {
const IsaKernels* avx2_kernels() { return nullptr; }
}  // namespace zeta

#endif
