// CUDA twin of attention.metal (mx.fast.cuda_kernel): the same kernels, template parameters, inputs
// and algorithm; SIMD groups are warps, threadgroup memory is __shared__, simd_sum is attn_warp_sum.
//
// Fused scaled-dot-product attention with in-kernel position biases (mlx_zeta.kernels.attention).
//
// q (B, Hq, Lq, D), k and v (B, Hkv, Lk, D), row-contiguous; query head h reads key/value head
// h / (Hq / Hkv) (GQA). Scores are formed, biased and soft-maxed in float32 with the online
// (running max / running sum) softmax; the output (B, Hq, Lq, D) is written in q's dtype T.
//
// With i' = i + Lk - Lq (query i's position on the key axis, bottom-right alignment) the logit of
// query i and key j of head h is
//     s = scale * <q_i, k_j>;  s = cap * tanh(s / cap)             (softcap > 0)
//     s -= slope_h * |j - i'|                                       (ALiBi)
//     s += table[bucket[j - i + Lq - 1], h]                         (T5 relative buckets)
//     s += mask[b, h, i, j]  or  s = -inf where mask[b, h, i, j] == 0   (additive / keep mask)
// and key j is hidden (s = -inf) unless j <= i' (causal) and |i' - j| < window (window > 0).
// A row with no visible key outputs 0.
//
// Run-time arguments travel in two small arrays (so one compiled kernel serves every length):
//   params (int32): see the AttnParam enum; fparams (float32): scale, softcap (0 = none).
// Unused bias inputs are 1-element placeholders. Mask element (b, h, i, j) sits at
// b*msb + h*msh + i*msq + j*msk (a stride is 0 along a broadcast axis).
//
// Kernels: attention_prefill (tiled, one threadgroup per BQ queries of one (b, h)), and for
// Lq <= 8 attention_decode (split over the key axis: per-chunk max, sum and unnormalised output)
// followed by attention_decode_combine.
// ==== header ====
enum AttnParam {
  AP_B, AP_HQ, AP_HKV, AP_LQ, AP_LK, AP_CAUSAL, AP_WINDOW, AP_MASK_MODE, AP_MSB, AP_MSH, AP_MSQ, AP_MSK,
  AP_ALIBI, AP_T5, AP_KBEGIN, AP_CHUNK, AP_NCHUNKS, AP_COUNT
};

// MLX defines no `inf`; its preamble (mlx/backend/cuda/device/utils.cuh) includes <cuda/std/limits>.
#define ATTN_NEG_INF (-cuda::std::numeric_limits<float>::infinity())

struct AttnArgs {
  int b_count, hq, hkv, lq, lk, causal, window, mask_mode, msb, msh, msq, msk, alibi, t5, k_begin, chunk, nchunks;
  float scale, softcap;
};

__device__ AttnArgs attn_args(const int32_t* p, const float* f) {
  AttnArgs a;
  a.b_count = p[AP_B];
  a.hq = p[AP_HQ];
  a.hkv = p[AP_HKV];
  a.lq = p[AP_LQ];
  a.lk = p[AP_LK];
  a.causal = p[AP_CAUSAL];
  a.window = p[AP_WINDOW];
  a.mask_mode = p[AP_MASK_MODE];
  a.msb = p[AP_MSB];
  a.msh = p[AP_MSH];
  a.msq = p[AP_MSQ];
  a.msk = p[AP_MSK];
  a.alibi = p[AP_ALIBI];
  a.t5 = p[AP_T5];
  a.k_begin = p[AP_KBEGIN];
  a.chunk = p[AP_CHUNK];
  a.nchunks = p[AP_NCHUNKS];
  a.scale = f[0];
  a.softcap = f[1];
  return a;
}

// Causal / sliding-window visibility of key j to query i.
__device__ bool attn_visible(AttnArgs a, int i, int j) {
  const int ip = i + a.lk - a.lq;
  return j >= 0 && j < a.lk && (a.causal == 0 || j <= ip) && (a.window == 0 || abs(ip - j) < a.window);
}

