// CUDA batched LoRA in two launches over a [num_tokens][max_rank] float scratch h:
//   shrink: grid (token, group of 8 rank rows), one warp per rank row: h[t][r] = x[t] . A_s[r]
//   expand: grid (token, 256 columns), one thread per column: out[t][j] += scale * h[t] . B_s[j]
// Every thread reads its token's slot, so tokens of one adapter need not be contiguous. Each
// h[t][r] and out[t][j] is computed in a fixed order by one warp or thread, so a token's result
// does not depend on the rest of the batch.
#include "fastllm/kernels/cuda_compat.cuh"
#include "fastllm/kernels/lora.h"

namespace fastllm::kernels {
namespace {

using namespace gpu;

constexpr int kShrinkWarps = 8;  // rank rows per shrink block
constexpr int kExpandThreads = 256;

// The token's slot when it has an adapter the kernels can apply, else -1. Device arrays cannot
// be checked on the host, so a slot or rank out of range leaves the token untouched here.
__device__ __forceinline__ int active_slot(const int32_t* token_slots, int64_t num_slots,
                                           const void* const* lora_a, const int32_t* ranks,
                                           int64_t max_rank, int64_t t) {
  const int slot = token_slots[t];
  if (slot < 0 || slot >= num_slots || lora_a[slot] == nullptr) return -1;
  const int rank = ranks[slot];
  return rank >= 1 && rank <= max_rank ? slot : -1;
}

// Element i of a float32 or float16 weight array.
__device__ __forceinline__ float weight_at(const void* w, int64_t i, bool f16) {
  return f16 ? to_float(static_cast<const half_t*>(w)[i]) : static_cast<const float*>(w)[i];
}

__global__ void lora_shrink_kernel(const float* __restrict__ input, int64_t input_stride, int64_t k,
                                   const int32_t* __restrict__ token_slots, int64_t num_slots,
                                   const void* const* __restrict__ lora_a,
                                   const int32_t* __restrict__ ranks, int64_t max_rank, bool f16,
                                   float* __restrict__ h) {
  const int64_t t = blockIdx.x;
  const int slot = active_slot(token_slots, num_slots, lora_a, ranks, max_rank, t);
  if (slot < 0) return;
  const int lane = threadIdx.x % kWarpSize;
  const int r = blockIdx.y * kShrinkWarps + threadIdx.x / kWarpSize;
  if (r >= ranks[slot]) return;  // the whole warp leaves: warp_sum below needs all 32 lanes
  const float* x = input + t * input_stride;
  const void* a = lora_a[slot];
  const int64_t row = static_cast<int64_t>(r) * k;
  float acc = 0.0f;
  for (int64_t i = lane; i < k; i += kWarpSize) acc = fmaf(x[i], weight_at(a, row + i, f16), acc);
  acc = warp_sum(acc);
  if (lane == 0) h[t * max_rank + r] = acc;
}

__global__ void lora_expand_kernel(float* __restrict__ out, int64_t out_stride, int64_t n,
                                   const int32_t* __restrict__ token_slots, int64_t num_slots,
                                   const void* const* __restrict__ lora_a,
                                   const void* const* __restrict__ lora_b,
                                   const int32_t* __restrict__ ranks,
                                   const float* __restrict__ scales, int64_t max_rank,
                                   bool b_transposed, bool f16, const float* __restrict__ h) {
  extern __shared__ float h_row[];  // the token's rank values, read by every column
  const int64_t t = blockIdx.x;
  const int slot = active_slot(token_slots, num_slots, lora_a, ranks, max_rank, t);
  if (slot < 0) return;  // the same for the whole block, so no thread misses the barrier
  const int rank = ranks[slot];
  for (int r = threadIdx.x; r < rank; r += blockDim.x) h_row[r] = h[t * max_rank + r];
  __syncthreads();
  const int64_t j = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (j >= n) return;
  // B^T [rank][n]: neighbouring threads read neighbouring columns; B [n][rank]: one row each.
  const int64_t first = b_transposed ? j : j * rank;
  const int64_t step = b_transposed ? n : 1;
  float acc = 0.0f;
  for (int r = 0; r < rank; ++r)
    acc = fmaf(h_row[r], weight_at(lora_b[slot], first + r * step, f16), acc);
  float* o = out + t * out_stride + j;
  *o = fmaf(scales[slot], acc, *o);
}

}  // namespace

void lora_cuda(const LoraParams& p, void* stream_handle) {
  check_lora_shapes(p);
  if (p.num_tokens == 0 || p.num_slots == 0) return;
  auto stream = static_cast<cudaStream_t>(stream_handle);
  const int64_t max_rank = lora_max_rank(p);
  const int64_t bytes = lora_workspace_bytes(p.num_tokens, p.max_rank);
  void* scratch = p.workspace;
  if (scratch != nullptr) {
    check_arg(p.workspace_bytes >= bytes,
              "lora: workspace smaller than lora_workspace_bytes(num_tokens, max_rank) = " +
                  std::to_string(bytes));
  } else {
    // Stream-ordered, so it is cheap from the pool and legal while a CUDA graph is captured.
    check_call(cudaMallocAsync(&scratch, static_cast<size_t>(bytes), stream),
               "lora: cudaMallocAsync");
  }
  auto* h = static_cast<float*>(scratch);
  const dim3 shrink_grid(static_cast<unsigned>(p.num_tokens),
                         static_cast<unsigned>((max_rank + kShrinkWarps - 1) / kShrinkWarps));
  lora_shrink_kernel<<<shrink_grid, kShrinkWarps * kWarpSize, 0, stream>>>(
      p.input, p.input_stride, p.in_features, p.token_slots, p.num_slots, p.lora_a, p.ranks,
      max_rank, p.weight_dtype == DType::kFloat16, h);
  cudaError_t error = cudaGetLastError();
  if (error == cudaSuccess) {
    const dim3 expand_grid(
        static_cast<unsigned>(p.num_tokens),
        static_cast<unsigned>((p.out_features + kExpandThreads - 1) / kExpandThreads));
    lora_expand_kernel<<<expand_grid, kExpandThreads, max_rank * sizeof(float), stream>>>(
        p.out, p.out_stride, p.out_features, p.token_slots, p.num_slots, p.lora_a, p.lora_b,
        p.ranks, p.scales, max_rank, p.b_transposed, p.weight_dtype == DType::kFloat16, h);
    error = cudaGetLastError();
  }
  // Freed on the stream after the kernels, also when a launch failed.
  if (p.workspace == nullptr) check_call(cudaFreeAsync(scratch, stream), "lora: cudaFreeAsync");
  check_call(error, "lora");
}

}  // namespace fastllm::kernels
