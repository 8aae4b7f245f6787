// Batched LoRA: every adapter of a step applied in one call per linear layer.
//
//   out[t, 0:n) += scales[s] * ((x[t, 0:k) @ A_s^T) @ B_s^T)     for s = token_slots[t] >= 0
//
// A_s is [rank_s][k] row-major float32 (PEFT's lora_A.weight), B_s is [n][rank_s] row-major float32
// (lora_B.weight). Tokens with slot < 0, or whose slot has a null A, are left untouched. Tokens of
// one slot need not be contiguous: the kernels group them ("segments").
//
// Two passes, so a step costs one read of each adapter's A and B whatever its token count:
//   shrink  h[t, 0:rank) = x[t] @ A_s^T        (a [num_tokens][max_rank] float scratch)
//   expand  out[t, j]   += scales[s] * (h[t] . B_s[j])
//
// Batch invariance: each h[t, r] and each out[t, j] is computed by the same operations in the same
// order whatever the other tokens and slots of the call are, so a token's row is bit-identical
// alone or in a batch (on one device and one CPU code path). Different code paths (scalar, AVX2,
// AVX-512, CUDA) agree to rounding only.
//
// `out` may point into the middle of a wider row (the q slice of a fused qkv output: out = qkv +
// q_offset, out_stride = qkv's row width): only columns [0, n) of each row are written.
#pragma once

#include <cstdint>

#include "fastllm/kernels/common.h"

namespace fastllm::kernels {

// The largest rank the kernels take (vLLM's largest --max-lora-rank); also the bound used when
// LoraParams::max_rank is 0.
constexpr int64_t kMaxLoraRank = 512;

struct LoraParams {
  float* out = nullptr;  // [num_tokens][out_features], rows out_stride floats apart
  int64_t out_stride = 0;
  const float* input = nullptr;  // [num_tokens][in_features], rows input_stride floats apart
  int64_t input_stride = 0;
  int64_t num_tokens = 0;
  int64_t in_features = 0;               // k
  int64_t out_features = 0;              // n
  const int32_t* token_slots = nullptr;  // [num_tokens]; < 0 = no adapter
  int64_t num_slots = 0;
  // A and B of each slot, float32 or float16 (weight_dtype): float16 halves what a step reads
  // for its adapters (they are converted exactly as they are read; the products are float).
  const void* const* lora_a = nullptr;   // [num_slots]; null = slot unused for this module
  const void* const* lora_b = nullptr;   // [num_slots]; non-null wherever lora_a is
  DType weight_dtype = DType::kFloat32;  // kFloat32 or kFloat16
  // lora_b holds B transposed, [rank_s][n] row-major: the layout the executors keep (made once
  // when an adapter loads), so no call transposes B; false: PEFT's [n][rank_s].
  bool b_transposed = false;
  const int32_t* ranks = nullptr;  // [num_slots], 1..max_rank where lora_a is non-null
  const float* scales = nullptr;   // [num_slots]
  // Bound on ranks (0 = kMaxLoraRank). CUDA sizes its grid and scratch by it, since it cannot read
  // the device ranks: pass the engine's --max-lora-rank to keep the scratch small.
  int64_t max_rank = 0;
  // CUDA only: scratch of at least lora_workspace_bytes(num_tokens, max_rank) bytes in device
  // memory. When null, lora_cuda allocates it on the stream (cudaMallocAsync) for the call.
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;
};

// The effective rank bound of p (max_rank, or kMaxLoraRank when 0).
inline int64_t lora_max_rank(const LoraParams& p) {
  return p.max_rank > 0 ? p.max_rank : kMaxLoraRank;
}

// Bytes of the shrink scratch of a call: num_tokens * max_rank floats (max_rank 0 = kMaxLoraRank).
int64_t lora_workspace_bytes(int64_t num_tokens, int64_t max_rank);

// Checks sizes, strides and the presence of every pointer a call needs, reading nothing they point
// to; throws KernelArgumentError naming the problem. Both launchers call it.
void check_lora_shapes(const LoraParams& p);

// check_lora_shapes, then the contents of the host arrays: each token's slot in [-1 .. num_slots)
// (any negative slot means none), and for each slot with a non-null A a non-null B and a rank in
// [1, max_rank]. Reads token_slots, lora_a, lora_b and ranks, so only for host-memory params.
void check_lora_params(const LoraParams& p);

// Runs check_lora_params, then adds the LoRA terms into out on the CPU pool. Vectorised with
// AVX-512 or AVX2+FMA where the CPU has them, capped by env FASTLLM_CPU_ISA (see cpu/vec.h).
void lora_cpu(const LoraParams& p);

// The code path lora_cpu takes: "avx512", "avx2" or "scalar".
const char* lora_cpu_isa();

#ifdef FASTLLM_WITH_CUDA
// Every pointer, the pointer arrays included, in device memory. Runs check_lora_shapes only (the
// device arrays are not read on the host): a token whose slot is >= num_slots, or whose rank
// is outside [1, max_rank], is left untouched instead of raising.
void lora_cuda(const LoraParams& p, void* stream);
#endif

}  // namespace fastllm::kernels
