// CPU emulation of the GPU dialects our kernel bodies use, so that the exact text shipped in
// metal/*.metal (Metal Shading Language bodies for mx.fast.metal_kernel) and metal/*.cu (CUDA
// bodies for mx.fast.cuda_kernel) compiles with g++ and runs on Linux.
//
// Model: the threadgroups (blocks) of a launch run one after another; the threads of one group
// run concurrently, one OS thread each, so barriers have their real meaning. Threadgroup
// (shared) memory is a function-local `static` array: shared by the threads of the running
// group, which is what the GPU gives. SIMD-group (warp) collectives meet in per-lane slots
// between two barriers of the 32 (or fewer, at a ragged end) lanes.
//
// Only what our kernels use is provided; a body that uses anything else fails to compile,
// which is the intended signal. mlx_zeta.kernels.emulate generates the kernel signature the
// way MLX does and includes this header.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

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

// Runs `body(ctx)` for every thread of a grid of `blocks` groups of `block` threads.
template <typename Body>
void launch(uint3 blocks, uint3 block, uint3 grid_threads, Body body) {
  const uint32_t n = block.x * block.y * block.z;
  for (uint32_t bz = 0; bz < blocks.z; ++bz)
    for (uint32_t by = 0; by < blocks.y; ++by)
      for (uint32_t bx = 0; bx < blocks.x; ++bx) {
        std::barrier<> group(n);
        std::vector<std::unique_ptr<Lanes>> lanes;
        for (uint32_t w = 0; w * 32 < n; ++w) lanes.emplace_back(new Lanes(std::min<uint32_t>(32, n - w * 32)));
        std::vector<std::thread> threads;
        threads.reserve(n);
        for (uint32_t i = 0; i < n; ++i) {
          threads.emplace_back([&, i] {
            Ctx c;
            c.tid = {i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
            c.bid = {bx, by, bz};
            c.block = block;
            c.grid_blocks = blocks;
            c.grid_threads = grid_threads;
            c.gid = {bx * block.x + c.tid.x, by * block.y + c.tid.y, bz * block.z + c.tid.z};
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
}

}  // namespace emu

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
