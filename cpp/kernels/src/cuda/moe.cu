// CUDA mixture-of-experts (moe.h): routing, then the experts as two grouped GEMMs.
//
//   sort_by_expert    one thread per expert: its (token, slot) pairs in token order -> positions
//   grouped_gemm      grid (column tile, row tile of the expert-sorted rows): a row tile belongs to
//                     one expert (each expert's rows start a new tile), so each block multiplies
//                     its rows by that expert's weight tile; the gate_up GEMM computes the gate and
//                     up columns of the same tile and writes silu(gate) * up (fused epilogue)
//   combine           out[t] = sum over t's slots in slot order of weight * row
//
// Weights are float32/float16/bfloat16, accumulation in float (intermediate rows in float32).
#include <algorithm>

#include "fastllm/kernels/cuda_compat.cuh"
#include "fastllm/kernels/moe.h"

namespace fastllm::kernels {
namespace {

using namespace gpu;

constexpr int kTileM = 32;  // rows of a tile
constexpr int kTileN = 64;  // columns of a tile
constexpr int kTileK = 32;  // depth per shared-memory step
constexpr int kThreads = 256;
constexpr int kMaxExperts = 1024;

int64_t align_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

// Workspace layout (bytes, each part 256-aligned).
struct Layout {
  int64_t starts, tile_starts, sorted_rows, position, act, ys, total;
};

Layout layout(int64_t tokens, int64_t hidden, int64_t inter, int64_t experts, int64_t top_k) {
  Layout l;
  const int64_t rows = tokens * top_k;
  l.starts = 0;
  l.tile_starts = align_up(l.starts + (experts + 1) * 4, 256);
  l.sorted_rows = align_up(l.tile_starts + (experts + 1) * 4, 256);
  l.position = align_up(l.sorted_rows + rows * 4, 256);
  l.act = align_up(l.position + rows * 4, 256);
  l.ys = align_up(l.act + rows * inter * 4, 256);
  l.total = align_up(l.ys + rows * hidden * 4, 256);
  return l;
}

__global__ void route_kernel(MoeRouteParams p) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= p.num_tokens) return;
  const float* x = p.logits + t * p.logits_stride;
  float max = x[0];
  for (int64_t e = 1; e < p.num_experts; ++e) max = fmaxf(max, x[e]);
  float sum = 0.0f;
  for (int64_t e = 0; e < p.num_experts; ++e) sum += expf(x[e] - max);
  const float inv = 1.0f / sum;
  int32_t* ids = p.topk_ids + t * p.top_k;
  float* weights = p.topk_weights + t * p.top_k;
  float chosen = 0.0f;
  for (int64_t j = 0; j < p.top_k; ++j) {
    int64_t best = -1;
    float best_p = 0.0f;
    for (int64_t e = 0; e < p.num_experts; ++e) {
      bool taken = false;
      for (int64_t i = 0; i < j; ++i) taken = taken || ids[i] == e;
      const float prob = expf(x[e] - max) * inv;
      if (!taken && (best < 0 || prob > best_p)) {
        best = e;
        best_p = prob;
      }
    }
    ids[j] = static_cast<int32_t>(best);
    weights[j] = best_p;
    chosen += best_p;
  }
  if (p.renormalize)
    for (int64_t j = 0; j < p.top_k; ++j) weights[j] /= chosen;
}

// Single block: counts per expert, row starts, tile starts, and each pair's row position (stable
// in token order: thread e walks the pairs once and numbers its own).
__global__ void sort_kernel(const int32_t* __restrict__ ids, int64_t pairs, int64_t experts,
                            int32_t* starts, int32_t* tile_starts, int32_t* sorted_rows,
                            int32_t* position) {
  __shared__ int32_t counts[kMaxExperts];
  for (int64_t e = threadIdx.x; e < experts; e += blockDim.x) {
    int32_t c = 0;
    for (int64_t i = 0; i < pairs; ++i) c += ids[i] == e;
    counts[e] = c;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    starts[0] = tile_starts[0] = 0;
    for (int64_t e = 0; e < experts; ++e) {
      starts[e + 1] = starts[e] + counts[e];
      tile_starts[e + 1] = tile_starts[e] + (counts[e] + kTileM - 1) / kTileM;
    }
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < experts; e += blockDim.x) {
    int32_t next = starts[e];
    for (int64_t i = 0; i < pairs; ++i) {
      if (ids[i] != e) continue;
      position[i] = next;
      sorted_rows[next] = static_cast<int32_t>(i);  // pair index: token = i / top_k
      ++next;
    }
  }
}

