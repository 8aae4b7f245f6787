// CUDA paged attention (varlen: prefill, chunked prefill and decode in one launch).
//
// Grid (query token, query head, partition); 4 warps per thread block. The block loads its scaled
// query row into shared memory; each warp walks 32 keys at a time: lane i scores key i (a full dot
// product from 16-byte loads of its K row, query broadcast from shared memory), the warp updates
// its online softmax, then accumulates the 32 V rows with each lane owning head dimensions
// lane, lane + 32, ... (coalesced V reads). The four warps merge in shared memory. Long contexts
// are split into partitions of kPartitionTokens keys when the caller gives a workspace; a second
// kernel merges the partitions by their (max, sum) pairs.
//
// Known limit: prefill reads K/V once per query token (through L2); a tiled prefill kernel that
// shares K/V tiles across query rows is the next step for long prompts.
#include <algorithm>
#include <cstdint>
#include <string>

#include "fastllm/kernels/attention.h"
#include "fastllm/kernels/cuda_compat.cuh"

namespace fastllm::kernels {
namespace {

using namespace gpu;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int64_t kPartitionTokens = 512;  // must match paged_attention_workspace_bytes

struct DeviceParams {
  const int32_t* query_start_loc;
  const int32_t* context_lens;
  const int32_t* block_tables;
  int64_t num_seqs, num_heads, num_kv_heads, block_size, max_blocks_per_seq;
  int64_t query_token_stride, out_token_stride;
  float scale, softcap, k_scale, v_scale;
  int32_t sliding_window;
  int32_t num_partitions;
};

__device__ __forceinline__ int64_t find_sequence(const int32_t* query_start_loc, int64_t num_seqs,
                                                 int64_t token) {
  // Largest s with query_start_loc[s] <= token (sequences with no rows are skipped over).
  int64_t lo = 0, hi = num_seqs - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (query_start_loc[mid] <= token) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

template <typename QT, typename CT, int HEAD_SIZE>
__global__ void __launch_bounds__(kThreads)
    paged_attention_kernel(QT* __restrict__ out, const QT* __restrict__ query,
                           const CT* __restrict__ key_cache, const CT* __restrict__ value_cache,
                           DeviceParams p, float* __restrict__ part_out,
                           float* __restrict__ part_stats) {
  constexpr int kAcc = (HEAD_SIZE + kWarpSize - 1) / kWarpSize;
  constexpr int kChunk = Chunk<CT>::kElems;
  constexpr int kChunks = HEAD_SIZE / kChunk;
  static_assert(HEAD_SIZE % kChunk == 0, "head row must be whole 16-byte words");

  __shared__ float q_shared[HEAD_SIZE];
  __shared__ float warp_max_shared[kWarps];
  __shared__ float warp_sum_shared[kWarps];
  __shared__ float warp_acc_shared[kWarps][HEAD_SIZE];

  const int64_t token = blockIdx.x;
  const int64_t head = blockIdx.y;
  const int partition = blockIdx.z;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;

  const int64_t seq = find_sequence(p.query_start_loc, p.num_seqs, token);
  const int64_t begin = p.query_start_loc[seq];
  const int64_t query_len = p.query_start_loc[seq + 1] - begin;
  const int64_t pos = p.context_lens[seq] - query_len + (token - begin);
  const int64_t first = p.sliding_window > 0 ? max(int64_t(0), pos - p.sliding_window + 1) : 0;
  const int64_t start = first + partition * kPartitionTokens;
  const int64_t end = partition == p.num_partitions - 1
                          ? pos + 1
                          : min(pos + 1, first + (partition + 1) * kPartitionTokens);
  const int64_t kv_head = head / (p.num_heads / p.num_kv_heads);
  const int64_t kv_row = p.num_kv_heads * HEAD_SIZE;
  const int32_t* table = p.block_tables + seq * p.max_blocks_per_seq;

  for (int d = threadIdx.x; d < HEAD_SIZE; d += kThreads)
    q_shared[d] = to_float(query[token * p.query_token_stride + head * HEAD_SIZE + d]) * p.scale;
  __syncthreads();

  float m = -INFINITY, l = 0.0f;
  float acc[kAcc];
#pragma unroll
  for (int i = 0; i < kAcc; ++i) acc[i] = 0.0f;

  for (int64_t base = start + warp * kWarpSize; base < end; base += kWarps * kWarpSize) {
    const int64_t j = base + lane;
    const bool valid = j < end;
    int64_t slot = 0;
    float s = -INFINITY;
    if (valid) {
      slot = static_cast<int64_t>(table[j / p.block_size]) * p.block_size + j % p.block_size;
      const uint4* k =
          reinterpret_cast<const uint4*>(key_cache + slot * kv_row + kv_head * HEAD_SIZE);
      float dot = 0.0f;
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        float kf[kChunk];
        chunk_to_float(k[c], kf, CT{});
#pragma unroll
        for (int e = 0; e < kChunk; ++e) dot += kf[e] * q_shared[c * kChunk + e];
      }
      s = dot * p.k_scale;
      if (p.softcap > 0.0f) s = p.softcap * tanhf(s / p.softcap);
    }
    const float m_new = fmaxf(m, warp_max(s));
    const float correction = __expf(m - m_new);  // 0 on the first chunk (m = -inf)
    const float weight = valid ? __expf(s - m_new) : 0.0f;
    l = l * correction + warp_sum(weight);
#pragma unroll
    for (int i = 0; i < kAcc; ++i) acc[i] *= correction;
    m = m_new;
    const int count = static_cast<int>(min(int64_t(kWarpSize), end - base));
    for (int k = 0; k < count; ++k) {
      const float w = shfl(weight, k);
      const int64_t key_slot = shfl(slot, k);
      const CT* v = value_cache + key_slot * kv_row + kv_head * HEAD_SIZE;
#pragma unroll
      for (int i = 0; i < kAcc; ++i) {
        const int d = lane + i * kWarpSize;
        if (d < HEAD_SIZE) acc[i] += w * to_float(v[d]);
      }
    }
  }

  // Merge the warps.
  if (lane == 0) {
    warp_max_shared[warp] = m;
    warp_sum_shared[warp] = l;
  }
#pragma unroll
  for (int i = 0; i < kAcc; ++i) {
    const int d = lane + i * kWarpSize;
    if (d < HEAD_SIZE) warp_acc_shared[warp][d] = acc[i];
  }
  __syncthreads();
  float block_m = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) block_m = fmaxf(block_m, warp_max_shared[w]);
  float factors[kWarps];
  float block_l = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    factors[w] = block_m == -INFINITY ? 0.0f : __expf(warp_max_shared[w] - block_m);
    block_l += warp_sum_shared[w] * factors[w];
  }
  const float inv_l = block_l > 0.0f ? p.v_scale / block_l : 0.0f;
  const int64_t row = token * p.num_heads + head;
  for (int d = threadIdx.x; d < HEAD_SIZE; d += kThreads) {
    float value = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) value += warp_acc_shared[w][d] * factors[w];
    value *= inv_l;
    if (p.num_partitions == 1) {
      out[token * p.out_token_stride + head * HEAD_SIZE + d] = from_float<QT>(value);
    } else {
      part_out[(row * p.num_partitions + partition) * HEAD_SIZE + d] = value;
    }
  }
  if (p.num_partitions > 1 && threadIdx.x == 0) {
    part_stats[(row * p.num_partitions + partition) * 2] = block_m;
    part_stats[(row * p.num_partitions + partition) * 2 + 1] = block_l;
  }
}

