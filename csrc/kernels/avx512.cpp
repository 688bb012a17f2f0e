// x86-64 AVX-512 (F, BW, VL) kernels. Placeholder: not yet written.
#include "kernels.h"

namespace zeta {
const IsaKernels* avx512_kernels() { return nullptr; }
}  // namespace zeta
