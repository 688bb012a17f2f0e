// Helpers shared by the AVX2 and AVX-512 kernels (included only by files compiled with AVX2).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "kernels.h"

namespace zeta {
namespace {  // internal linkage: each ISA file keeps its own copy, compiled with its own flags

// 16 bytes at p zero-extended into two vectors of int32 lanes: b0 = bytes 0..7, b1 = bytes 8..15.
// The bytes are broadcast to both 128-bit lanes (a plain load on current cores) and shuffle_epi8
// picks byte i of lane L into dword i (0x80 bytes of the control give zeros): 2 shuffles for 16
// bytes where zero-extending moves (vpmovzxbd) need 4 plus 2 byte shifts.
inline void x86_bytes16_to_epi32(const void* p, __m256i& b0, __m256i& b1) {
  const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(static_cast<const __m128i*>(p)));
  const __m256i c0 = _mm256_setr_epi32(int(0x80808000), int(0x80808001), int(0x80808002), int(0x80808003),
                                       int(0x80808004), int(0x80808005), int(0x80808006), int(0x80808007));
  b0 = _mm256_shuffle_epi8(v, c0);
  b1 = _mm256_shuffle_epi8(v, _mm256_add_epi32(c0, _mm256_set1_epi32(8)));
}

// A 32-element unit of a 4-bit row is 16 bytes; byte i holds q[2i] (low nibble) and q[2i+1]
// (high nibble). x86_decode4 yields q[0,2..14], q[16,18..30], q[1,3..15], q[17,19..31] as floats,
// so x is laid out in the same order once per call (x86_permute_x); 8-bit units (32 bytes) need no
// permutation.
inline void x86_decode4(const uint32_t* words, __m256 q[4]) {
  __m256i b0, b1;
  x86_bytes16_to_epi32(words, b0, b1);
  const __m256i low4 = _mm256_set1_epi32(0x0f);
  q[0] = _mm256_cvtepi32_ps(_mm256_and_si256(b0, low4));
  q[1] = _mm256_cvtepi32_ps(_mm256_and_si256(b1, low4));
  q[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4));
  q[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4));
}

inline void x86_decode8(const uint32_t* words, __m256 q[4]) {
  __m256i b[4];
  x86_bytes16_to_epi32(words, b[0], b[1]);
  x86_bytes16_to_epi32(words + 4, b[2], b[3]);
  for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtepi32_ps(b[i]);
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

// The affine GEMV driver of the AVX2 and AVX-512 files. Output rows [n0, n1) go in blocks of
// kRowBlock rows whose scales and biases are converted to float32 once (their weights stay in
// L1/L2 while the rows of x stream past); at M = 1 two output rows per pass, else two rows of x.
// Tile::run<BITS, G, MB, NR>(a, xp, xsum, sc, bi, m0, n0) is the file's register tile: MB rows of
// the permuted x against NR output rows, adding the bias term from the group sums xsum.
template <class Tile, int BITS, int G>
void x86_affine_rows(const AffineProblem& a, int64_t n0, int64_t n1) {
  constexpr int64_t kRowBlock = 8;
  const int64_t groups = a.K / G;
  Buffer<float> xp(a.M * a.K), xsum(a.M * groups), sbuf(kRowBlock * groups), bbuf(kRowBlock * groups);
  x86_permute_x(a.x, a.M * a.K, BITS, xp.data());
  for (size_t i = 0; i < xsum.size(); ++i) {
    float s = 0.0f;
    for (int k = 0; k < G; ++k) s += a.x[i * G + k];
    xsum[i] = s;
  }
  for (int64_t nb = n0; nb < n1; nb += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, n1 - nb);
    const float *sc[kRowBlock], *bi[kRowBlock];
    for (int64_t i = 0; i < rows; ++i) {
      sc[i] = x86_row_scales(a.scales, a.scale_type, (nb + i) * groups, groups, sbuf.data() + i * groups);
      bi[i] = x86_row_scales(a.biases, a.scale_type, (nb + i) * groups, groups, bbuf.data() + i * groups);
    }
    int64_t m = 0;
    for (; m + 2 <= a.M; m += 2)
      for (int64_t i = 0; i < rows; ++i)
        Tile::template run<BITS, G, 2, 1>(a, xp.data() + m * a.K, xsum.data(), sc + i, bi + i, m, nb + i);
    for (; m < a.M; ++m) {
      int64_t i = 0;
      for (; i + 2 <= rows; i += 2)
        Tile::template run<BITS, G, 1, 2>(a, xp.data() + m * a.K, xsum.data(), sc + i, bi + i, m, nb + i);
      for (; i < rows; ++i)
        Tile::template run<BITS, G, 1, 1>(a, xp.data() + m * a.K, xsum.data(), sc + i, bi + i, m, nb + i);
    }
  }
}

// x86_affine_rows with the group size as a template argument (32, 64 or 128).
template <class Tile, int BITS>
void x86_affine_gemv(const AffineProblem& a, int64_t n0, int64_t n1) {
  switch (a.group) {
    case 32: return x86_affine_rows<Tile, BITS, 32>(a, n0, n1);
    case 64: return x86_affine_rows<Tile, BITS, 64>(a, n0, n1);
    default: return x86_affine_rows<Tile, BITS, 128>(a, n0, n1);
  }
}

}  // namespace
}  // namespace zeta