// The biased logit of a visible (i, j) from the raw dot product; -inf where the mask hides it.
template <typename M>
__device__ float attn_logit(AttnArgs a, float dot, int b, int h, int i, int j, const float* slopes,
                            const float* t5_table, const int32_t* t5_buckets, const M* mask) {
  float s = dot * a.scale;
  if (a.softcap > 0.0f) {
    s = a.softcap * tanhf(s / a.softcap);
  }
  if (a.alibi != 0) {
    s -= slopes[h] * float(abs(j - (i + a.lk - a.lq)));
  }
  if (a.t5 != 0) {
    s += t5_table[t5_buckets[j - i + a.lq - 1] * a.hq + h];
  }
  if (a.mask_mode != 0) {
    const float mv = float(mask[b * a.msb + h * a.msh + i * a.msq + j * a.msk]);
    if (a.mask_mode == 1) {
      s = mv != 0.0f ? s : ATTN_NEG_INF;
    } else {
      s += mv;
    }
  }
  return s;
}

// Online-softmax factor exp(old - new) that rescales a running sum when the max grows.
__device__ float attn_rescale(float m_old, float m_new) {
  return m_old == ATTN_NEG_INF ? 0.0f : expf(m_old - m_new);
}
// Sum over the 32 lanes of a warp (every lane gets the total).
__device__ float attn_warp_sum(float x) {
  for (int m = 16; m > 0; m >>= 1) {
    x += __shfl_xor_sync(0xffffffffu, x, m);
  }
  return x;
}
// ==== kernel: attention_prefill ====
// Template: T, D, BQ (queries per threadgroup), BK (keys per tile). 128 threads per group,
// TPQ = 128 / BQ of them per query row. Grid (128, ceil(Lq / BQ), B * Hq).
// Per key tile: (1) stage K and V rows in threadgroup memory, (2) every thread scores
// keys x = c, c + TPQ, ... of its row into ss, (3) every thread updates the running
// max / sum of its row and the D / TPQ output elements it owns (d = c + TPQ * e).
constexpr int NT = 128;
constexpr int TPQ = NT / BQ;
constexpr int EPT = D / TPQ;
static_assert(NT % BQ == 0 && D % TPQ == 0, "attention_prefill: BQ must divide 128 and 128 / BQ must divide D");
__shared__ T qs[BQ * D];
__shared__ T ks[BK * D];
__shared__ T vs[BK * D];
__shared__ float ss[BQ * BK];

const AttnArgs a = attn_args(params, fparams);
const int tid = int(threadIdx.x);
const int bh = int(blockIdx.z);
const int b = bh / a.hq;
const int h = bh % a.hq;
const int q0 = int(blockIdx.y) * BQ;
const int row = tid / TPQ;
const int c = tid % TPQ;
const int i = q0 + row;
const T* qb = q + size_t(bh) * a.lq * D;
const size_t kv_off = (size_t(b) * a.hkv + h / (a.hq / a.hkv)) * a.lk * D;
const T* kb = k + kv_off;
const T* vb = v + kv_off;

for (int x = tid; x < BQ * D; x += NT) {
  const int qi = q0 + x / D;
  qs[x] = qi < a.lq ? qb[qi * D + x % D] : T(0.0f);
}

// Keys any query of this block can see: [lo, hi].
const int shift = a.lk - a.lq;
const int last = min(q0 + BQ, a.lq) - 1;
int lo = 0;
int hi = a.lk - 1;
if (a.causal != 0) {
  hi = min(hi, last + shift);
}
if (a.window != 0) {
  lo = max(lo, q0 + shift - a.window + 1);
  hi = min(hi, last + shift + a.window - 1);
}

