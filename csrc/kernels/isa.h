// Which instruction set the kernels run on: chosen once from the CPU's features (best first:
// avx512vnni, avx512, avx2, neon-dotprod, neon, scalar), or forced by name for tests and benchmarks
// (set_isa, or $MLX_ZETA_CPU_ISA at first use).
#pragma once

#include <string>
#include <vector>

#include "kernels.h"

namespace zeta {

// The ISAs that are both compiled into this build and supported by this CPU, best first.
std::vector<std::string> supported_isas();
// Every ISA compiled into this build (whether or not this CPU runs it).
std::vector<std::string> compiled_isas();
// The kernels in force; a null entry of the forced ISA falls back to the scalar kernel.
const IsaKernels& active_kernels();
std::string active_isa();
// Force an ISA by name ("auto" returns to the best); throws std::invalid_argument naming the
// supported ones when this build or CPU lacks it.
void set_isa(const std::string& name);

}  // namespace zeta
