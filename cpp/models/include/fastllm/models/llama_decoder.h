// A whole Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2) run on the CPU in one call, over
// weights kept in their GGUF block encodings.
//
// The model code in Python calls one kernel per layer piece; on a small model that is a thousand
// crossings of the Python/C++ boundary per step, more time than the arithmetic of a decode step.
// CpuDecoder runs the same kernels (quant_gemm, rms_norm, rotary, reshape_and_cache,
// paged_attention, act_and_mul) in a C++ loop over the layers, on buffers it keeps between steps:
//
//   hidden = embeddings
//   for each layer:  h = norm(hidden (+ residual))            fused add on layers > 0
//                    qkv = h W_qkv; rope(q, k); cache(k, v); a = attention(q)
//                    h = norm(a W_o + residual)                 fused add
//                    hidden = silu_and_mul(h W_gate_up) W_down
//                      or, in a sparse layer (Mixtral, Qwen3-MoE), the experts the router picks
//                      for each token (moe.h): route(h W_router), moe_experts(h)
//   out = norm(hidden + residual)
//
// Qwen3 attention RMS-normalizes each query and key head (q_norm, k_norm) before RoPE.
//
// The arithmetic is that of the per-op path: the same kernels in the same order, so its output
// equals the Python model's on the same weights.
#pragma once

#include <cstdint>
#include <vector>

#include "fastllm/kernels/common.h"
#include "fastllm/kernels/quant_gemm.h"

namespace fastllm::models {

using kernels::DType;
using kernels::QuantType;

// A linear layer over GGUF-encoded rows: y = x W^T (+ bias), W [n][k].
struct QuantLinearRef {
  const void* weight = nullptr;  // n rows of k / block_values blocks, densely packed
  const float* bias = nullptr;   // optional [n]
  int64_t n = 0;
  int64_t k = 0;
  QuantType type = QuantType::kQ8_0;
};

// A sparse MLP (kernels/moe.h): num_experts > 0 makes a layer sparse.
struct MoeRef {
  QuantLinearRef router;          // [num_experts][hidden]
  const void* gate_up = nullptr;  // [num_experts][2 intermediate] rows of hidden values
  QuantType gate_up_type = QuantType::kF32;
  const void* down = nullptr;  // [num_experts][hidden] rows of intermediate values
  QuantType down_type = QuantType::kF32;
  int64_t num_experts = 0;
  int64_t top_k = 0;
  int64_t intermediate = 0;  // per expert
  bool renormalize = true;
};

struct DecoderLayerRef {
  const float* input_norm = nullptr;           // [hidden]
  const float* post_attention_norm = nullptr;  // [hidden]
  QuantLinearRef qkv;                          // [q + 2 kv][hidden]: rows of Q, then K, then V
  QuantLinearRef o_proj;                       // [hidden][q]
  QuantLinearRef gate_up;                      // [2 intermediate][hidden]: gate rows, then up rows
  QuantLinearRef down;                         // [hidden][intermediate]
  MoeRef moe;                                  // a sparse layer: replaces gate_up and down
  const float* q_norm = nullptr;               // optional [head_dim] (with k_norm)
  const float* k_norm = nullptr;               // optional [head_dim]
  void* key_cache = nullptr;                   // [num_blocks][block_size][num_kv_heads][head_dim]
  void* value_cache = nullptr;                 // same shape
  // fp8 caches: stored = x / scale (per layer, from the checkpoint or a scales file); ignored
  // for float caches.
  float k_scale = 1.0f;
  float v_scale = 1.0f;
};

struct DecoderShape {
  int64_t hidden = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t intermediate = 0;
  float rms_eps = 1e-6f;
  const float* final_norm = nullptr;  // [hidden]
  const float* rope_cache = nullptr;  // [max_position][rotary_dim] (see rotary.h)
  int64_t rotary_dim = 0;
  int64_t max_position = 0;
  bool rope_neox = true;
  float attn_scale = 1.0f;
  int32_t sliding_window = -1;
  int64_t block_size = 0;
  int64_t num_blocks = 0;
  DType cache_dtype = DType::kFloat32;  // float32, float16, bfloat16, float8_e4m3 or float8_e5m2
};

// One step's batch, laid out as the engine's BatchPlan (see attention.h for the metadata).
// LoRA adapters of one step (kernels/lora.h): per (layer, target) the slots' A and transposed B
// ([rank][n]) pointers, ranks and scales, laid out [layer][target][slot], targets in the order
// below.
inline constexpr int kNumLoraTargets = 7;  // q, k, v, o, gate, up, down
struct DecoderLora {
  const int32_t* token_slots = nullptr;  // [num_tokens], < 0 = no adapter
  int64_t num_slots = 0;
  int64_t max_rank = 0;
  const void* const* a = nullptr;
  const void* const* b = nullptr;
  kernels::DType weight_dtype = kernels::DType::kFloat32;
  const int32_t* ranks = nullptr;
  const float* scales = nullptr;
};

struct DecoderBatch {
  float* hidden = nullptr;  // [num_tokens][hidden]: the embeddings in, the final-normed states out
  const int32_t* positions = nullptr;        // [num_tokens]
  const int64_t* slot_mapping = nullptr;     // [num_tokens]
  const int32_t* query_start_loc = nullptr;  // [num_seqs + 1]
  const int32_t* context_lens = nullptr;     // [num_seqs]
  const int32_t* block_tables = nullptr;     // [num_seqs][max_blocks_per_seq]
  int64_t num_tokens = 0;
  int64_t num_seqs = 0;
  int64_t max_blocks_per_seq = 0;
  int64_t max_context_len = 0;
  const DecoderLora* lora = nullptr;  // the step's adapters, or null
};

class CpuDecoder {
 public:
  // Throws KernelArgumentError for inconsistent sizes.
  explicit CpuDecoder(const DecoderShape& shape);

