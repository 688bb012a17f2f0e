// ARM64 NEON dot-product (FEAT_DotProd) kernels. Placeholder: not yet written.
#include "kernels.h"

namespace zeta {
const IsaKernels* neon_dotprod_kernels() { return nullptr; }
}  // namespace zeta
