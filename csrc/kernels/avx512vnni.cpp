// x86-64 AVX-512 VNNI kernels: this file is compiled with -mavx512f -mavx512bw -mavx512vl
// -mavx512vnni (sources.cmake) and only called after the CPU was checked (isa.cpp). The kernels
// live in x86_avx512_common.h; this file supplies the int8 dot product of the ternary kernel:
// dpbusd, which multiplies the unsigned codes (0..2) by the signed int8 x and adds groups of four
// products straight into int32 lanes, so sum(c * x) needs no int16 stage and no block limit.
// The float kernels are the AVX-512 ones. With ZETA_SIMDE the same code is compiled against SIMDe
// (the test driver on CPUs without AVX-512, tests/test_cpu_kernels_simde.py).
#include "kernels.h"

#if defined(__x86_64__) && ((defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
                             defined(__AVX512VNNI__)) ||                                               \
                            defined(ZETA_SIMDE))
#include "x86_avx512_common.h"

namespace zeta {
namespace {

struct DpbusdDot {
  static constexpr int64_t kBlock = int64_t(1) << 40;  // int32 lanes: |sum| <= 2 * 128 * K
  static constexpr int kRows = 4;
  static __m512i step(__m512i acc, __m512i codes, __m512i x) { return _mm512_dpbusd_epi32(acc, codes, x); }
  static __m512i widen(__m512i acc32) { return acc32; }
};

void ternary_i8(const TernaryProblem& t, int64_t p0, int64_t p1) { ternary_i8_rows<DpbusdDot>(t, p0, p1); }

const IsaKernels kAvx512Vnni = {"avx512vnni", ternary_i8, avx512_ternary_f32, avx512_affine_f32};

}  // namespace

const IsaKernels* avx512vnni_kernels() { return &kAvx512Vnni; }

}  // namespace zeta

#else

namespace zeta {
const IsaKernels* avx512vnni_kernels() { return nullptr; }
}  // namespace zeta

#endif