float m = ATTN_NEG_INF;
float l = 0.0f;
float o[EPT];
for (int e = 0; e < EPT; ++e) {
  o[e] = 0.0f;
}

for (int k0 = lo; k0 <= hi; k0 += BK) {
  for (int x = tid; x < BK * D; x += NT) {
    const int j = k0 + x / D;
    ks[x] = j <= hi ? kb[j * D + x % D] : T(0.0f);
    vs[x] = j <= hi ? vb[j * D + x % D] : T(0.0f);
  }
  __syncthreads();

  for (int x = c; x < BK; x += TPQ) {
    const int j = k0 + x;
    float s = ATTN_NEG_INF;
    if (i < a.lq && j <= hi && attn_visible(a, i, j)) {
      float dot = 0.0f;
      for (int d = 0; d < D; ++d) {
        dot += float(qs[row * D + d]) * float(ks[x * D + d]);
      }
      s = attn_logit(a, dot, b, h, i, j, slopes, t5_table, t5_buckets, mask);
    }
    ss[row * BK + x] = s;
  }
  __syncthreads();

  float m_new = m;
  for (int x = 0; x < BK; ++x) {
    m_new = fmaxf(m_new, ss[row * BK + x]);
  }
  if (m_new != ATTN_NEG_INF) {
    const float alpha = attn_rescale(m, m_new);
    l *= alpha;
    for (int e = 0; e < EPT; ++e) {
      o[e] *= alpha;
    }
    for (int x = 0; x < BK; ++x) {
      const float s = ss[row * BK + x];
      if (s != ATTN_NEG_INF) {
        const float p = expf(s - m_new);
        l += p;
        for (int e = 0; e < EPT; ++e) {
          o[e] += p * float(vs[x * D + c + TPQ * e]);
        }
      }
    }
    m = m_new;
  }
  __syncthreads();
}

if (i < a.lq) {
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  for (int e = 0; e < EPT; ++e) {
    out[(size_t(bh) * a.lq + i) * D + c + TPQ * e] = T(o[e] * inv);
  }
}
// ==== kernel: attention_decode ====
// Template: T, D. For Lq <= 8 queries. Grid (128, nchunks, B * Hq), threadgroup (128, 1, 1):
// four warps share chunk c of the keys [k_begin + c * chunk, ... + chunk); lane t holds
// elements d = t + 32 e of every query and accumulator, warp g takes keys g, g + 4, ...
// and meets its lanes in attn_warp_sum for each score. The four partial states are merged through
// threadgroup memory and written unnormalised: part_m, part_l (B * Hq, nchunks, Lq) and
// part_o (B * Hq, nchunks, Lq, D), all float32.
constexpr int NSG = 4;
constexpr int EPL = (D + 31) / 32;
constexpr int QMAX = 8;
__shared__ float red_m[NSG];
__shared__ float red_l[NSG];
__shared__ float red_o[NSG * D];

const AttnArgs a = attn_args(params, fparams);
const int tid = int(threadIdx.x);
const int lane = int(threadIdx.x % 32);
const int sg = int(threadIdx.x / 32);
const int chunk = int(blockIdx.y);
const int bh = int(blockIdx.z);
const int b = bh / a.hq;
const int h = bh % a.hq;
const size_t kv_off = (size_t(b) * a.hkv + h / (a.hq / a.hkv)) * a.lk * D;
const int j0 = a.k_begin + chunk * a.chunk;
const int j1 = min(j0 + a.chunk, a.lk);

float qv[QMAX][EPL];
float o[QMAX][EPL];
float m[QMAX];
float l[QMAX];
for (int r = 0; r < QMAX; ++r) {
  m[r] = ATTN_NEG_INF;
  l[r] = 0.0f;
  for (int e = 0; e < EPL; ++e) {
    const int d = lane + 32 * e;
    qv[r][e] = r < a.lq && d < D ? float(q[(size_t(bh) * a.lq + r) * D + d]) : 0.0f;
    o[r][e] = 0.0f;
  }
}

