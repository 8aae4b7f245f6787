// Rotary position embeddings applied in place to query and key rows by position, from a
// precomputed float cos/sin cache (built in Python with any rope scaling: linear, dynamic NTK,
// llama3, yarn). cos_sin_cache[p] = [cos(p*f_0) .. cos(p*f_{r/2-1}), sin(p*f_0) ..
// sin(p*f_{r/2-1})] with r = rotary_dim (yarn's magnitude scaling is folded into the cache). Neox
// style rotates pairs (i, i + r/2); GPT-J style rotates pairs (2i, 2i + 1); dimensions past
// rotary_dim are left alone (partial rotary).
#pragma once

#include <cstdint>

#include "fastllm/kernels/common.h"

namespace fastllm::kernels {

struct RotaryParams {
  const int64_t* positions = nullptr;  // [num_tokens], each in [0, max_position)
  void* query = nullptr;  // [num_tokens][num_heads][head_size], rows query_token_stride apart
  void* key = nullptr;    // [num_tokens][num_kv_heads][head_size] or null
  const float* cos_sin_cache = nullptr;  // [max_position][rotary_dim]
  int64_t num_tokens = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_size = 0;
  int64_t rotary_dim = 0;  // even, <= head_size
  int64_t max_position = 0;
  int64_t query_token_stride = 0;
  int64_t key_token_stride = 0;
  bool is_neox = true;
  DType dtype = DType::kFloat32;
};

// Checks sizes shared by both backends; throws KernelArgumentError.
void check_rotary_params(const RotaryParams& params);

void rotary_embedding_cpu(const RotaryParams& params);

#ifdef FASTLLM_WITH_CUDA
void rotary_embedding_cuda(const RotaryParams& params, void* stream);
#endif

}  // namespace fastllm::kernels
