// The AVX-512 (F, BW, VL) kernels shared by avx512.cpp and avx512vnni.cpp; included only by those
// two files, after their ISA guard. The files differ only in the int8 dot product of the ternary
// kernel, passed in as a policy `Dot` (avx512.cpp: maddubs into int16; avx512vnni.cpp: dpbusd):
//   Dot::kBlock  64-byte steps a block accumulator may take before Dot::widen (int32) is needed,
//   Dot::kRows   rows of x per tile (x rows stay in L1 while a packed weight row streams past),
//   Dot::step(acc, codes, x)  acc += the products of 64 unsigned codes and 64 signed int8 x.
//
// With ZETA_SIMDE defined (the test driver build on CPUs without AVX-512) the intrinsics come
// from SIMDe's portable implementation instead of the compiler. The kernels therefore keep to
// intrinsics that SIMDe 0.7 (Debian's libsimde-dev) implements: no masked loads (tails go through
// zero-padded copies), no cvtepu8_epi32 (broadcast + shuffle_epi8), no reduce_add.
#pragma once

#ifdef ZETA_SIMDE
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
// Two native aliases that SIMDe 0.7.4 gets wrong: _mm512_cvtepu32_ps is spelt _mm512_cvtepu32_epi32,
// and _mm512_madd_epi16 is given the four arguments of the masked form.
#ifndef _mm512_cvtepu32_ps
#define _mm512_cvtepu32_ps(a) simde_mm512_cvtepu32_ps(a)
#endif
#undef _mm512_madd_epi16
#define _mm512_madd_epi16(a, b) simde_mm512_madd_epi16(a, b)
#else
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>

#include "kernels.h"
#include "x86_common.h"

namespace zeta {
namespace {  // internal linkage: each of the two files keeps its own copy

inline int32_t hsum512_epi32(__m512i v) {
  __m256i s = _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
  __m128i h = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
  h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1));
  return _mm_cvtsi128_si32(h);
}

inline float hsum512_ps(__m512 v) {
  const __m256 hi = _mm256_castsi256_ps(_mm512_extracti64x4_epi64(_mm512_castps_si512(v), 1));
  __m256 s = _mm256_add_ps(_mm512_castps512_ps256(v), hi);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

// 16 bytes at p zero-extended to 16 int32 lanes (lane e = p[e]): the 16 bytes are broadcast to the
// four 128-bit lanes and shuffle_epi8 picks byte 4L + i into dword i of lane L (0x80: zero).
inline __m512i bytes_to_epi32(const void* p) {
  const __m512i ctl = _mm512_set_epi32(
      int(0x8080800f), int(0x8080800e), int(0x8080800d), int(0x8080800c), int(0x8080800b), int(0x8080800a),
      int(0x80808009), int(0x80808008), int(0x80808007), int(0x80808006), int(0x80808005), int(0x80808004),
      int(0x80808003), int(0x80808002), int(0x80808001), int(0x80808000));
  return _mm512_shuffle_epi8(_mm512_broadcast_i32x4(_mm_loadu_si128(static_cast<const __m128i*>(p))), ctl);
}

// ---- W1.58A8: y = sum c * x - sum x, exact in int32 (kernels.h) ----

// One block of `steps` 64-byte steps of packed row w against MB rows of x (row stride xs), added
// to acc[r][j] (output row p + j * P). c_j = bits 2j, 2j+1 of each packed byte.
template <class Dot, int MB>
inline void ternary_i8_block(const uint8_t* w, const int8_t* x, int64_t xs, int64_t steps, __m512i acc[MB][4]) {
  const __m512i three = _mm512_set1_epi8(3);
  __m512i blk[MB][4];
  for (auto& row : blk)
    for (auto& v : row) v = _mm512_setzero_si512();
  for (int64_t s = 0; s < steps; ++s, w += 64, x += 64) {
    const __m512i b = _mm512_loadu_si512(w);
    const __m512i c[4] = {_mm512_and_si512(b, three), _mm512_and_si512(_mm512_srli_epi16(b, 2), three),
                          _mm512_and_si512(_mm512_srli_epi16(b, 4), three),
                          _mm512_and_si512(_mm512_srli_epi16(b, 6), three)};
    for (int r = 0; r < MB; ++r) {
      const __m512i xv = _mm512_loadu_si512(x + r * xs);
      for (int j = 0; j < 4; ++j) blk[r][j] = Dot::step(blk[r][j], c[j], xv);
    }
  }
  for (int r = 0; r < MB; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_add_epi32(acc[r][j], Dot::widen(blk[r][j]));
}

template <class Dot, int MB>
void ternary_i8_tile(const TernaryProblem& t, const int32_t* xsum, int64_t m0, int64_t p) {
  const auto* x = static_cast<const int8_t*>(t.x) + m0 * t.K;
  const uint8_t* w = t.packed + p * t.K;
  __m512i acc[MB][4];
  for (auto& row : acc)
    for (auto& v : row) v = _mm512_setzero_si512();
  const int64_t steps = t.K / 64, tail = t.K - steps * 64;
  for (int64_t s = 0; s < steps; s += Dot::kBlock)
    ternary_i8_block<Dot, MB>(w + s * 64, x + s * 64, t.K, std::min<int64_t>(Dot::kBlock, steps - s), acc);
  if (tail) {  // the last K % 64 columns, zero-padded (code 0 times x 0 adds nothing)
    alignas(64) uint8_t wt[64] = {};
    alignas(64) int8_t xt[MB][64] = {};
    std::memcpy(wt, w + steps * 64, tail);
    for (int r = 0; r < MB; ++r) std::memcpy(xt[r], x + r * t.K + steps * 64, tail);
    ternary_i8_block<Dot, MB>(wt, xt[0], 64, 1, acc);
  }
  auto* y = static_cast<int32_t*>(t.y);
  for (int r = 0; r < MB; ++r)
    for (int j = 0; j < 4 && p + j * t.P < t.N; ++j)
      y[(m0 + r) * t.N + p + j * t.P] = hsum512_epi32(acc[r][j]) - xsum[m0 + r];
}

template <class Dot>
void ternary_i8_rows(const TernaryProblem& t, int64_t p0, int64_t p1) {
  Buffer<int32_t> xsum(t.M);
  int8_row_sums(static_cast<const int8_t*>(t.x), t.M, t.K, xsum.data());
  int64_t m = 0;
  for (; m + Dot::kRows <= t.M; m += Dot::kRows)
    for (int64_t p = p0; p < p1; ++p) ternary_i8_tile<Dot, Dot::kRows>(t, xsum.data(), m, p);
  for (; m < t.M; ++m)
    for (int64_t p = p0; p < p1; ++p) ternary_i8_tile<Dot, 1>(t, xsum.data(), m, p);
}

// ---- W1.58 x float32: w = c - 1 looked up with permutexvar (table index = low 4 bits) ----

template <int MB>
inline void ternary_f32_step(const uint8_t* w, const float* x, int64_t xs, __m512 acc[MB][4]) {
  const __m512 table = _mm512_set_ps(2, 1, 0, -1, 2, 1, 0, -1, 2, 1, 0, -1, 2, 1, 0, -1);  // (i & 3) - 1
  const __m512i b = bytes_to_epi32(w);
  __m512 wj[4];
  for (int j = 0; j < 4; ++j) wj[j] = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 2 * j), table);
  for (int r = 0; r < MB; ++r) {
    const __m512 xv = _mm512_loadu_ps(x + r * xs);
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_fmadd_ps(wj[j], xv, acc[r][j]);
  }
}

