// CPU emulation of the GPU dialects our kernel bodies use, so that the exact text shipped in
// metal/*.metal (Metal Shading Language bodies for mx.fast.metal_kernel) and metal/*.cu (CUDA
// bodies for mx.fast.cuda_kernel) compiles with g++ and runs on Linux.
//
// Model: the threadgroups (blocks) of a launch run one after another, or several at once in
// worker processes that share device memory (the concurrent mode); the threads of one group
// run concurrently, one OS thread each, so barriers have their real meaning. Threadgroup
// (shared) memory is a function-local `static` array in the section "emu_tg": shared by the
// threads of the running group, private to each worker process, filled with 0xFF bytes before
// every group. SIMD-group (warp) collectives meet in per-lane slots between two barriers of
// the 32 (or fewer, at a ragged end) lanes. Built with AddressSanitizer, every device buffer,
// threadgroup array and thread-local array is bounds-checked; the hook at the end of this file
// names the buffer and element of a faulting access for mlx_zeta.kernels.emulate.
//
// Only what our kernels use is provided; a body that uses anything else fails to compile,
// which is the intended signal. mlx_zeta.kernels.emulate generates the kernel signature the
// way MLX does and includes this header.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <compare>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <limits>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/prctl.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#define EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define EMU_ASAN 1
#endif
#endif
#if defined(EMU_ASAN)
#include <sanitizer/asan_interface.h>
#define EMU_POISON(p, n) __asan_poison_memory_region((p), (n))
#define EMU_UNPOISON(p, n) __asan_unpoison_memory_region((p), (n))
#define EMU_NO_SANITIZE __attribute__((no_sanitize_address))
#else
#define EMU_POISON(p, n) ((void)0)
#define EMU_UNPOISON(p, n) ((void)0)
#define EMU_NO_SANITIZE
#endif

