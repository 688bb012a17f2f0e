// CUDA twins of ternary.metal (bodies for mx.fast.cuda_kernel): the same algorithms, the same
// template parameters (ROWS, ACC), inputs (x, w, dims = [M, K, N]), launch geometry (grid in
// threads, as MLX passes it) and packed layout: w[p, k] holds W[p + j*P, k] + 1 in bits
// 2j..2j+1, P = ceil(N/4). Outputs are the raw sums x W^T in ACC (int32_t for int8 x, exact;
// float otherwise); the caller applies scales and bias. A warp plays the Metal SIMD group,
// __shared__ arrays the threadgroup memory, __syncthreads the threadgroup barrier.
// ==== header ====
// Ternary weight in slot j (0..3) of a packed byte, as ACC: (code - 1).
template <typename ACC>
__device__ __forceinline__ ACC ternary_at(unsigned b, unsigned j) {
  return ACC(int((b >> (2 * j)) & 3u) - 1);
}
// ==== kernel: ternary_gemv ====
// Decode, M <= 8. Grid (32, G * ceil(P/G), 1), block (32, G, 1): warp threadIdx.y of block
// blockIdx.y owns packed row p and its four outputs p + j*P; lanes stride over K, each with
// ROWS x 4 register sums, combined by a butterfly of __shfl_xor_sync.
const int K = dims[1];
const int N = dims[2];
const int P = (N + 3) / 4;
const int p = int(blockIdx.y * blockDim.y + threadIdx.y);
if (p >= P) {
  return;
}
const int lane = int(threadIdx.x);
ACC acc[ROWS][4];
for (int m = 0; m < ROWS; ++m) {
  for (int j = 0; j < 4; ++j) {
    acc[m][j] = ACC(0);
  }
}
for (int k = lane; k < K; k += 32) {
  const unsigned b = unsigned(w[p * K + k]);
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
    ACC s = acc[m][j];
    for (int d = 16; d > 0; d /= 2) {
      s += __shfl_xor_sync(0xffffffffu, s, d);
    }
    const int o = j * P + p;
    if (lane == 0 && o < N) {
      y[m * N + o] = s;
    }
  }
}
// ==== kernel: ternary_gemm ====
// Prefill, M > 8. Grid (128 * ceil(P/BP), ceil(M/BM), 1), block (128, 1, 1): block
// (blockIdx.x, blockIdx.y) computes rows m0 .. m0+BM-1 against packed rows p0 .. p0+BP-1;
// per K tile the block stages x (as ACC) and the decoded weights in shared memory, K-major
// and padded by one, then each thread accumulates a TM x 4 register tile. Out-of-range
// elements (ragged M, N, K) stage as zero.
constexpr int BM = 32;   // rows of x per block
constexpr int BP = 16;   // packed rows per block: 4 * BP = 64 outputs
constexpr int BK = 32;   // K columns per tile
constexpr int TM = 4;    // rows per thread
constexpr int NT = 128;  // threads: (BM / TM) x BP
__shared__ ACC xs[BK][BM + 1];
__shared__ ACC ws[BK][4 * BP + 1];
const int M = dims[0];
const int K = dims[1];
const int N = dims[2];
const int P = (N + 3) / 4;
const int tid = int(threadIdx.x);
const int tx = tid % BP;
const int ty = tid / BP;
const int m0 = int(blockIdx.y) * BM;
const int p0 = int(blockIdx.x) * BP;
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
    const unsigned b = (gp < P && gk < K) ? unsigned(w[gp * K + gk]) : 0x55u;  // 0x55: four zero weights
    for (int j = 0; j < 4; ++j) {
      ws[c][j * BP + r] = ternary_at<ACC>(b, j);
    }
  }
  __syncthreads();
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
  __syncthreads();
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
