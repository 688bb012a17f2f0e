// The entry points the MLX primitives and the test driver call: validate nothing (the callers
// did), pick the active ISA's kernel and split its rows over the thread pool.
#pragma once

#include "kernels.h"

namespace zeta {

void run_ternary(const TernaryProblem& t, bool int8_x);
void run_affine(const AffineProblem& a);

}  // namespace zeta