namespace emu {

// ------------------------------------------------------------------ half and bfloat16
using half = _Float16;

struct bfloat16 {
  uint16_t bits = 0;
  bfloat16() = default;
  bfloat16(float f) {  // round to nearest even, as the hardware converts
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) {
      bits = uint16_t((u >> 16) | 0x40);  // quiet NaN
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);
      bits = uint16_t(u >> 16);
    }
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

// ------------------------------------------------------------------ execution context
struct uint3 {
  uint32_t x = 0, y = 0, z = 0;
};

struct Lanes {  // one SIMD group / warp
  explicit Lanes(std::ptrdiff_t n) : count(n), meet(n) {}
  std::ptrdiff_t count;
  std::barrier<> meet;
  alignas(16) unsigned char slots[32][16];
};

struct Ctx {
  uint3 tid, bid, block, grid_blocks, grid_threads, gid;
  uint32_t linear = 0, lane = 0, warp = 0;
  std::barrier<>* group = nullptr;
  Lanes* lanes = nullptr;
};

inline thread_local Ctx* ctx = nullptr;

inline void group_barrier() { ctx->group->arrive_and_wait(); }

// Every lane deposits `v`, reads with `pick(lane) -> source lane`, and leaves after all have read.
template <typename T, typename Pick>
T lane_exchange(T v, Pick pick) {
  static_assert(sizeof(T) <= 16, "lane value too large");
  Lanes& g = *ctx->lanes;
  std::memcpy(g.slots[ctx->lane], &v, sizeof(T));
  g.meet.arrive_and_wait();
  uint32_t src = pick(ctx->lane);
  T out = v;
  if (src < uint32_t(g.count)) std::memcpy(&out, g.slots[src], sizeof(T));
  g.meet.arrive_and_wait();
  return out;
}

template <typename T, typename Op>
T lane_reduce(T v, Op op) {
  Lanes& g = *ctx->lanes;
  std::memcpy(g.slots[ctx->lane], &v, sizeof(T));
  g.meet.arrive_and_wait();
  T acc;
  std::memcpy(&acc, g.slots[0], sizeof(T));
  for (std::ptrdiff_t i = 1; i < g.count; ++i) {
    T x;
    std::memcpy(&x, g.slots[i], sizeof(T));
    acc = op(acc, x);
  }
  g.meet.arrive_and_wait();
  return acc;
}

// Runs `body(ctx)` for every thread of group (bx, by, bz): one OS thread per GPU thread.
template <typename Body>
void run_group(uint3 b, uint3 blocks, uint3 block, uint3 grid_threads, const Body& body) {
  const uint32_t n = block.x * block.y * block.z;
  std::barrier<> group(n);
  std::vector<std::unique_ptr<Lanes>> lanes;
  for (uint32_t w = 0; w * 32 < n; ++w) lanes.emplace_back(new Lanes(std::min<uint32_t>(32, n - w * 32)));
  std::vector<std::thread> threads;
  threads.reserve(n);
  for (uint32_t i = 0; i < n; ++i) {
    threads.emplace_back([&, i] {
      Ctx c;
      c.tid = {i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
      c.bid = b;
      c.block = block;
      c.grid_blocks = blocks;
      c.grid_threads = grid_threads;
      c.gid = {b.x * block.x + c.tid.x, b.y * block.y + c.tid.y, b.z * block.z + c.tid.z};
      c.linear = i;
      c.lane = i % 32;
      c.warp = i / 32;
      c.group = &group;
      c.lanes = lanes[i / 32].get();
      ctx = &c;
      body(c);
    });
  }
  for (auto& t : threads) t.join();
}

// ------------------------------------------------------------------ threadgroup memory
// Every threadgroup (__shared__) array of the kernel is a function-local static placed in the
// ELF section "emu_tg" (the generated kernel is a plain function, not a template: GCC ignores
// section attributes on statics of template instantiations). The launcher fills the section
// with 0xFF bytes before each group (NaN in every float type, -1 in signed integers), so a
// read before the group's own write is exposed, and mlx_zeta.kernels.emulate reads the arrays'
// sizes from the program's symbol table to enforce the device's threadgroup-memory limit.
// Under AddressSanitizer (-fsanitize-sections=emu_tg) each array also gets a redzone.
#if defined(__ELF__)
#define EMU_THREADGROUP __attribute__((section("emu_tg"), aligned(16), used)) static
extern "C" char __start_emu_tg[] __attribute__((weak));
extern "C" char __stop_emu_tg[] __attribute__((weak));
EMU_NO_SANITIZE inline void poison_threadgroup_memory() {
  for (volatile char* p = __start_emu_tg; p < __stop_emu_tg; ++p) *p = char(0xff);
}
inline bool in_threadgroup_memory(const void* a) {
  return __start_emu_tg && a >= (const void*)__start_emu_tg && a < (const void*)__stop_emu_tg;
}
#else  // no named sections: threadgroup memory is neither poisoned nor measured
#define EMU_THREADGROUP static
inline void poison_threadgroup_memory() {}
inline bool in_threadgroup_memory(const void*) { return false; }
#endif

// ------------------------------------------------------------------ device buffers
// Each device buffer lives in one shared mapping (MAP_SHARED: the processes of the concurrent
// mode see the same device memory) with a gap of at least max(256 bytes, its own size) on each
// side; under AddressSanitizer the gaps are poisoned, so every out-of-bounds read or write of a
// buffer is reported, by the hook below, with the buffer's name and the element index.
struct BufferInfo {
  const char* name;
  size_t elem;  // bytes per element
};

struct Buffer {
  unsigned char* data = nullptr;
  size_t bytes = 0, gap = 0;
};

inline const char* kernel_name = "kernel";
inline const BufferInfo* buffer_info = nullptr;
inline std::vector<Buffer> buffers;

inline void place_buffers(const std::vector<size_t>& sizes) {
  auto up = [](size_t v) { return (v + 63) / 64 * 64; };
  size_t total = 0;
  std::vector<size_t> gaps;
  for (size_t s : sizes) gaps.push_back(up(std::max<size_t>(256, s)));
  for (size_t i = 0; i < sizes.size(); ++i) total += gaps[i] + up(sizes[i]);
  total += gaps.empty() ? 64 : gaps.back();
  void* base = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) std::abort();
  EMU_POISON(base, total);
  unsigned char* at = static_cast<unsigned char*>(base);
  for (size_t i = 0; i < sizes.size(); ++i) {
    at += gaps[i];
    buffers.push_back({at, sizes[i], gaps[i]});
    EMU_UNPOISON(at, sizes[i]);
    at += up(sizes[i]);
  }
}

// Prints one line naming the buffer and element of a faulting address (read by emulate.py).
inline void describe_fault(const void* addr, bool write, size_t size) {
  const char* what = write ? "write" : "read";
  const unsigned char* a = static_cast<const unsigned char*>(addr);
  for (size_t i = 0; i < buffers.size(); ++i) {
    const Buffer& b = buffers[i];
    if (a + b.gap >= b.data && a < b.data + b.bytes + b.gap) {
      const long long off = (long long)(a - b.data), size = (long long)buffer_info[i].elem;
      const long long e = off >= 0 ? off / size : -((-off + size - 1) / size);  // floor division
      std::fprintf(stderr, "EMU-FAULT %s %s device %s %lld %zu %zu\n", kernel_name, what, buffer_info[i].name,
                   e, b.bytes / buffer_info[i].elem, size);
      return;
    }
  }
  std::fprintf(stderr, "EMU-FAULT %s %s %s - - - %zu\n", kernel_name, what,
               in_threadgroup_memory(addr) ? "threadgroup" : "other", size);
}

// argv: folder, concurrent group workers (0: one group after another), grid xyz, threadgroup xyz.
// Files 0..n-1 of the folder are the buffers (inputs, then outputs, written back after the run).
template <typename Kernel>
int main(int argc, char** argv, const char* name, const BufferInfo* info, int n, int n_in, Kernel kernel) {
  if (argc != 9) return 2;
  kernel_name = name;
  buffer_info = info;
  const std::string dir = argv[1];
  const int workers = std::atoi(argv[2]);
  uint32_t g[3], t[3];
  for (int i = 0; i < 3; ++i) {
    g[i] = uint32_t(std::atoi(argv[3 + i]));
    t[i] = uint32_t(std::atoi(argv[6 + i]));
  }
  std::vector<std::vector<unsigned char>> raw(n);
  std::vector<size_t> sizes;
  for (int i = 0; i < n; ++i) {
    FILE* f = std::fopen((dir + "/" + std::to_string(i)).c_str(), "rb");
    if (!f) return 3;
    std::fseek(f, 0, SEEK_END);
    raw[i].resize(size_t(std::ftell(f)));
    std::fseek(f, 0, SEEK_SET);
    if (std::fread(raw[i].data(), 1, raw[i].size(), f) != raw[i].size()) return 3;
    std::fclose(f);
    sizes.push_back(raw[i].size());
  }
  place_buffers(sizes);
  std::vector<void*> ptrs(n);
  for (int i = 0; i < n; ++i) {
    std::memcpy(buffers[i].data, raw[i].data(), raw[i].size());
    ptrs[i] = buffers[i].data;
  }
  const uint3 block{t[0], t[1], t[2]}, blocks{g[0] / t[0], g[1] / t[1], g[2] / t[2]}, grid{g[0], g[1], g[2]};
  const uint32_t count = blocks.x * blocks.y * blocks.z;
  auto run = [&](uint32_t id) {
    poison_threadgroup_memory();
    const uint3 b{id % blocks.x, (id / blocks.x) % blocks.y, id / (blocks.x * blocks.y)};
    run_group(b, blocks, block, grid, [&](Ctx& c) { kernel(c, ptrs.data()); });
  };
  if (workers <= 1) {
    for (uint32_t id = 0; id < count; ++id) run(id);
  } else {  // each worker process runs groups count-1-w, count-1-w-workers, ...: concurrently, in reverse
    std::vector<pid_t> pids;
    for (int w = 0; w < workers && uint32_t(w) < count; ++w) {
      const pid_t pid = fork();
      if (pid < 0) return 4;
      if (pid == 0) {
#if defined(__linux__)
        prctl(PR_SET_PDEATHSIG, SIGKILL);
#endif
        for (long long id = (long long)count - 1 - w; id >= 0; id -= workers) run(uint32_t(id));
        std::fflush(stderr);
        _exit(0);
      }
      pids.push_back(pid);
    }
    int failed = 0;
    for (pid_t pid : pids) {
      int status = 0;
      waitpid(pid, &status, 0);
      if (!failed && !(WIFEXITED(status) && WEXITSTATUS(status) == 0))
        failed = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    if (failed) return failed;
  }
  for (int i = n_in; i < n; ++i) {
    FILE* f = std::fopen((dir + "/" + std::to_string(i)).c_str(), "wb");
    if (!f || std::fwrite(buffers[i].data, 1, buffers[i].bytes, f) != buffers[i].bytes) return 5;
    std::fclose(f);
  }
  return 0;
}

}  // namespace emu

#if defined(EMU_ASAN)
// AddressSanitizer calls this before its report: name the buffer and index first.
extern "C" void __asan_on_error() {
  emu::describe_fault(__asan_get_report_address(), __asan_get_report_access_type() != 0,
                      __asan_get_report_access_size());
}
extern "C" const char* __asan_default_options() { return "detect_leaks=0:abort_on_error=0:print_legend=0"; }
#endif

#include "address_spaces.h"

// ================================================================== Metal dialect
#ifdef EMU_METAL
using emu::uint3;
using uint = uint32_t;
using half = emu::half;
using float16_t = emu::half;
using bfloat16_t = emu::bfloat16;

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2 };
inline void threadgroup_barrier(mem_flags) { emu::group_barrier(); }
inline void simdgroup_barrier(mem_flags) { emu::ctx->lanes->meet.arrive_and_wait(); }

