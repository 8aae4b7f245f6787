// CPU cache maintenance: reshape_and_cache, copy_blocks, swap_blocks.
#include "fastllm/kernels/cache_ops.h"

#include <cstring>
#include <string>

#include "parallel.h"
#include "vec.h"

namespace fastllm::kernels {

bool built_with_cuda() {
#ifdef FASTLLM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

namespace {

void check_reshape_and_cache(const ReshapeAndCacheParams& p) {
  check_arg(p.num_tokens >= 0 && p.num_kv_heads > 0 && p.head_size > 0 && p.block_size > 0 &&
                p.num_blocks > 0,
            "reshape_and_cache: bad sizes");
  check_arg(p.key_token_stride >= p.num_kv_heads * p.head_size &&
                p.value_token_stride >= p.num_kv_heads * p.head_size,
            "reshape_and_cache: token strides smaller than num_kv_heads * head_size");
  check_arg(!is_float8(p.dtype), "reshape_and_cache: source rows cannot be float8");
  check_arg(p.k_scale > 0.0f && p.v_scale > 0.0f, "reshape_and_cache: scales must be positive");
}

}  // namespace

void reshape_and_cache_cpu(const ReshapeAndCacheParams& p) {
  check_reshape_and_cache(p);
  const int64_t row = p.num_kv_heads * p.head_size;
  const int64_t num_slots = p.num_blocks * p.block_size;
  for (int64_t i = 0; i < p.num_tokens; ++i)
    check_arg(p.slot_mapping[i] < num_slots,
              "reshape_and_cache: slot " + std::to_string(p.slot_mapping[i]) + " out of range");
  const size_t src_size = dtype_size(p.dtype);
  const size_t cache_size = dtype_size(p.cache_dtype);
  const auto& ops = cpu::vec_ops();
  const bool same = p.cache_dtype == p.dtype;
  auto copy_token = [&](int64_t i) {
    const int64_t slot = p.slot_mapping[i];
    if (slot < 0) return;
    const char* k = static_cast<const char*>(p.key) + i * p.key_token_stride * src_size;
    const char* v = static_cast<const char*>(p.value) + i * p.value_token_stride * src_size;
    char* kc = static_cast<char*>(p.key_cache) + slot * row * cache_size;
    char* vc = static_cast<char*>(p.value_cache) + slot * row * cache_size;
    if (same) {
      std::memcpy(kc, k, row * src_size);
      std::memcpy(vc, v, row * src_size);
      return;
    }
    // Divide (not multiply by the reciprocal) so the rounding equals torch's x / scale.
    float* buffer = cpu::scratch(0, row);
    ops.load(k, p.dtype, buffer, row, 1.0f);
    for (int64_t j = 0; j < row; ++j) buffer[j] /= p.k_scale;
    ops.store(buffer, p.cache_dtype, kc, row, 1.0f);
    ops.load(v, p.dtype, buffer, row, 1.0f);
    for (int64_t j = 0; j < row; ++j) buffer[j] /= p.v_scale;
    ops.store(buffer, p.cache_dtype, vc, row, 1.0f);
  };
  if (same || p.num_tokens < 64) {
    for (int64_t i = 0; i < p.num_tokens; ++i) copy_token(i);
  } else {
    cpu::parallel_for(p.num_tokens, copy_token);
  }
}

void copy_blocks_cpu(void* cache, int64_t num_blocks, int64_t block_bytes, const int32_t* src_dst,
                     int64_t num_pairs) {
  auto* base = static_cast<char*>(cache);
  for (int64_t i = 0; i < num_pairs; ++i) {
    const int32_t src = src_dst[2 * i];
    const int32_t dst = src_dst[2 * i + 1];
    check_arg(src >= 0 && src < num_blocks && dst >= 0 && dst < num_blocks && src != dst,
              "copy_blocks: bad block pair (" + std::to_string(src) + ", " + std::to_string(dst) +
                  ") for " + std::to_string(num_blocks) + " blocks");
    std::memcpy(base + dst * block_bytes, base + src * block_bytes, block_bytes);
  }
}

void swap_blocks_cpu(const void* src, int64_t src_num_blocks, void* dst, int64_t dst_num_blocks,
                     int64_t block_bytes, const int64_t* src_dst, int64_t num_pairs) {
  check_arg(block_bytes > 0, "swap_blocks: block_bytes must be positive");
  for (int64_t i = 0; i < num_pairs; ++i) {
    const int64_t from = src_dst[2 * i];
    const int64_t to = src_dst[2 * i + 1];
    check_arg(
        from >= 0 && from < src_num_blocks && to >= 0 && to < dst_num_blocks,
        "swap_blocks: bad block pair (" + std::to_string(from) + ", " + std::to_string(to) + ")");
    std::memmove(static_cast<char*>(dst) + to * block_bytes,
                 static_cast<const char*>(src) + from * block_bytes, block_bytes);
  }
}

}  // namespace fastllm::kernels
