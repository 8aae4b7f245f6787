// Mixture-of-experts MLP: a router picks top_k experts per token, each expert is a gated MLP
// (down(silu(gate x) * up x)), and a token's output is the weighted sum of its experts' outputs.
//
//   moe_route:    router logits [tokens][experts] -> topk_ids, topk_weights [tokens][top_k]
//   moe_experts:  out[t] = sum_j topk_weights[t][j] * expert_{topk_ids[t][j]}(x[t])
//
// The experts run grouped by expert, not by token: each expert's tokens are gathered into one
// block of rows, so an expert's weights are read once per step whatever the number of tokens that
// chose it (a decode step of 16 sequences top-2 over 8 experts reads each expert once, not 4
// times).
//
//   tokens --route--> (expert, slot) pairs sorted by expert      [T * top_k rows]
//            gather x rows          xs [rows][hidden]
//            gate_up GEMM           per expert: xs[its rows] W_gate_up[e]^T   (quant_gemm)
//            silu(gate) * up        act [rows][intermediate]
//            down GEMM              per expert: act[its rows] W_down[e]^T
//            scatter                out[t] = sum over t's slots, in slot order, weight * row
//
// Expert weights are stacked: gate_up holds num_experts blocks of 2 * intermediate rows (gate
// rows, then up rows) of hidden values, down num_experts blocks of hidden rows of intermediate
// values, each in one quant_gemm layout (quant_gemm.h: F32, Q8_0, Q4_0, Q4_1, their x8 layouts,
// Q4_K, Q6_K). An expert's block starts at e * rows * row_bytes: x8 layouts keep their rows'
// byte size, and a block of 2 * intermediate (or hidden) rows is whole 8-row groups when that
// count is a multiple of 8.
//
// Every (expert, slice of weight rows) pair of a GEMM is one task of the CPU pool, so a decode
// step whose experts have one or two rows each still spreads over every core.
//
// A token's result depends only on its own row (each GEMM row is computed alone and the sum over
// its slots runs in slot order), so a token gives the same output in any batch.
#pragma once

#include <cstdint>

#include "fastllm/kernels/common.h"
#include "fastllm/kernels/quant_gemm.h"

namespace fastllm::kernels {

struct MoeRouteParams {
  const float* logits = nullptr;  // [num_tokens][num_experts], rows logits_stride apart
  int64_t num_tokens = 0;
  int64_t num_experts = 0;
  int64_t logits_stride = 0;
  int64_t top_k = 0;  // 1 <= top_k <= num_experts
  // softmax over all experts, then the top_k largest probabilities (ties: the lower expert id),
  // divided by their sum when renormalize (Mixtral; Qwen-MoE's norm_topk_prob), kept as they are
  // otherwise. This is HF transformers' arithmetic (Mixtral's "softmax over the top-k logits" is
  // the same numbers).
  bool renormalize = true;
  int32_t* topk_ids = nullptr;    // out [num_tokens][top_k], largest weight first
  float* topk_weights = nullptr;  // out [num_tokens][top_k]
};

// Throws KernelArgumentError for bad sizes.
void moe_route_cpu(const MoeRouteParams& params);

struct MoeExpertsParams {
  float* out = nullptr;          // [num_tokens][hidden], rows out_stride apart (overwritten)
  const float* input = nullptr;  // [num_tokens][hidden], rows input_stride apart
  int64_t num_tokens = 0;
  int64_t hidden = 0;
  int64_t intermediate = 0;  // per expert
  int64_t num_experts = 0;
  int64_t top_k = 0;
  int64_t input_stride = 0;
  int64_t out_stride = 0;
  const int32_t* topk_ids = nullptr;    // [num_tokens][top_k], each in [0, num_experts)
  const float* topk_weights = nullptr;  // [num_tokens][top_k]
  const void* gate_up = nullptr;        // [num_experts][2 intermediate] rows of hidden values
  QuantType gate_up_type = QuantType::kF32;
  const void* down = nullptr;  // [num_experts][hidden] rows of intermediate values
  QuantType down_type = QuantType::kF32;
  bool allow_simd = true;  // false: the GEMMs' portable scalar code (tests)
};

// Throws KernelArgumentError for bad sizes, layouts or expert ids.
void moe_experts_cpu(const MoeExpertsParams& params);

#ifdef FASTLLM_WITH_CUDA
// CUDA: weights float32, float16 or bfloat16 (dtype), input and out of the same dtype,
// accumulation in float. topk_ids / topk_weights as above, on the device. workspace: at least
// moe_experts_cuda_workspace_bytes(...) bytes of device memory.
struct MoeExpertsCudaParams {
  void* out = nullptr;
  const void* input = nullptr;
  int64_t num_tokens = 0;
  int64_t hidden = 0;
  int64_t intermediate = 0;
  int64_t num_experts = 0;
  int64_t top_k = 0;
  const int32_t* topk_ids = nullptr;
  const float* topk_weights = nullptr;
  const void* gate_up = nullptr;  // [num_experts][2 intermediate][hidden]
  const void* down = nullptr;     // [num_experts][hidden][intermediate]
  DType dtype = DType::kFloat16;
  void* workspace = nullptr;
};
int64_t moe_experts_cuda_workspace_bytes(int64_t num_tokens, int64_t hidden, int64_t intermediate,
                                         int64_t num_experts, int64_t top_k);
void moe_route_cuda(const MoeRouteParams& params, void* stream);
void moe_experts_cuda(const MoeExpertsCudaParams& params, void* stream);
#endif

}  // namespace fastllm::kernels