// The expert of row tile `tile` and the first sorted row it covers; false past the last tile.
__device__ bool find_tile(const int32_t* starts, const int32_t* tile_starts, int64_t experts,
                          int64_t tile, int64_t* expert, int64_t* row0, int64_t* row1) {
  if (tile >= tile_starts[experts]) return false;
  int64_t e = 0;
  while (tile_starts[e + 1] <= tile) ++e;
  *expert = e;
  *row0 = starts[e] + (tile - tile_starts[e]) * kTileM;
  *row1 = min(static_cast<int64_t>(starts[e + 1]), *row0 + kTileM);
  return true;
}

// GATE_UP: rows are tokens (x rows through sorted_rows), weight [E][2I][K]; tile columns j of
// the gate and I + j of up; writes act[row][j] = silu(gate) * up (float).
// DOWN: rows are act rows (float, sorted order), weight [E][N][K]; writes ys[row][n] (float).
template <typename T, bool GATE_UP>
__global__ void __launch_bounds__(kThreads)
    grouped_gemm_kernel(const T* __restrict__ x_tokens, const float* __restrict__ x_rows,
                        const T* __restrict__ weight, float* __restrict__ out,
                        const int32_t* __restrict__ starts, const int32_t* __restrict__ tile_starts,
                        const int32_t* __restrict__ sorted_rows, int64_t experts, int64_t top_k,
                        int64_t n, int64_t k) {
  int64_t expert, row0, row1;
  if (!find_tile(starts, tile_starts, experts, blockIdx.y, &expert, &row0, &row1)) return;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  // GATE_UP: n is the intermediate size; the weight has 2 n rows per expert.
  const int64_t weight_rows = GATE_UP ? 2 * n : n;
  const T* w = weight + expert * weight_rows * k;

  __shared__ float xs[kTileM][kTileK + 1];
  __shared__ float ws[GATE_UP ? 2 : 1][kTileN][kTileK + 1];
  // Each thread owns 2 rows x 4 columns of the 32 x 64 tile (and the same of up).
  const int tr = threadIdx.x / 16;  // 0..15 -> rows tr, tr + 16
  const int tc = threadIdx.x % 16;  // 0..15 -> columns tc + 16 c
  float acc[GATE_UP ? 2 : 1][2][4] = {};

  for (int64_t k0 = 0; k0 < k; k0 += kTileK) {
    for (int i = threadIdx.x; i < kTileM * kTileK; i += kThreads) {
      const int r = i / kTileK, c = i % kTileK;
      const int64_t row = row0 + r, kk = k0 + c;
      float v = 0.0f;
      if (row < row1 && kk < k) {
        if constexpr (GATE_UP) {
          v = to_float(x_tokens[(sorted_rows[row] / top_k) * k + kk]);
        } else {
          v = x_rows[row * k + kk];
        }
      }
      xs[r][c] = v;
    }
    for (int part = 0; part < (GATE_UP ? 2 : 1); ++part) {
      for (int i = threadIdx.x; i < kTileN * kTileK; i += kThreads) {
        const int r = i / kTileK, c = i % kTileK;
        const int64_t col = col0 + r, kk = k0 + c;
        ws[part][r][c] = col < n && kk < k ? to_float(w[(part * n + col) * k + kk]) : 0.0f;
      }
    }
    __syncthreads();
    for (int c = 0; c < kTileK; ++c) {
      const float a0 = xs[tr][c], a1 = xs[tr + 16][c];
      for (int part = 0; part < (GATE_UP ? 2 : 1); ++part) {
        for (int j = 0; j < 4; ++j) {
          const float b = ws[part][tc + 16 * j][c];
          acc[part][0][j] += a0 * b;
          acc[part][1][j] += a1 * b;
        }
      }
    }
    __syncthreads();
  }
  for (int i = 0; i < 2; ++i) {
    const int64_t row = row0 + tr + 16 * i;
    if (row >= row1) continue;
    for (int j = 0; j < 4; ++j) {
      const int64_t col = col0 + tc + 16 * j;
      if (col >= n) continue;
      if constexpr (GATE_UP) {
        const float g = acc[0][i][j];
        out[row * n + col] = g / (1.0f + expf(-g)) * acc[1][i][j];
      } else {
        out[row * n + col] = acc[0][i][j];
      }
    }
  }
}