for (int j = j0 + sg; j < j1; j += NSG) {
  float kv[EPL];
  float vv[EPL];
  for (int e = 0; e < EPL; ++e) {
    const int d = lane + 32 * e;
    kv[e] = d < D ? float(k[kv_off + size_t(j) * D + d]) : 0.0f;
    vv[e] = d < D ? float(v[kv_off + size_t(j) * D + d]) : 0.0f;
  }
  for (int r = 0; r < a.lq; ++r) {
    if (!attn_visible(a, r, j)) {
      continue;  // uniform across the warp: r and j are
    }
    float part = 0.0f;
    for (int e = 0; e < EPL; ++e) {
      part += qv[r][e] * kv[e];
    }
    const float s = attn_logit(a, attn_warp_sum(part), b, h, r, j, slopes, t5_table, t5_buckets, mask);
    if (s != ATTN_NEG_INF) {
      const float m_new = fmaxf(m[r], s);
      const float alpha = attn_rescale(m[r], m_new);
      const float p = expf(s - m_new);
      l[r] = l[r] * alpha + p;
      for (int e = 0; e < EPL; ++e) {
        o[r][e] = o[r][e] * alpha + p * vv[e];
      }
      m[r] = m_new;
    }
  }
}

for (int r = 0; r < a.lq; ++r) {
  if (lane == 0) {
    red_m[sg] = m[r];
    red_l[sg] = l[r];
  }
  for (int e = 0; e < EPL; ++e) {
    const int d = lane + 32 * e;
    if (d < D) {
      red_o[sg * D + d] = o[r][e];
    }
  }
  __syncthreads();
  float mx = ATTN_NEG_INF;
  for (int g = 0; g < NSG; ++g) {
    mx = fmaxf(mx, red_m[g]);
  }
  const size_t slot = (size_t(bh) * a.nchunks + chunk) * a.lq + r;
  for (int d = tid; d < D; d += NSG * 32) {
    float acc = 0.0f;
    for (int g = 0; g < NSG; ++g) {
      acc += mx == ATTN_NEG_INF ? 0.0f : red_o[g * D + d] * attn_rescale(red_m[g], mx);
    }
    part_o[slot * D + d] = acc;
  }
  if (tid == 0) {
    float sum = 0.0f;
    for (int g = 0; g < NSG; ++g) {
      sum += mx == ATTN_NEG_INF ? 0.0f : red_l[g] * attn_rescale(red_m[g], mx);
    }
    part_m[slot] = mx;
    part_l[slot] = sum;
  }
  __syncthreads();
}
// ==== kernel: attention_decode_combine ====
// Template: T, D. Grid (32 * ceil(D / 32), Lq, B * Hq), threadgroup (32, 1, 1): thread d of
// query row r merges the nchunks partial states of attention_decode into out[b, h, r, d].
const AttnArgs a = attn_args(params, fparams);
const int d = int(blockIdx.x * blockDim.x + threadIdx.x);
const int r = int(blockIdx.y);
const int bh = int(blockIdx.z);
if (d < D) {
  float mx = ATTN_NEG_INF;
  for (int cidx = 0; cidx < a.nchunks; ++cidx) {
    mx = fmaxf(mx, part_m[(size_t(bh) * a.nchunks + cidx) * a.lq + r]);
  }
  float sum = 0.0f;
  float acc = 0.0f;
  if (mx != ATTN_NEG_INF) {
    for (int cidx = 0; cidx < a.nchunks; ++cidx) {
      const size_t slot = (size_t(bh) * a.nchunks + cidx) * a.lq + r;
      const float w = attn_rescale(part_m[slot], mx);
      sum += part_l[slot] * w;
      acc += part_o[slot * D + d] * w;
    }
  }
  out[(size_t(bh) * a.lq + r) * D + d] = T(sum > 0.0f ? acc / sum : 0.0f);
}