template <typename T> T simd_sum(T v) { return emu::lane_reduce(v, [](T a, T b) { return T(a + b); }); }
template <typename T> T simd_max(T v) { return emu::lane_reduce(v, [](T a, T b) { return a > b ? a : b; }); }
template <typename T> T simd_min(T v) { return emu::lane_reduce(v, [](T a, T b) { return a < b ? a : b; }); }
template <typename T> T simd_shuffle_xor(T v, uint m) { return emu::lane_exchange(v, [m](uint l) { return l ^ m; }); }
template <typename T> T simd_shuffle_down(T v, uint d) {
  return emu::lane_exchange(v, [d](uint l) { return l + d < uint(emu::ctx->lanes->count) ? l + d : l; });
}
template <typename T> T simd_broadcast(T v, uint src) { return emu::lane_exchange(v, [src](uint) { return src; }); }

namespace metal {
using std::numeric_limits;
inline float exp(float x) { return std::exp(x); }
inline float exp2(float x) { return std::exp2(x); }
inline float log(float x) { return std::log(x); }
inline float tanh(float x) { return std::tanh(x); }
inline float abs(float x) { return std::fabs(x); }
inline int abs(int x) { return std::abs(x); }
inline float sqrt(float x) { return std::sqrt(x); }
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline bool isinf(float x) { return std::isinf(x); }
template <typename T> T max(T a, T b) { return a > b ? a : b; }
template <typename T> T min(T a, T b) { return a < b ? a : b; }
template <typename T> T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <typename T> T select(T a, T b, bool c) { return c ? b : a; }
namespace fast {
inline float exp(float x) { return std::exp(x); }
inline float exp2(float x) { return std::exp2(x); }
inline float tanh(float x) { return std::tanh(x); }
}  // namespace fast
namespace precise {
inline float exp(float x) { return std::exp(x); }
inline float tanh(float x) { return std::tanh(x); }
}  // namespace precise
}  // namespace metal
#define METAL_FUNC inline
#endif  // EMU_METAL

