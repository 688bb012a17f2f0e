// Helpers shared by the AVX2 and AVX-512 kernels (included only by files compiled with AVX2).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "kernels.h"

namespace zeta {
namespace {  // internal linkage: each ISA file keeps its own copy, compiled with its own flags

// A 32-element unit of a 4-bit row is 16 bytes; byte i holds q[2i] (low nibble) and q[2i+1]
// (high nibble). x86_decode4 yields q[0,2..14], q[16,18..30], q[1,3..15], q[17,19..31] as int32
// lanes, so x is laid out in the same order once per call (x86_permute_x); 8-bit units need no
// permutation.
inline void x86_decode4(const uint32_t* words, __m256i q[4]) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(words));
  const __m128i low4 = _mm_set1_epi8(0x0f);
  const __m128i lo = _mm_and_si128(v, low4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low4);
  q[0] = _mm256_cvtepu8_epi32(lo);
  q[1] = _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8));
  q[2] = _mm256_cvtepu8_epi32(hi);
  q[3] = _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8));
}

inline void x86_decode8(const uint32_t* words, __m256i q[4]) {
  const auto* bytes = reinterpret_cast<const __m128i*>(words);
  const __m128i v0 = _mm_loadu_si128(bytes), v1 = _mm_loadu_si128(bytes + 1);
  q[0] = _mm256_cvtepu8_epi32(v0);
  q[1] = _mm256_cvtepu8_epi32(_mm_srli_si128(v0, 8));
  q[2] = _mm256_cvtepu8_epi32(v1);
  q[3] = _mm256_cvtepu8_epi32(_mm_srli_si128(v1, 8));
}

// x (count floats, count a multiple of 32) in the element order of x86_decode4 / x86_decode8.
inline void x86_permute_x(const float* x, int64_t count, int bits, float* out) {
  for (int64_t u = 0; u < count; u += 32) {
    for (int i = 0; i < 32; ++i) {
      int src = bits != 4 ? i : (i < 16 ? 2 * i : 2 * (i - 16) + 1);
      out[u + i] = x[u + src];
    }
  }
}

// scales or biases [i0, i0 + count) as float32 (once per output row, not once per group).
inline const float* x86_row_scales(const void* p, ScaleType t, int64_t i0, int64_t count, float* buf) {
  if (t == ScaleType::f32) return static_cast<const float*>(p) + i0;
  for (int64_t i = 0; i < count; ++i) buf[i] = scale_at(p, t, i0 + i);
  return buf;
}

}  // namespace
}  // namespace zeta
