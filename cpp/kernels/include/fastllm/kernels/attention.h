// Paged attention over the KV cache (layout in cache_ops.h), one varlen entry point for prefill,
// chunked prefill, prefix-cache hits and decode.
//
// Sequence s owns query rows [query_start_loc[s], query_start_loc[s+1]) and has context_lens[s]
// tokens in the cache AFTER this step's rows were written (reshape_and_cache first); its query rows
// are the last query_len positions. Query row t of s is at position
//   pos = context_lens[s] - query_len + (t - query_start_loc[s])
// and attends to cache positions j with max(0, pos - sliding_window + 1) <= j <= pos (causal; no
// window when sliding_window <= 0). Scores are (q . k) * scale, then softcap * tanh(score /
// softcap) when softcap > 0. Query head h reads KV head h / (num_heads / num_kv_heads) (MHA, GQA,
// MQA).
#pragma once

#include <cstddef>
#include <cstdint>

#include "fastllm/kernels/common.h"

namespace fastllm::kernels {

struct PagedAttentionParams {
  void* out = nullptr;          // [num_tokens][num_heads][head_size], dtype = query dtype
  const void* query = nullptr;  // [num_tokens][num_heads][head_size], rows query_token_stride apart
  const void* key_cache = nullptr;           // [num_blocks][block_size][num_kv_heads][head_size]
  const void* value_cache = nullptr;         // same shape
  const int32_t* query_start_loc = nullptr;  // [num_seqs + 1], non-decreasing, last = num_tokens
  const int32_t* context_lens = nullptr;     // [num_seqs], >= the sequence's query length
  const int32_t* block_tables = nullptr;     // [num_seqs][max_blocks_per_seq], padded with 0
  int64_t num_tokens = 0;
  int64_t num_seqs = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_size = 0;   // 64, 80, 96, 128 or 256
  int64_t block_size = 0;  // 8, 16 or 32
  int64_t num_blocks = 0;
  int64_t max_blocks_per_seq = 0;
  int64_t query_token_stride = 0;  // elements between query rows (>= num_heads * head_size)
  int64_t out_token_stride = 0;    // elements between output rows
  float scale = 1.0f;
  int32_t sliding_window = -1;
  float softcap = 0.0f;
  float k_scale = 1.0f;  // fp8 caches: real value = stored * scale
  float v_scale = 1.0f;
  DType dtype = DType::kFloat32;        // query and output
  DType cache_dtype = DType::kFloat32;  // key_cache and value_cache
  // Host-side upper bound of context_lens (CUDA uses it to split long contexts; 0 = unknown,
  // no split).
  int64_t max_context_len = 0;
  // CUDA scratch for split contexts (see paged_attention_workspace_bytes); null = no split.
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

// Checks shapes and enumerations shared by both backends; throws KernelArgumentError.
void check_paged_attention_params(const PagedAttentionParams& params);

// CPU paged attention (host pointers), parallel over (sequence, KV head, query tile).
void paged_attention_cpu(const PagedAttentionParams& params);

// Bytes of CUDA workspace that let paged_attention_cuda split contexts of up to max_context_len
// tokens into partitions (0 when no split would be used).
size_t paged_attention_workspace_bytes(int64_t num_tokens, int64_t num_heads, int64_t head_size,
                                       int64_t max_context_len);

#ifdef FASTLLM_WITH_CUDA
// CUDA paged attention: device pointers, queued on stream. Supported dtype pairs: the cache dtype
// equals the query dtype, or is kFloat8E4M3 / kFloat8E5M2.
void paged_attention_cuda(const PagedAttentionParams& params, void* stream);
#endif

}  // namespace fastllm::kernels