// ================================================================== CUDA dialect
#ifdef EMU_CUDA
struct dim3 {
  uint32_t x = 1, y = 1, z = 1;
};
inline dim3 to_dim3(emu::uint3 v) { return {v.x, v.y, v.z}; }
#define threadIdx (::to_dim3(emu::ctx->tid))
#define blockIdx (::to_dim3(emu::ctx->bid))
#define blockDim (::to_dim3(emu::ctx->block))
#define gridDim (::to_dim3(emu::ctx->grid_blocks))
#define warpSize 32
inline void __syncthreads() { emu::group_barrier(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::ctx->lanes->meet.arrive_and_wait(); }
template <typename T> T __shfl_xor_sync(unsigned, T v, int m, int = 32) {
  return emu::lane_exchange(v, [m](uint32_t l) { return l ^ uint32_t(m); });
}
template <typename T> T __shfl_down_sync(unsigned, T v, unsigned d, int = 32) {
  return emu::lane_exchange(v, [d](uint32_t l) { return l + d < uint32_t(emu::ctx->lanes->count) ? l + d : l; });
}
template <typename T> T __shfl_sync(unsigned, T v, int src, int = 32) {
  return emu::lane_exchange(v, [src](uint32_t) { return uint32_t(src); });
}
using __half = emu::half;
using __nv_bfloat16 = emu::bfloat16;
inline float __half2float(__half h) { return float(h); }
inline __half __float2half(float f) { return __half(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return float(h); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
// expf, fmaxf, fminf, tanhf, sqrtf, logf: the C library's, global through <cmath>.
#define __device__ inline
#define __forceinline__
#define __restrict__
// Integer min / max (CUDA device built-ins), and cuda::std, which MLX's cuda_kernel preamble
// includes (<cuda/std/limits>, ...): libcu++ mirrors the C++ standard library.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
namespace cuda {
namespace std = ::std;
}
#endif  // EMU_CUDA
