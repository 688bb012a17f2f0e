#include "mlx_ops.h"

#include <stdexcept>
#include <string>

#include "kernels/run.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

namespace zeta {
namespace {

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument("[mlx_zeta.kernels.cpu] " + what); }

std::string shape_of(const mx::array& a) {
  std::string s = "(";
  for (size_t i = 0; i < a.shape().size(); ++i) s += (i ? ", " : "") + std::to_string(a.shape()[i]);
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// Allocates `out` and schedules `work` on the CPU stream's encoder, holding the inputs alive.
template <typename F>
void dispatch(mx::Stream stream, const std::vector<mx::array>& inputs, mx::array& out, F work) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (const auto& in : inputs) encoder.set_input_array(in);
  encoder.set_output_array(out);
  encoder.dispatch([inputs, out, work]() mutable { work(inputs, out); });
}

class TernaryMatmul : public mx::UnaryPrimitive {
 public:
  TernaryMatmul(mx::Stream s, int n_out) : UnaryPrimitive(s), n_out_(n_out) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const int n_out = n_out_;
    dispatch(stream(), inputs, out, [n_out](const std::vector<mx::array>& in, mx::array& y) {
      const auto& x = in[0];
      const auto& packed = in[1];
      TernaryProblem t{x.data<void>(), packed.data<uint8_t>(), y.data<void>(), x.shape(0), x.shape(1), n_out,
                       packed.shape(0)};
      run_ternary(t, x.dtype() == mx::int8);
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("[mlx_zeta.kernels.cpu] ZetaTernaryMatmul runs on the CPU only");
  }
  const char* name() const override { return "ZetaTernaryMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return n_out_ == static_cast<const TernaryMatmul&>(other).n_out_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {{inputs[0].shape(0), n_out_}};
  }

 private:
  int n_out_;
};

class AffineMatmul : public mx::UnaryPrimitive {
 public:
  AffineMatmul(mx::Stream s, int group_size, int bits) : UnaryPrimitive(s), group_(group_size), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const int group = group_, bits = bits_;
    dispatch(stream(), inputs, out, [group, bits](const std::vector<mx::array>& in, mx::array& y) {
      const auto& x = in[0];
      const auto& sc = in[2];
      ScaleType st = sc.dtype() == mx::float16 ? ScaleType::f16 : sc.dtype() == mx::bfloat16 ? ScaleType::bf16
                                                                                                : ScaleType::f32;
      AffineProblem a{x.data<float>(), in[1].data<uint32_t>(), sc.data<void>(), in[3].data<void>(), st,
                      y.data<float>(), x.shape(0), x.shape(1), in[1].shape(0), bits, group};
      run_affine(a);
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("[mlx_zeta.kernels.cpu] ZetaAffineMatmul runs on the CPU only");
  }
  const char* name() const override { return "ZetaAffineMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const AffineMatmul&>(other);
    return group_ == o.group_ && bits_ == o.bits_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {{inputs[0].shape(0), inputs[1].shape(0)}};
  }

 private:
  int group_, bits_;
};

mx::Stream cpu_stream() { return mx::default_stream(mx::Device::cpu); }

}  // namespace

mx::array ternary_matmul(const mx::array& x, const mx::array& packed, int n_out) {
  if (x.ndim() != 2 || (x.dtype() != mx::int8 && x.dtype() != mx::float32))
    fail("ternary_matmul expects x of shape (M, K), int8 or float32; got " + shape_of(x));
  if (packed.ndim() != 2 || packed.dtype() != mx::uint8 || packed.shape(1) != x.shape(1) ||
      packed.shape(0) != (n_out + 3) / 4 || n_out < 1)
    fail("ternary_matmul expects packed uint8 of shape (ceil(n_out / 4), K) = (" + std::to_string((n_out + 3) / 4) +
         ", " + std::to_string(x.shape(1)) + "), got " + shape_of(packed));
  auto s = cpu_stream();
  auto out_type = x.dtype() == mx::int8 ? mx::int32 : mx::float32;
  return mx::array({x.shape(0), n_out}, out_type, std::make_shared<TernaryMatmul>(s, n_out),
                   {mx::contiguous(x, false, s), mx::contiguous(packed, false, s)});
}

mx::array affine_matmul(const mx::array& x, const mx::array& w, const mx::array& scales, const mx::array& biases,
                        int group_size, int bits) {
  if (bits != 4 && bits != 8) fail("affine_matmul supports bits 4 and 8, got " + std::to_string(bits));
  if (group_size != 32 && group_size != 64 && group_size != 128)
    fail("affine_matmul supports group_size 32, 64 and 128, got " + std::to_string(group_size));
  if (x.ndim() != 2 || x.dtype() != mx::float32) fail("affine_matmul expects float32 x of shape (M, K), got " + shape_of(x));
  const int K = x.shape(1);
  if (w.ndim() != 2 || w.dtype() != mx::uint32 || int64_t(w.shape(1)) * 32 / bits != K || K % group_size)
    fail("affine_matmul expects uint32 w of shape (N, K * bits / 32) with K = " + std::to_string(K) +
         " a multiple of group_size, got " + shape_of(w));
  const mx::Shape groups{w.shape(0), K / group_size};
  for (const auto* a : {&scales, &biases})
    if (a->shape() != groups || !(a->dtype() == mx::float32 || a->dtype() == mx::float16 || a->dtype() == mx::bfloat16) ||
        a->dtype() != scales.dtype())
      fail("affine_matmul expects scales and biases of one float dtype and shape (N, K / group_size), got " +
           shape_of(*a));
  auto s = cpu_stream();
  return mx::array({x.shape(0), w.shape(0)}, mx::float32, std::make_shared<AffineMatmul>(s, group_size, bits),
                   {mx::contiguous(x, false, s), mx::contiguous(w, false, s), mx::contiguous(scales, false, s),
                    mx::contiguous(biases, false, s)});
}

}  // namespace zeta
