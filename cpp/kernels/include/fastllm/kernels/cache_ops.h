// Paged KV-cache maintenance: writing new K/V rows into slots, copying blocks (copy-on-write forks)
// and swapping blocks between caches (device <-> host, or host <-> host for the CPU backend).
//
// KV cache layout (K and V are separate tensors of the same shape):
//
//   cache[num_blocks][block_size][num_kv_heads][head_size]      (contiguous)
//   slot = block * block_size + offset                           (one token's K or V row of all
//   heads)
//
// Block 0 is a reserved null block: block tables are padded with 0 and nothing valid lives there.
// fp8 caches store round(x / scale) in e4m3 (saturating at +-448) or e5m2 (saturating at +-57344);
// readers multiply by the scale.
#pragma once

#include <cstdint>

#include "fastllm/kernels/common.h"

namespace fastllm::kernels {

struct ReshapeAndCacheParams {
  const void* key = nullptr;  // [num_tokens][num_kv_heads][head_size], rows key_token_stride apart
  const void* value =
      nullptr;  // [num_tokens][num_kv_heads][head_size], rows value_token_stride apart
  void* key_cache = nullptr;              // [num_blocks][block_size][num_kv_heads][head_size]
  void* value_cache = nullptr;            // same shape as key_cache
  const int64_t* slot_mapping = nullptr;  // [num_tokens]; a negative slot skips the token
  int64_t num_tokens = 0;
  int64_t num_kv_heads = 0;
  int64_t head_size = 0;
  int64_t key_token_stride = 0;    // elements between consecutive tokens of key
  int64_t value_token_stride = 0;  // elements between consecutive tokens of value
  int64_t num_blocks = 0;
  int64_t block_size = 0;
  DType dtype = DType::kFloat32;  // dtype of key and value
  // Dtype of the caches: on the CPU any of the five (rows are converted, round to nearest even);
  // on CUDA the source dtype or a float8 type.
  DType cache_dtype = DType::kFloat32;
  float k_scale = 1.0f;  // fp8 only: stored = x / k_scale
  float v_scale = 1.0f;
};

// Writes token i's K and V rows into slot slot_mapping[i] of the caches (host pointers).
void reshape_and_cache_cpu(const ReshapeAndCacheParams& params);

// Copies block src_dst[2*i] onto block src_dst[2*i+1] for i < num_pairs, in a cache of
// num_blocks blocks of block_bytes bytes each. Pairs must reference valid, distinct blocks.
void copy_blocks_cpu(void* cache, int64_t num_blocks, int64_t block_bytes, const int32_t* src_dst,
                     int64_t num_pairs);

// Copies block src_dst[2*i] of src onto block src_dst[2*i+1] of dst (both host caches of
// block_bytes-sized blocks); block indices are checked against the block counts.
void swap_blocks_cpu(const void* src, int64_t src_num_blocks, void* dst, int64_t dst_num_blocks,
                     int64_t block_bytes, const int64_t* src_dst, int64_t num_pairs);

#ifdef FASTLLM_WITH_CUDA
// CUDA reshape_and_cache: all pointers in device memory, queued on stream (a cudaStream_t).
void reshape_and_cache_cuda(const ReshapeAndCacheParams& params, void* stream);

// CUDA version of copy_blocks_cpu; src_dst lives in device memory, the copy is queued on stream.
void copy_blocks_cuda(void* cache, int64_t num_blocks, int64_t block_bytes, const int32_t* src_dst,
                      int64_t num_pairs, void* stream);

// Swap between any two caches the CUDA runtime can address (device or pinned/pageable host memory);
// src_dst is a host array. Asynchronous on stream for pinned memory.
void swap_blocks_cuda(const void* src, int64_t src_num_blocks, void* dst, int64_t dst_num_blocks,
                      int64_t block_bytes, const int64_t* src_dst, int64_t num_pairs, void* stream);
#endif

}  // namespace fastllm::kernels
