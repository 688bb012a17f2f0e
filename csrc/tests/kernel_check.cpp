// A driver that runs one kernel on raw arrays read from files, with no MLX and no Python, so the
// same kernels can be executed natively, and under qemu-user when cross-compiled for aarch64
// (tests/test_cpu_kernels_isa.py writes the inputs and compares the output with numpy).
//
//   kernel_check isas
//   kernel_check ternary_i8|ternary_f32 ISA THREADS M K N x.bin packed.bin y.bin
//   kernel_check affine ISA THREADS M K N BITS GROUP SCALE_TYPE x.bin w.bin scales.bin biases.bin y.bin
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include "../kernels/isa.h"
#include "../kernels/run.h"
#include "../kernels/threads.h"

namespace {

std::vector<char> read_file(const char* path, size_t expect) {
  std::ifstream f(path, std::ios::binary);
  std::vector<char> data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (!f.good() && !f.eof()) throw std::runtime_error(std::string("cannot read ") + path);
  if (data.size() != expect)
    throw std::runtime_error(std::string(path) + ": expected " + std::to_string(expect) + " bytes, got " +
                             std::to_string(data.size()));
  return data;
}

void write_file(const char* path, const void* data, size_t bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(static_cast<const char*>(data), std::streamsize(bytes));
  if (!f) throw std::runtime_error(std::string("cannot write ") + path);
}

int run(int argc, char** argv) {
  std::string kind = argc > 1 ? argv[1] : "";
  if (kind == "isas") {
    for (const auto& s : zeta::supported_isas()) std::cout << s << "\n";
    return 0;
  }
  if (argc < 7) throw std::invalid_argument("usage: see the header of kernel_check.cpp");
  zeta::set_isa(argv[2]);
  zeta::set_num_threads(std::atoi(argv[3]));
  const int64_t M = std::atoll(argv[4]), K = std::atoll(argv[5]), N = std::atoll(argv[6]);
  if ((kind == "ternary_i8" || kind == "ternary_f32") && argc == 10) {
    const bool i8 = kind == "ternary_i8";
    const int64_t P = (N + 3) / 4;
    auto x = read_file(argv[7], size_t(M * K) * (i8 ? 1 : 4));
    auto packed = read_file(argv[8], size_t(P * K));
    std::vector<char> y(size_t(M * N) * 4);
    zeta::TernaryProblem t{x.data(), reinterpret_cast<const uint8_t*>(packed.data()), y.data(), M, K, N, P};
    zeta::run_ternary(t, i8);
    write_file(argv[9], y.data(), y.size());
    return 0;
  }
  if (kind == "affine" && argc == 15) {
    const int bits = std::atoi(argv[7]), group = std::atoi(argv[8]), stype = std::atoi(argv[9]);
    const size_t sbytes = stype == 0 ? 4 : 2, groups = size_t(N * K / group);
    auto x = read_file(argv[10], size_t(M * K) * 4);
    auto w = read_file(argv[11], size_t(N * K * bits / 8));
    auto scales = read_file(argv[12], groups * sbytes);
    auto biases = read_file(argv[13], groups * sbytes);
    std::vector<float> y(size_t(M * N));
    zeta::AffineProblem a{reinterpret_cast<const float*>(x.data()), reinterpret_cast<const uint32_t*>(w.data()),
                          scales.data(), biases.data(), zeta::ScaleType(stype), y.data(), M, K, N, bits, group};
    zeta::run_affine(a);
    write_file(argv[14], y.data(), y.size() * 4);
    return 0;
  }
  throw std::invalid_argument("unknown command or wrong argument count: " + kind);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "kernel_check: " << e.what() << "\n";
    return 2;
  }
}
