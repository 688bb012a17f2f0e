#include "run.h"

#include "isa.h"
#include "threads.h"

namespace zeta {

void run_ternary(const TernaryProblem& t, bool int8_x) {
  const IsaKernels& k = active_kernels();
  TernaryRowsFn fn = int8_x ? k.ternary_i8 : k.ternary_f32;
  parallel_for(t.P, 1, [&](int64_t b, int64_t e) { fn(t, b, e); });
}

void run_affine(const AffineProblem& a) {
  const IsaKernels& k = active_kernels();
  parallel_for(a.N, 4, [&](int64_t b, int64_t e) { k.affine_f32(a, b, e); });
}

}  // namespace zeta
