// x86-64 AVX-512 VNNI kernels. Placeholder: not yet written.
#include "kernels.h"

namespace zeta {
const IsaKernels* avx512vnni_kernels() { return nullptr; }
}  // namespace zeta
