// The Python module mlx_zeta.kernels._cpu (nanobind, in MLX's "mlx" domain so mx.array crosses
// the boundary as itself).
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "kernels/isa.h"
#include "kernels/threads.h"
#include "mlx/version.h"
#include "mlx_ops.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_cpu, m) {
  m.doc() = "Native CPU kernels of mlx-zeta (ternary and MLX-affine matmuls); see mlx_zeta.kernels.cpu.";
  m.def("ternary_matmul", &zeta::ternary_matmul, "x"_a, "packed"_a, "n_out"_a);
  m.def("affine_matmul", &zeta::affine_matmul, "x"_a, "w"_a, "scales"_a, "biases"_a, "group_size"_a, "bits"_a);
  // The MLX this module was compiled against; mlx_zeta.kernels.cpu refuses the module when the
  // running MLX differs (its C++ ABI is not stable across releases).
  m.attr("mlx_version") = std::to_string(MLX_VERSION_MAJOR) + "." + std::to_string(MLX_VERSION_MINOR) + "." +
                          std::to_string(MLX_VERSION_PATCH);
  m.def("supported_isas", &zeta::supported_isas);
  m.def("compiled_isas", &zeta::compiled_isas);
  m.def("isa", &zeta::active_isa);
  m.def("set_isa", &zeta::set_isa, "name"_a);
  m.def("num_threads", &zeta::num_threads);
  m.def("set_num_threads", &zeta::set_num_threads, "n"_a);
}
