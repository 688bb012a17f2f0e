// Native CPU kernels of mlx-zeta: the pure C++ core, with no MLX dependency.
//
// Two weight formats, each read in place (no repacking at load time):
//
// * Ternary, Hugging Face's BitNet 2-bit layout (mlx_zeta/kernels/packing.py): packed uint8 (P, K),
//   P = ceil(N / 4); bits 2j, 2j+1 of packed[p, k] hold the code c = w + 1 in {0, 1, 2} of weight
//   row p + j * P. With int8 activations (W1.58A8) the kernels compute, exactly in int32,
//       y[m, n] = sum_k c[n, k] * x[m, k] - sum_k x[m, k]        (= sum_k w[n, k] x[m, k]),
//   which lets every ISA multiply unsigned codes by signed activations (maddubs, dpbusd, sdot).
// * MLX affine (mx.quantize): w uint32 (N, K * bits / 32), element k of row n in bits
//   [(k % per) * bits, +bits) of word k / per (per = 32 / bits, low bits first); scales and biases
//   (N, K / group); value = scale * q + bias. Per group g the kernels compute
//       y[m, n] = sum_g scale[n, g] * (q[n, g] . x[m, g]) + bias[n, g] * sum(x[m, g]).
//
// Every kernel computes the outputs of a range [r0, r1) of its row unit (packed rows for ternary,
// output rows for affine), so the thread pool (threads.h) splits work over output rows and the
// kernels never synchronise.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

namespace zeta {

enum class ScaleType : int { f32 = 0, f16 = 1, bf16 = 2 };

struct TernaryProblem {
  const void* x;          // (M, K) int8 or float32, row-major
  const uint8_t* packed;  // (P, K)
  void* y;                // (M, N) int32 (int8 x) or float32 (float x)
  int64_t M, K, N, P;
};

struct AffineProblem {
  const float* x;      // (M, K) float32, row-major
  const uint32_t* w;   // (N, K * bits / 32)
  const void* scales;  // (N, K / group), scale_type
  const void* biases;  // (N, K / group), scale_type
  ScaleType scale_type;
  float* y;            // (M, N) float32
  int64_t M, K, N;
  int bits, group;     // bits in {4, 8}; group in {32, 64, 128}
};

using TernaryRowsFn = void (*)(const TernaryProblem&, int64_t r0, int64_t r1);
using AffineRowsFn = void (*)(const AffineProblem&, int64_t r0, int64_t r1);

// The kernels of one instruction set. A null entry means "use the scalar kernel".
struct IsaKernels {
  const char* name;
  TernaryRowsFn ternary_i8;
  TernaryRowsFn ternary_f32;
  AffineRowsFn affine_f32;
};

// One table per compiled instruction-set file; each returns nullptr where it was not compiled in.
const IsaKernels* scalar_kernels();
const IsaKernels* avx2_kernels();
const IsaKernels* avx512_kernels();
const IsaKernels* avx512vnni_kernels();
const IsaKernels* neon_kernels();
const IsaKernels* neon_dotprod_kernels();

// The inline helpers below get internal linkage (unnamed namespace): every ISA file is compiled with
// its own -m flags, and an out-of-line copy of an external inline function from, say, the AVX-512
// file could otherwise be the one the linker keeps for the scalar callers too (an illegal
// instruction on a CPU without AVX-512).
namespace {

// Zero-initialised scratch of n elements for the kernels. Not std::vector: its out-of-line
// template code would be instantiated in every ISA file with that file's -m flags and shared
// across files by the linker; a type in this unnamed namespace stays private to its file.
template <typename T>
class Buffer {
 public:
  explicit Buffer(size_t n) : n_(n), p_(static_cast<T*>(std::calloc(n ? n : 1, sizeof(T)))) {
    if (!p_) throw std::bad_alloc();
  }
  ~Buffer() { std::free(p_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* data() { return p_; }
  const T* data() const { return p_; }
  T& operator[](size_t i) { return p_[i]; }
  size_t size() const { return n_; }

 private:
  size_t n_;
  T* p_;
};

inline float half_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise the mantissa
    int e = -1;
    do { man <<= 1; ++e; } while (!(man & 0x400));
    bits = sign | uint32_t(112 - e) << 23 | ((man & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float bf16_to_float(uint16_t b) {
  uint32_t bits = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// scales / biases element i as float32.
inline float scale_at(const void* p, ScaleType t, int64_t i) {
  switch (t) {
    case ScaleType::f16: return half_to_float(static_cast<const uint16_t*>(p)[i]);
    case ScaleType::bf16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// Row sums of int8 x (M, K): the correction term of the code trick above.
inline void int8_row_sums(const int8_t* x, int64_t M, int64_t K, int32_t* out) {
  for (int64_t m = 0; m < M; ++m) {
    int32_t s = 0;
    for (int64_t k = 0; k < K; ++k) s += x[m * K + k];
    out[m] = s;
  }
}

}  // namespace
}  // namespace zeta