template <typename T>
__global__ void combine_kernel(T* __restrict__ out, const float* __restrict__ ys,
                               const int32_t* __restrict__ position,
                               const float* __restrict__ weights, int64_t top_k, int64_t hidden) {
  const int64_t t = blockIdx.x;
  for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x) {
    float sum = 0.0f;
    for (int64_t j = 0; j < top_k; ++j)
      sum +=
          weights[t * top_k + j] * ys[static_cast<int64_t>(position[t * top_k + j]) * hidden + c];
    out[t * hidden + c] = from_float<T>(sum);
  }
}

template <typename T>
void run_experts(const MoeExpertsCudaParams& p, cudaStream_t stream) {
  const Layout l = layout(p.num_tokens, p.hidden, p.intermediate, p.num_experts, p.top_k);
  auto* base = static_cast<uint8_t*>(p.workspace);
  auto* starts = reinterpret_cast<int32_t*>(base + l.starts);
  auto* tile_starts = reinterpret_cast<int32_t*>(base + l.tile_starts);
  auto* sorted_rows = reinterpret_cast<int32_t*>(base + l.sorted_rows);
  auto* position = reinterpret_cast<int32_t*>(base + l.position);
  auto* act = reinterpret_cast<float*>(base + l.act);
  auto* ys = reinterpret_cast<float*>(base + l.ys);
  const int64_t pairs = p.num_tokens * p.top_k;
  sort_kernel<<<1, kThreads, 0, stream>>>(p.topk_ids, pairs, p.num_experts, starts, tile_starts,
                                          sorted_rows, position);
  check_launch("moe_experts: sort");
  // Row tiles: at most one partial tile per expert beyond the full ones.
  const auto max_tiles = static_cast<unsigned>((pairs + kTileM - 1) / kTileM + p.num_experts);
  const auto* x = static_cast<const T*>(p.input);
  const dim3 grid_gate(static_cast<unsigned>((p.intermediate + kTileN - 1) / kTileN), max_tiles);
  grouped_gemm_kernel<T, true><<<grid_gate, kThreads, 0, stream>>>(
      x, nullptr, static_cast<const T*>(p.gate_up), act, starts, tile_starts, sorted_rows,
      p.num_experts, p.top_k, p.intermediate, p.hidden);
  check_launch("moe_experts: gate_up");
  const dim3 grid_down(static_cast<unsigned>((p.hidden + kTileN - 1) / kTileN), max_tiles);
  grouped_gemm_kernel<T, false><<<grid_down, kThreads, 0, stream>>>(
      nullptr, act, static_cast<const T*>(p.down), ys, starts, tile_starts, sorted_rows,
      p.num_experts, p.top_k, p.hidden, p.intermediate);
  check_launch("moe_experts: down");
  combine_kernel<T><<<static_cast<unsigned>(p.num_tokens), kThreads, 0, stream>>>(
      static_cast<T*>(p.out), ys, position, p.topk_weights, p.top_k, p.hidden);
  check_launch("moe_experts: combine");
}

}  // namespace

int64_t moe_experts_cuda_workspace_bytes(int64_t num_tokens, int64_t hidden, int64_t intermediate,
                                         int64_t num_experts, int64_t top_k) {
  return layout(num_tokens, hidden, intermediate, num_experts, top_k).total;
}

void moe_route_cuda(const MoeRouteParams& p, void* stream_handle) {
  check_arg(p.num_tokens >= 0 && p.num_experts > 0, "moe_route: bad sizes");
  check_arg(p.top_k >= 1 && p.top_k <= p.num_experts,
            "moe_route: top_k must be in [1, "
            "num_experts]");
  if (p.num_tokens == 0) return;
  auto stream = static_cast<cudaStream_t>(stream_handle);
  route_kernel<<<static_cast<unsigned>((p.num_tokens + 127) / 128), 128, 0, stream>>>(p);
  check_launch("moe_route");
}

void moe_experts_cuda(const MoeExpertsCudaParams& p, void* stream_handle) {
  check_arg(p.num_tokens >= 0 && p.hidden > 0 && p.intermediate > 0 && p.num_experts > 0 &&
                p.num_experts <= kMaxExperts,
            "moe_experts: bad sizes (at most 1024 experts)");
  check_arg(p.top_k >= 1 && p.top_k <= p.num_experts,
            "moe_experts: top_k must be in [1, "
            "num_experts]");
  check_arg(!is_float8(p.dtype), "moe_experts: float8 weights are not supported");
  if (p.num_tokens == 0) return;
  auto stream = static_cast<cudaStream_t>(stream_handle);
  switch (p.dtype) {
    case DType::kFloat32:
      return run_experts<float>(p, stream);
    case DType::kFloat16:
      return run_experts<half_t>(p, stream);
    default:
      return run_experts<bf16_t>(p, stream);
  }
}

}  // namespace fastllm::kernels
