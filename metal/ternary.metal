// Ternary (1.58-bit) matrix products y = x W^T on the packed 2-bit Hugging Face layout.
//
// Weights W (N, K) with entries in {-1, 0, +1} are packed four output rows to a byte:
// w[p, k] (p < P = ceil(N/4)) holds W[p + j*P, k] + 1 in bits 2j..2j+1, j = 0..3; slots
// past N (ragged N) are padding and never written out.
// x (M, K) is int8 (W1.58A8: products accumulate exactly in int32, ACC = int32_t) or a
// float type (W1.58A16: float32 accumulation, ACC = float). The output y (M, N) holds the
// raw sums x W^T in ACC; activation/weight scales and bias are applied by the caller
// (mlx_zeta.kernels.ternary), so the kernels stay scale-convention agnostic.
//
// dims (int32): [M, K, N] at run time, so one pipeline serves every layer shape; only
// ROWS (GEMV) and ACC are template parameters. Bodies index their buffers and never pass
// them to helpers: MLX puts inputs of fewer than 8 elements in the `constant` space.
// The CUDA twins in ternary.cu run the same algorithms with the same parameters.
// ==== header ====
// Ternary weight in slot j (0..3) of a packed byte, as ACC: (code - 1).
template <typename ACC>
METAL_FUNC ACC ternary_at(uint b, uint j) {
  return ACC(int((b >> (2 * j)) & 3u) - 1);
}
// ==== kernel: ternary_gemv ====
// Decode, M <= 8. Template: ROWS (= M, 1..8), ACC (int32_t or float).
// Grid (32, G * ceil(P/G), 1), threadgroup (32, G, 1): each SIMD group owns packed row
// p = thread_position_in_grid.y and yields the four outputs p + j*P; its 32 lanes stride
// over K (coalesced byte reads of w, reads of x shared through the cache), each lane keeps
// ROWS x 4 partial sums in registers, and simd_sum combines the lanes. No threadgroup
// memory, no barrier: a SIMD group past the last packed row leaves at once.
const int K = dims[1];
const int N = dims[2];
const int P = (N + 3) / 4;
const int p = int(thread_position_in_grid.y);
if (p >= P) {
  return;
}
const int lane = int(thread_index_in_simdgroup);
ACC acc[ROWS][4];
for (int m = 0; m < ROWS; ++m) {
  for (int j = 0; j < 4; ++j) {
    acc[m][j] = ACC(0);
  }
}
for (int k = lane; k < K; k += 32) {
  const uint b = uint(w[p * K + k]);
  const ACC w0 = ternary_at<ACC>(b, 0);
  const ACC w1 = ternary_at<ACC>(b, 1);
  const ACC w2 = ternary_at<ACC>(b, 2);
  const ACC w3 = ternary_at<ACC>(b, 3);
  for (int m = 0; m < ROWS; ++m) {
    const ACC xv = ACC(static_cast<float>(x[m * K + k]));
    acc[m][0] += w0 * xv;
    acc[m][1] += w1 * xv;
    acc[m][2] += w2 * xv;
    acc[m][3] += w3 * xv;
  }
}
for (int m = 0; m < ROWS; ++m) {
  for (int j = 0; j < 4; ++j) {
    const ACC s = simd_sum(acc[m][j]);
    const int o = j * P + p;
    if (lane == 0 && o < N) {
      y[m * N + o] = s;
    }
  }
}
// ==== kernel: ternary_gemm ====
// Prefill, M > 8. Template: ACC (int32_t or float).
// Grid (128 * ceil(P/BP), ceil(M/BM), 1), threadgroup (128, 1, 1). Threadgroup (tp, tm)
// computes rows m0 = tm*BM .. m0+BM-1 against packed rows p0 = tp*BP .. p0+BP-1, i.e. the
// BM x (4*BP) outputs {m} x {j*P + p}. Per K tile of BK columns the 128 threads stage
// the x tile (converted to ACC) and the w tile (each byte decoded into its four weights)
// in threadgroup memory, K-major and padded by one so that the staging writes do not
// collide in a bank; after a barrier each thread accumulates a 4 x 4 register tile
// (rows ty*4 + i, outputs j*P + p0 + tx), and a second barrier guards the tiles before
// they are overwritten. Everything out of range (ragged M, N, K) stages as zero.
constexpr int BM = 32;   // rows of x per threadgroup
constexpr int BP = 16;   // packed rows per threadgroup: 4 * BP = 64 outputs
constexpr int BK = 32;   // K columns per tile
constexpr int TM = 4;    // rows per thread
constexpr int NT = 128;  // threads: (BM / TM) x BP
threadgroup ACC xs[BK][BM + 1];
threadgroup ACC ws[BK][4 * BP + 1];
const int M = dims[0];
const int K = dims[1];
const int N = dims[2];
const int P = (N + 3) / 4;
const int tid = int(thread_index_in_threadgroup);
const int tx = tid % BP;
const int ty = tid / BP;
const int m0 = int(threadgroup_position_in_grid.y) * BM;
const int p0 = int(threadgroup_position_in_grid.x) * BP;
ACC acc[TM][4];
for (int i = 0; i < TM; ++i) {
  for (int j = 0; j < 4; ++j) {
    acc[i][j] = ACC(0);
  }
}
const int tiles = (K + BK - 1) / BK;
for (int t = 0; t < tiles; ++t) {
  const int k0 = t * BK;
  for (int e = tid; e < BM * BK; e += NT) {
    const int r = e / BK;
    const int c = e % BK;
    const int gm = m0 + r;
    const int gk = k0 + c;
    xs[c][r] = (gm < M && gk < K) ? ACC(static_cast<float>(x[gm * K + gk])) : ACC(0);
  }
  for (int e = tid; e < BP * BK; e += NT) {
    const int r = e / BK;
    const int c = e % BK;
    const int gp = p0 + r;
    const int gk = k0 + c;
    const uint b = (gp < P && gk < K) ? uint(w[gp * K + gk]) : 0x55u;  // 0x55: four zero weights
    for (int j = 0; j < 4; ++j) {
      ws[c][j * BP + r] = ternary_at<ACC>(b, j);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int kk = 0; kk < BK; ++kk) {
    ACC a[TM];
    for (int i = 0; i < TM; ++i) {
      a[i] = xs[kk][ty * TM + i];
    }
    for (int j = 0; j < 4; ++j) {
      const ACC wv = ws[kk][j * BP + tx];
      for (int i = 0; i < TM; ++i) {
        acc[i][j] += a[i] * wv;
      }
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
const int gp = p0 + tx;
for (int i = 0; i < TM; ++i) {
  const int gm = m0 + ty * TM + i;
  for (int j = 0; j < 4; ++j) {
    const int o = j * P + gp;
    if (gm < M && gp < P && o < N) {
      y[gm * N + o] = acc[i][j];
    }
  }
}
