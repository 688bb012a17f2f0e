#include "isa.h"

#include <cstdlib>
#include <mutex>
#include <stdexcept>

#if defined(__linux__) && defined(__aarch64__)
#include <sys/auxv.h>
#endif
#if defined(__APPLE__)
#include <sys/sysctl.h>
#endif

namespace zeta {
namespace {

bool x86_has(const char* what) {
#if defined(ZETA_SIMDE)
  // Test-driver builds only (tests/test_cpu_kernels_simde.py passes -DZETA_SIMDE; the extension
  // never does): the AVX-512 files are then compiled against SIMDe's portable emulation, so they
  // run on any x86-64 CPU and are reported usable here.
  if (std::string(what) == "avx512" || std::string(what) == "avx512vnni") return true;
#endif
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  std::string w = what;
  if (w == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (w == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
  if (w == "avx512vnni") return x86_has("avx512") && __builtin_cpu_supports("avx512vnni");
#endif
  (void)what;
  return false;
}

bool arm_has_dotprod() {
#if defined(__aarch64__) && defined(__linux__)
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
  return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__aarch64__) && defined(__APPLE__)
  int value = 0;
  size_t size = sizeof(value);
  return sysctlbyname("hw.optional.arm.FEAT_DotProd", &value, &size, nullptr, 0) == 0 && value != 0;
#else
  return false;
#endif
}

struct Entry {
  const char* name;
  const IsaKernels* (*table)();
  bool (*cpu_has)();
};

const Entry kEntries[] = {
    {"avx512vnni", avx512vnni_kernels, [] { return x86_has("avx512vnni"); }},
    {"avx512", avx512_kernels, [] { return x86_has("avx512"); }},
    {"avx2", avx2_kernels, [] { return x86_has("avx2"); }},
    {"neon-dotprod", neon_dotprod_kernels, [] { return arm_has_dotprod(); }},
#if defined(__aarch64__)
    {"neon", neon_kernels, [] { return true; }},
#else
    {"neon", neon_kernels, [] { return false; }},
#endif
    {"scalar", scalar_kernels, [] { return true; }},
};

std::mutex g_mutex;
IsaKernels g_active{};  // the forced or best table, null entries filled from the scalar one
std::string g_name;

void install(const Entry& e) {
  const IsaKernels* t = e.table();
  const IsaKernels* s = scalar_kernels();
  g_active = {e.name, t->ternary_i8 ? t->ternary_i8 : s->ternary_i8,
              t->ternary_f32 ? t->ternary_f32 : s->ternary_f32, t->affine_f32 ? t->affine_f32 : s->affine_f32};
  g_name = e.name;
}

void set_isa_locked(const std::string& name) {
  for (const Entry& e : kEntries) {
    bool usable = e.table() != nullptr && e.cpu_has();
    if ((name == "auto" && usable) || name == e.name) {
      if (!usable) break;
      install(e);
      return;
    }
  }
  std::string have;
  for (const std::string& s : supported_isas()) have += (have.empty() ? "" : ", ") + s;
  throw std::invalid_argument("[mlx_zeta.kernels] CPU ISA '" + name + "' is not available on this machine (built: " +
                              [] { std::string c; for (auto& s : compiled_isas()) c += (c.empty() ? "" : ", ") + s; return c; }() +
                              "; usable here: auto, " + have + ")");
}

void ensure_initialised() {
  if (!g_name.empty()) return;
  const char* env = std::getenv("MLX_ZETA_CPU_ISA");
  set_isa_locked(env && *env ? env : "auto");
}

}  // namespace

std::vector<std::string> compiled_isas() {
  std::vector<std::string> out;
  for (const Entry& e : kEntries)
    if (e.table() != nullptr) out.push_back(e.name);
  return out;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const Entry& e : kEntries)
    if (e.table() != nullptr && e.cpu_has()) out.push_back(e.name);
  return out;
}

const IsaKernels& active_kernels() {
  std::lock_guard<std::mutex> lock(g_mutex);
  ensure_initialised();
  return g_active;
}

std::string active_isa() {
  std::lock_guard<std::mutex> lock(g_mutex);
  ensure_initialised();
  return g_name;
}

void set_isa(const std::string& name) {
  std::lock_guard<std::mutex> lock(g_mutex);
  set_isa_locked(name);
}

}  // namespace zeta
