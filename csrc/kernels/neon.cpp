// ARM64 NEON kernels. Placeholder: not yet written.
#include "kernels.h"

namespace zeta {
const IsaKernels* neon_kernels() { return nullptr; }
}  // namespace zeta