template <int MB>
void ternary_f32_tile(const TernaryProblem& t, int64_t m0, int64_t p) {
  const float* x = static_cast<const float*>(t.x) + m0 * t.K;
  const uint8_t* w = t.packed + p * t.K;
  __m512 acc[MB][4];
  for (auto& row : acc)
    for (auto& v : row) v = _mm512_setzero_ps();
  const int64_t K16 = t.K & ~int64_t(15), tail = t.K - K16;
  for (int64_t k = 0; k < K16; k += 16) ternary_f32_step<MB>(w + k, x + k, t.K, acc);
  if (tail) {  // zero-padded: x = 0 there, whatever the padded code decodes to
    alignas(64) uint8_t wt[16] = {};
    alignas(64) float xt[MB][16] = {};
    std::memcpy(wt, w + K16, tail);
    for (int r = 0; r < MB; ++r) std::memcpy(xt[r], x + r * t.K + K16, tail * sizeof(float));
    ternary_f32_step<MB>(wt, xt[0], 16, acc);
  }
  auto* y = static_cast<float*>(t.y);
  for (int r = 0; r < MB; ++r)
    for (int j = 0; j < 4 && p + j * t.P < t.N; ++j) y[(m0 + r) * t.N + p + j * t.P] = hsum512_ps(acc[r][j]);
}

void avx512_ternary_f32(const TernaryProblem& t, int64_t p0, int64_t p1) {
  int64_t m = 0;
  for (; m + 2 <= t.M; m += 2)
    for (int64_t p = p0; p < p1; ++p) ternary_f32_tile<2>(t, m, p);
  for (; m < t.M; ++m)
    for (int64_t p = p0; p < p1; ++p) ternary_f32_tile<1>(t, m, p);
}

// ---- MLX affine 4/8-bit x float32 ----