// Grid (token, head): merges the normalised partition outputs weighted by l_p * exp(m_p - M).
template <typename QT>
__global__ void __launch_bounds__(kThreads)
    merge_partitions_kernel(QT* __restrict__ out, const float* __restrict__ part_out,
                            const float* __restrict__ part_stats, int64_t num_heads,
                            int64_t head_size, int64_t out_token_stride, int num_partitions) {
  const int64_t token = blockIdx.x;
  const int64_t head = blockIdx.y;
  const int64_t row = token * num_heads + head;
  const float* stats = part_stats + row * num_partitions * 2;
  float global_m = -INFINITY;
  for (int q = 0; q < num_partitions; ++q) global_m = fmaxf(global_m, stats[2 * q]);
  float total = 0.0f;
  for (int q = 0; q < num_partitions; ++q)
    if (stats[2 * q + 1] > 0.0f) total += stats[2 * q + 1] * __expf(stats[2 * q] - global_m);
  const float inv_total = total > 0.0f ? 1.0f / total : 0.0f;
  for (int64_t d = threadIdx.x; d < head_size; d += blockDim.x) {
    float value = 0.0f;
    for (int q = 0; q < num_partitions; ++q) {
      const float l = stats[2 * q + 1];
      if (l > 0.0f)
        value += part_out[(row * num_partitions + q) * head_size + d] * l *
                 __expf(stats[2 * q] - global_m);
    }
    out[token * out_token_stride + head * head_size + d] = from_float<QT>(value * inv_total);
  }
}

