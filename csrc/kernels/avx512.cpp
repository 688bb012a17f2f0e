// x86-64 AVX-512 (F, BW, VL) kernels: this file is compiled with -mavx512f -mavx512bw -mavx512vl
// (sources.cmake) and only called after the CPU was checked (isa.cpp). The kernels live in
// x86_avx512_common.h; this file supplies the int8 dot product of the ternary kernel: maddubs
// (code x int8, pair-summed to int16). A pair sum lies in [-512, 508], so 64 steps of it fit an
// int16 lane exactly (64 * -512 = -32768) before madd widens the block to int32.
// With ZETA_SIMDE the same code is compiled against SIMDe (the test driver on CPUs without
// AVX-512, tests/test_cpu_kernels_simde.py).
#include "kernels.h"

#if defined(__x86_64__) && \
    ((defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)) || defined(ZETA_SIMDE))
#include "x86_avx512_common.h"

namespace zeta {
namespace {

struct MaddubsDot {
  static constexpr int64_t kBlock = 64;
  static constexpr int kRows = 2;
  static __m512i step(__m512i acc, __m512i codes, __m512i x) {
    return _mm512_add_epi16(acc, _mm512_maddubs_epi16(codes, x));
  }
  static __m512i widen(__m512i acc16) { return _mm512_madd_epi16(acc16, _mm512_set1_epi16(1)); }
};

void ternary_i8(const TernaryProblem& t, int64_t p0, int64_t p1) { ternary_i8_rows<MaddubsDot>(t, p0, p1); }

const IsaKernels kAvx512 = {"avx512", ternary_i8, avx512_ternary_f32, avx512_affine_f32};

}  // namespace

const IsaKernels* avx512_kernels() { return &kAvx512; }

}  // namespace zeta

#else

namespace zeta {
const IsaKernels* avx512_kernels() { return nullptr; }
}  // namespace zeta

#endif