// A 32-element unit as two vectors of 16 float codes in the order of x86_permute_x: 4-bit, the
// low nibbles of bytes 0..15 (elements 0, 2, .., 30) then the high ones (1, 3, .., 31); 8-bit,
// bytes 0..15 then 16..31.
template <int BITS>
inline void decode_unit(const uint32_t* w, __m512 q[2]) {
  if constexpr (BITS == 4) {
    const __m512i b = bytes_to_epi32(w);
    q[0] = _mm512_cvtepu32_ps(_mm512_and_si512(b, _mm512_set1_epi32(0x0f)));
    q[1] = _mm512_cvtepu32_ps(_mm512_srli_epi32(b, 4));
  } else {
    q[0] = _mm512_cvtepu32_ps(bytes_to_epi32(w));
    q[1] = _mm512_cvtepu32_ps(bytes_to_epi32(w + 4));
  }
}

inline float dot512_f32(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  float s = hsum512_ps(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// NR output rows n0.. against MB rows of the permuted x (rows m0..): per group, dot = q . x in two
// vectors per (x row, output row), then acc += scale * dot; the bias terms sum_g bias_g * sum(x_g)
// are one dot product per output at the end. The group size G is a template argument so the unit
// loop unrolls and the accumulators stay in registers. sc / bi: the rows' scales and biases.
template <int BITS, int G, int MB, int NR>
void affine_tile(const AffineProblem& a, const float* xp, const float* xsum, const float* const* sc,
                 const float* const* bi, int64_t m0, int64_t n0) {
  constexpr int kUnits = G / 32, kPrefetchBytes = 4096;  // a unit: 32 elements, BITS words
  const int64_t groups = a.K / G, row_words = a.K * BITS / 32;
  const uint32_t* w[NR];
  for (int j = 0; j < NR; ++j) w[j] = a.w + (n0 + j) * row_words;
  __m512 acc[MB][NR];
  for (auto& row : acc)
    for (auto& v : row) v = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 dot[MB][NR][2];
    for (auto& row : dot)
      for (auto& col : row) col[0] = col[1] = _mm512_setzero_ps();
    for (int j = 0; j < NR; ++j)  // the weights are read once: fetch ahead of the hardware prefetcher
      _mm_prefetch(reinterpret_cast<const char*>(w[j] + g * kUnits * BITS) + kPrefetchBytes, _MM_HINT_T0);
#pragma GCC unroll 4
    for (int u = 0; u < kUnits; ++u) {
      const float* xu = xp + (g * kUnits + u) * 32;
#pragma GCC unroll 2
      for (int j = 0; j < NR; ++j) {
        __m512 q[2];
        decode_unit<BITS>(w[j] + (g * kUnits + u) * BITS, q);
#pragma GCC unroll 2
        for (int i = 0; i < 2; ++i)
#pragma GCC unroll 2
          for (int r = 0; r < MB; ++r)
            dot[r][j][i] = _mm512_fmadd_ps(q[i], _mm512_loadu_ps(xu + r * a.K + 16 * i), dot[r][j][i]);
      }
    }
#pragma GCC unroll 2
    for (int j = 0; j < NR; ++j) {
      const __m512 scale = _mm512_set1_ps(sc[j][g]);
#pragma GCC unroll 2
      for (int r = 0; r < MB; ++r) acc[r][j] = _mm512_fmadd_ps(_mm512_add_ps(dot[r][j][0], dot[r][j][1]), scale, acc[r][j]);
    }
  }
#pragma GCC unroll 2
  for (int r = 0; r < MB; ++r)
#pragma GCC unroll 2
    for (int j = 0; j < NR; ++j)
      a.y[(m0 + r) * a.N + n0 + j] = hsum512_ps(acc[r][j]) + dot512_f32(bi[j], xsum + (m0 + r) * groups, groups);
}

// The register tile as x86_affine_rows (x86_common.h) calls it.
struct AffineTile {
  template <int BITS, int G, int MB, int NR>
  static void run(const AffineProblem& a, const float* xp, const float* xsum, const float* const* sc,
                  const float* const* bi, int64_t m0, int64_t n0) {
    affine_tile<BITS, G, MB, NR>(a, xp, xsum, sc, bi, m0, n0);
  }
};

// From 32 rows of x on (avx2.cpp's kGemmMinRows), the AVX2 table's GEMM (a dequantised tile and a
// register-blocked FMA kernel) is used: every AVX-512 CPU has AVX2 + FMA, and the GEMM is bound by FMA
// throughput rather than by the width of the decode.
void avx512_affine_f32(const AffineProblem& a, int64_t n0, int64_t n1) {
  const IsaKernels* avx2 = avx2_kernels();
  if (a.M >= 32 && avx2 != nullptr && avx2->affine_f32 != nullptr) return avx2->affine_f32(a, n0, n1);
  if (a.bits == 4) x86_affine_gemv<AffineTile, 4>(a, n0, n1); else x86_affine_gemv<AffineTile, 8>(a, n0, n1);
}

}  // namespace
}  // namespace zeta