template <typename QT, typename CT, int HEAD_SIZE>
void launch(const PagedAttentionParams& p, const DeviceParams& dp, cudaStream_t stream) {
  float* part_out = nullptr;
  float* part_stats = nullptr;
  if (dp.num_partitions > 1) {
    part_out = static_cast<float*>(p.workspace);
    part_stats = part_out + p.num_tokens * p.num_heads * dp.num_partitions * HEAD_SIZE;
  }
  const dim3 grid(static_cast<unsigned>(p.num_tokens), static_cast<unsigned>(p.num_heads),
                  static_cast<unsigned>(dp.num_partitions));
  paged_attention_kernel<QT, CT, HEAD_SIZE><<<grid, kThreads, 0, stream>>>(
      static_cast<QT*>(p.out), static_cast<const QT*>(p.query), static_cast<const CT*>(p.key_cache),
      static_cast<const CT*>(p.value_cache), dp, part_out, part_stats);
  check_launch("paged_attention");
  if (dp.num_partitions > 1) {
    const dim3 merge_grid(static_cast<unsigned>(p.num_tokens), static_cast<unsigned>(p.num_heads));
    merge_partitions_kernel<QT><<<merge_grid, kThreads, 0, stream>>>(
        static_cast<QT*>(p.out), part_out, part_stats, p.num_heads, HEAD_SIZE, p.out_token_stride,
        dp.num_partitions);
    check_launch("paged_attention (merge)");
  }
}

template <typename QT, typename CT>
void dispatch_head_size(const PagedAttentionParams& p, const DeviceParams& dp, cudaStream_t s) {
  switch (p.head_size) {
    case 64:
      return launch<QT, CT, 64>(p, dp, s);
    case 80:
      return launch<QT, CT, 80>(p, dp, s);
    case 96:
      return launch<QT, CT, 96>(p, dp, s);
    case 128:
      return launch<QT, CT, 128>(p, dp, s);
    default:
      return launch<QT, CT, 256>(p, dp, s);
  }
}

template <typename QT>
void dispatch_cache(const PagedAttentionParams& p, const DeviceParams& dp, cudaStream_t s) {
  if (p.cache_dtype == DType::kFloat8E4M3) {
    dispatch_head_size<QT, fp8_t>(p, dp, s);
  } else if (p.cache_dtype == DType::kFloat8E5M2) {
    dispatch_head_size<QT, fp8e5m2_t>(p, dp, s);
  } else {
    check_arg(p.cache_dtype == p.dtype,
              "paged_attention (CUDA): the cache dtype must equal the query dtype or be float8");
    dispatch_head_size<QT, QT>(p, dp, s);
  }
}

}  // namespace

void paged_attention_cuda(const PagedAttentionParams& p, void* stream_handle) {
  check_paged_attention_params(p);
  if (p.num_tokens == 0 || p.num_seqs == 0) return;
  check_arg(reinterpret_cast<uintptr_t>(p.key_cache) % 16 == 0 &&
                reinterpret_cast<uintptr_t>(p.value_cache) % 16 == 0,
            "paged_attention: caches must be 16-byte aligned");
  check_arg(p.num_heads <= 65535, "paged_attention (CUDA): at most 65535 query heads");
  DeviceParams dp;
  dp.query_start_loc = p.query_start_loc;
  dp.context_lens = p.context_lens;
  dp.block_tables = p.block_tables;
  dp.num_seqs = p.num_seqs;
  dp.num_heads = p.num_heads;
  dp.num_kv_heads = p.num_kv_heads;
  dp.block_size = p.block_size;
  dp.max_blocks_per_seq = p.max_blocks_per_seq;
  dp.query_token_stride = p.query_token_stride;
  dp.out_token_stride = p.out_token_stride;
  dp.scale = p.scale;
  dp.softcap = p.softcap;
  dp.k_scale = p.k_scale;
  dp.v_scale = p.v_scale;
  dp.sliding_window = p.sliding_window;
  // Split long contexts only when the grid is small and the caller gave enough workspace.
  int64_t span = p.max_context_len;
  if (p.sliding_window > 0) span = std::min<int64_t>(span, p.sliding_window);
  int64_t partitions = (span + kPartitionTokens - 1) / kPartitionTokens;
  if (partitions <= 1 || p.num_tokens * p.num_heads >= 2048 || p.workspace == nullptr ||
      p.workspace_bytes <
          paged_attention_workspace_bytes(p.num_tokens, p.num_heads, p.head_size, span))
    partitions = 1;
  dp.num_partitions = static_cast<int32_t>(std::min<int64_t>(partitions, 65535));
  auto stream = static_cast<cudaStream_t>(stream_handle);
  switch (p.dtype) {
    case DType::kFloat32:
      return dispatch_cache<float>(p, dp, stream);
    case DType::kFloat16:
      return dispatch_cache<half_t>(p, dp, stream);
    default:
      return dispatch_cache<bf16_t>(p, dp, stream);
  }
}

}  // namespace fastllm::kernels