  // Appends a layer; its linear shapes must match the model's. The pointers must stay valid for
  // the decoder's lifetime.
  void add_layer(const DecoderLayerRef& layer);
  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  const DecoderShape& shape() const { return shape_; }

  // Runs every layer over the batch (the caches get this step's keys and values). One call at a
  // time: the decoder's buffers are shared between calls.
  void forward(const DecoderBatch& batch);

  // Wall-clock seconds spent in each part of forward() since profiling was turned on (off by
  // default; a timer costs ~20 ns): GEMMs, attention (cache write + paged attention) and
  // norms/rope/act (RMSNorm, RoPE, SiLU-and-mul).
  struct Profile {
    double gemm = 0.0;
    double attention = 0.0;
    double norms_rope_act = 0.0;
  };
  void set_profiling(bool on) {
    profiling_ = on;
    profile_ = Profile();
  }
  const Profile& profile() const { return profile_; }

 private:
  void linear(const QuantLinearRef& w, const float* x, int64_t x_stride, float* y,
              int64_t num_tokens) const;
  // RMSNorm of every query and key head of qkv in place (Qwen3).
  void head_norms(const DecoderLayerRef& layer, float* qkv, int64_t qkv_width,
                  int64_t num_tokens) const;
  // hidden = the sparse MLP of hidden (in place).
  void sparse_mlp(const MoeRef& moe, float* hidden, int64_t num_tokens);

  DecoderShape shape_;
  std::vector<DecoderLayerRef> layers_;
  int64_t q_size_ = 0;
  int64_t kv_size_ = 0;
  // Step buffers, grown to the largest batch seen.
  std::vector<float> residual_;
  std::vector<float> qkv_;
  std::vector<float> attn_;
  std::vector<float> gate_up_;
  std::vector<float> act_;
  std::vector<float> router_logits_;
  std::vector<int32_t> topk_ids_;
  std::vector<float> topk_weights_;
  std::vector<int64_t> positions_;
  bool profiling_ = false;
  Profile profile_;
};

}  // namespace fastllm::models
