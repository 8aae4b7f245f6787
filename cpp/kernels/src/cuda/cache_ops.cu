// CUDA cache maintenance: reshape_and_cache, copy_blocks, swap_blocks.
#include <string>

#include "fastllm/kernels/cache_ops.h"
#include "fastllm/kernels/cuda_compat.cuh"

namespace fastllm::kernels {
namespace {

using namespace gpu;

// One thread block per token; threads stride over the token's num_kv_heads * head_size elements.
template <typename ST, typename CT>
__global__ void reshape_and_cache_kernel(const ST* __restrict__ key, const ST* __restrict__ value,
                                         CT* __restrict__ key_cache, CT* __restrict__ value_cache,
                                         const int64_t* __restrict__ slot_mapping, int64_t row,
                                         int64_t key_stride, int64_t value_stride,
                                         int64_t num_slots, float k_scale, float v_scale) {
  const int64_t token = blockIdx.x;
  const int64_t slot = slot_mapping[token];
  if (slot < 0 || slot >= num_slots) return;
  const ST* k = key + token * key_stride;
  const ST* v = value + token * value_stride;
  CT* kc = key_cache + slot * row;
  CT* vc = value_cache + slot * row;
  for (int64_t i = threadIdx.x; i < row; i += blockDim.x) {
    // Divide (not multiply by the reciprocal) so the rounding equals torch's x / scale.
    kc[i] = from_float<CT>(to_float(k[i]) / k_scale);
    vc[i] = from_float<CT>(to_float(v[i]) / v_scale);
  }
}

template <typename ST, typename CT>
void launch_reshape_and_cache(const ReshapeAndCacheParams& p, cudaStream_t stream) {
  const int64_t row = p.num_kv_heads * p.head_size;
  const int threads = row >= 256 ? 256 : 128;
  const bool fp8 = is_float8(p.cache_dtype);
  reshape_and_cache_kernel<ST, CT><<<static_cast<unsigned>(p.num_tokens), threads, 0, stream>>>(
      static_cast<const ST*>(p.key), static_cast<const ST*>(p.value), static_cast<CT*>(p.key_cache),
      static_cast<CT*>(p.value_cache), p.slot_mapping, row, p.key_token_stride,
      p.value_token_stride, p.num_blocks * p.block_size, fp8 ? p.k_scale : 1.0f,
      fp8 ? p.v_scale : 1.0f);
  check_launch("reshape_and_cache");
}

template <typename ST>
void dispatch_cache_dtype(const ReshapeAndCacheParams& p, cudaStream_t stream) {
  if (p.cache_dtype == DType::kFloat8E4M3) {
    launch_reshape_and_cache<ST, fp8_t>(p, stream);
  } else if (p.cache_dtype == DType::kFloat8E5M2) {
    launch_reshape_and_cache<ST, fp8e5m2_t>(p, stream);
  } else {
    launch_reshape_and_cache<ST, ST>(p, stream);
  }
}

// One thread block per pair; threads stride over the block's 16-byte words.
__global__ void copy_blocks_kernel(int4* cache, int64_t words_per_block, const int32_t* src_dst) {
  const int32_t src = src_dst[2 * blockIdx.x];
  const int32_t dst = src_dst[2 * blockIdx.x + 1];
  const int4* from = cache + src * words_per_block;
  int4* to = cache + dst * words_per_block;
  for (int64_t i = threadIdx.x; i < words_per_block; i += blockDim.x) to[i] = from[i];
}

}  // namespace

void reshape_and_cache_cuda(const ReshapeAndCacheParams& p, void* stream_handle) {
  check_arg(p.num_tokens >= 0 && p.num_kv_heads > 0 && p.head_size > 0 && p.block_size > 0,
            "reshape_and_cache: bad sizes");
  check_arg(p.cache_dtype == p.dtype || is_float8(p.cache_dtype),
            "reshape_and_cache: cache dtype must equal the source dtype or be float8");
  check_arg(p.k_scale > 0.0f && p.v_scale > 0.0f, "reshape_and_cache: scales must be positive");
  if (p.num_tokens == 0) return;
  auto stream = static_cast<cudaStream_t>(stream_handle);
  switch (p.dtype) {
    case DType::kFloat32:
      return dispatch_cache_dtype<float>(p, stream);
    case DType::kFloat16:
      return dispatch_cache_dtype<half_t>(p, stream);
    case DType::kBFloat16:
      return dispatch_cache_dtype<bf16_t>(p, stream);
    default:
      throw KernelArgumentError("reshape_and_cache: source rows cannot be float8");
  }
}

void copy_blocks_cuda(void* cache, int64_t num_blocks, int64_t block_bytes, const int32_t* src_dst,
                      int64_t num_pairs, void* stream) {
  (void)num_blocks;
  check_arg(block_bytes % 16 == 0, "copy_blocks: block size in bytes must be a multiple of 16");
  if (num_pairs == 0) return;
  copy_blocks_kernel<<<static_cast<unsigned>(num_pairs), 256, 0,
                       static_cast<cudaStream_t>(stream)>>>(static_cast<int4*>(cache),
                                                            block_bytes / 16, src_dst);
  check_launch("copy_blocks");
}

void swap_blocks_cuda(const void* src, int64_t src_num_blocks, void* dst, int64_t dst_num_blocks,
                      int64_t block_bytes, const int64_t* src_dst, int64_t num_pairs,
                      void* stream) {
  check_arg(block_bytes > 0, "swap_blocks: block_bytes must be positive");
  for (int64_t i = 0; i < num_pairs; ++i) {
    const int64_t from = src_dst[2 * i];
    const int64_t to = src_dst[2 * i + 1];
    check_arg(
        from >= 0 && from < src_num_blocks && to >= 0 && to < dst_num_blocks,
        "swap_blocks: bad block pair (" + std::to_string(from) + ", " + std::to_string(to) + ")");
    check_call(cudaMemcpyAsync(static_cast<char*>(dst) + to * block_bytes,
                               static_cast<const char*>(src) + from * block_bytes,
                               static_cast<size_t>(block_bytes), cudaMemcpyDefault,
                               static_cast<cudaStream_t>(stream)),
               "swap_blocks");
  }
}

}  // namespace fastllm::kernels
