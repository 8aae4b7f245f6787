// CpuDecoder: the Llama-family layer loop over the CPU kernels (see llama_decoder.h).
#include "fastllm/models/llama_decoder.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <string>
#include <tuple>

#include "fastllm/kernels/activation.h"
#include "fastllm/kernels/attention.h"
#include "fastllm/kernels/cache_ops.h"
#include "fastllm/kernels/lora.h"
#include "fastllm/kernels/moe.h"
#include "fastllm/kernels/norm.h"
#include "fastllm/kernels/rotary.h"

namespace fastllm::models {

using namespace kernels;  // NOLINT: the decoder is written in terms of the kernels

namespace {

template <typename T>
T* grow(std::vector<T>& buffer, int64_t n) {
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(static_cast<size_t>(n));
  return buffer.data();
}

void check_linear(const QuantLinearRef& w, int64_t n, int64_t k, const char* name) {
  const std::string where = std::string("CpuDecoder: ") + name;
  check_arg(w.weight != nullptr, where + " has no weight");
  check_arg(quant_block_values(w.type) > 0, where + " has an unknown quantization type");
  check_arg(w.n == n && w.k == k, where + " is [" + std::to_string(w.n) + ", " +
                                      std::to_string(w.k) + "], expected [" + std::to_string(n) +
                                      ", " + std::to_string(k) + "]");
  check_arg(k % quant_block_values(w.type) == 0, where + ": " + std::to_string(k) +
                                                     " values are not whole " +
                                                     quant_type_name(w.type) + " blocks");
}

}  // namespace

CpuDecoder::CpuDecoder(const DecoderShape& s) : shape_(s) {
  check_arg(
      s.hidden > 0 && s.num_heads > 0 && s.num_kv_heads > 0 && s.head_dim > 0 && s.intermediate > 0,
      "CpuDecoder: sizes must be positive");
  check_arg(s.num_heads % s.num_kv_heads == 0,
            "CpuDecoder: num_heads must be a multiple of num_kv_heads");
  check_arg(s.final_norm != nullptr && s.rope_cache != nullptr,
            "CpuDecoder: final_norm and rope_cache are required");
  check_arg(s.rotary_dim > 0 && s.rotary_dim <= s.head_dim && s.rotary_dim % 2 == 0,
            "CpuDecoder: rotary_dim must be even and at most head_dim");
  check_arg(s.max_position > 0 && s.block_size > 0 && s.num_blocks > 0,
            "CpuDecoder: max_position, block_size and num_blocks must be positive");
  q_size_ = s.num_heads * s.head_dim;
  kv_size_ = s.num_kv_heads * s.head_dim;
}

void CpuDecoder::add_layer(const DecoderLayerRef& layer) {
  const DecoderShape& s = shape_;
  check_arg(layer.input_norm != nullptr && layer.post_attention_norm != nullptr,
            "CpuDecoder: a layer needs both norm weights");
  check_arg(layer.key_cache != nullptr && layer.value_cache != nullptr,
            "CpuDecoder: a layer needs its key and value caches");
  check_arg(layer.k_scale > 0.0f && layer.v_scale > 0.0f && std::isfinite(layer.k_scale) &&
                std::isfinite(layer.v_scale),
            "CpuDecoder: KV cache scales must be positive and finite");
  check_linear(layer.qkv, q_size_ + 2 * kv_size_, s.hidden, "qkv_proj");
  check_linear(layer.o_proj, s.hidden, q_size_, "o_proj");
  check_arg((layer.q_norm == nullptr) == (layer.k_norm == nullptr),
            "CpuDecoder: q_norm and k_norm come together");
  const MoeRef& moe = layer.moe;
  if (moe.num_experts > 0) {
    check_arg(moe.top_k >= 1 && moe.top_k <= moe.num_experts && moe.intermediate > 0,
              "CpuDecoder: a sparse layer needs 1 <= top_k <= num_experts and an intermediate "
              "size");
    check_linear(moe.router, moe.num_experts, s.hidden, "router");
    for (auto [weight, type, rows, k, name] :
         {std::tuple{moe.gate_up, moe.gate_up_type, 2 * moe.intermediate, s.hidden, "experts"},
          std::tuple{moe.down, moe.down_type, s.hidden, moe.intermediate, "experts' down"}}) {
      const std::string where = std::string("CpuDecoder: ") + name;
      check_arg(weight != nullptr && quant_block_values(type) > 0 &&
                    k % quant_block_values(type) == 0 && rows % quant_row_group(type) == 0,
                where + " weights are missing or not whole blocks / row groups");
    }
  } else {
    check_linear(layer.gate_up, 2 * s.intermediate, s.hidden, "gate_up_proj");
    check_linear(layer.down, s.hidden, s.intermediate, "down_proj");
  }
  layers_.push_back(layer);
}

void CpuDecoder::linear(const QuantLinearRef& w, const float* x, int64_t x_stride, float* y,
                        int64_t num_tokens) const {
  QuantGemmParams p;
  p.out = y;
  p.input = x;
  p.weight = w.weight;
  p.bias = w.bias;
  p.m = num_tokens;
  p.n = w.n;
  p.k = w.k;
  p.input_stride = x_stride;
  p.out_stride = w.n;
  p.type = w.type;
  quant_gemm_cpu(p);
}

void CpuDecoder::head_norms(const DecoderLayerRef& layer, float* qkv, int64_t qkv_width,
                            int64_t num_tokens) const {
  // Per head a column block of qkv: rows num_tokens, qkv_width apart (in place).
  const DecoderShape& s = shape_;
  RmsNormParams norm;
  norm.num_tokens = num_tokens;
  norm.hidden = s.head_dim;
  norm.input_stride = qkv_width;
  norm.out_stride = qkv_width;
  norm.eps = s.rms_eps;
  for (int64_t head = 0; head < s.num_heads + s.num_kv_heads; ++head) {
    norm.input = norm.out = qkv + head * s.head_dim;
    norm.weight = head < s.num_heads ? layer.q_norm : layer.k_norm;
    rms_norm_cpu(norm);
  }
}

void CpuDecoder::sparse_mlp(const MoeRef& moe, float* hidden, int64_t num_tokens) {
  const int64_t h = shape_.hidden;
  float* logits = grow(router_logits_, num_tokens * moe.num_experts);
  int32_t* ids = grow(topk_ids_, num_tokens * moe.top_k);
  float* weights = grow(topk_weights_, num_tokens * moe.top_k);
  linear(moe.router, hidden, h, logits, num_tokens);
  MoeRouteParams route;
  route.logits = logits;
  route.num_tokens = num_tokens;
  route.num_experts = moe.num_experts;
  route.logits_stride = moe.num_experts;
  route.top_k = moe.top_k;
  route.renormalize = moe.renormalize;
  route.topk_ids = ids;
  route.topk_weights = weights;
  moe_route_cpu(route);
  MoeExpertsParams experts;
  experts.out = hidden;  // in place: the kernel reads its input before writing out
  experts.input = hidden;
  experts.num_tokens = num_tokens;
  experts.hidden = h;
  experts.intermediate = moe.intermediate;
  experts.num_experts = moe.num_experts;
  experts.top_k = moe.top_k;
  experts.input_stride = h;
  experts.out_stride = h;
  experts.topk_ids = ids;
  experts.topk_weights = weights;
  experts.gate_up = moe.gate_up;
  experts.gate_up_type = moe.gate_up_type;
  experts.down = moe.down;
  experts.down_type = moe.down_type;
  moe_experts_cpu(experts);
}

void CpuDecoder::forward(const DecoderBatch& b) {
  const DecoderShape& s = shape_;
  const int64_t t = b.num_tokens;
  check_arg(t >= 0 && b.num_seqs >= 0, "CpuDecoder: negative batch sizes");
  if (t == 0) return;
  check_arg(b.hidden != nullptr && b.positions != nullptr && b.slot_mapping != nullptr &&
                b.query_start_loc != nullptr && b.context_lens != nullptr &&
                b.block_tables != nullptr,
            "CpuDecoder: missing batch arrays");
  const int64_t h = s.hidden, qkv_width = q_size_ + 2 * kv_size_;
  float* hidden = b.hidden;
  float* residual = grow(residual_, t * h);
  float* qkv = grow(qkv_, t * qkv_width);
  float* attn = grow(attn_, t * q_size_);
  float* gate_up = grow(gate_up_, t * 2 * s.intermediate);
  float* act = grow(act_, t * s.intermediate);
  int64_t* positions = grow(positions_, t);
  for (int64_t i = 0; i < t; ++i) {
    check_arg(b.positions[i] >= 0 && b.positions[i] < s.max_position,
              "CpuDecoder: position " + std::to_string(b.positions[i]) + " out of range");
    positions[i] = b.positions[i];
  }

  RmsNormParams first_norm;
  first_norm.out = hidden;
  first_norm.input = hidden;
  first_norm.num_tokens = t;
  first_norm.hidden = h;
  first_norm.input_stride = h;
  first_norm.out_stride = h;
  first_norm.eps = s.rms_eps;

  FusedAddRmsNormParams add_norm;
  add_norm.input = hidden;
  add_norm.residual = residual;
  add_norm.num_tokens = t;
  add_norm.hidden = h;
  add_norm.input_stride = h;
  add_norm.residual_stride = h;
  add_norm.eps = s.rms_eps;

  RotaryParams rope;
  rope.positions = positions;
  rope.query = qkv;
  rope.key = qkv + q_size_;
  rope.cos_sin_cache = s.rope_cache;
  rope.num_tokens = t;
  rope.num_heads = s.num_heads;
  rope.num_kv_heads = s.num_kv_heads;
  rope.head_size = s.head_dim;
  rope.rotary_dim = s.rotary_dim;
  rope.max_position = s.max_position;
  rope.query_token_stride = qkv_width;
  rope.key_token_stride = qkv_width;
  rope.is_neox = s.rope_neox;

  ReshapeAndCacheParams cache;
  cache.key = qkv + q_size_;
  cache.value = qkv + q_size_ + kv_size_;
  cache.slot_mapping = b.slot_mapping;
  cache.num_tokens = t;
  cache.num_kv_heads = s.num_kv_heads;
  cache.head_size = s.head_dim;
  cache.key_token_stride = qkv_width;
  cache.value_token_stride = qkv_width;
  cache.num_blocks = s.num_blocks;
  cache.block_size = s.block_size;
  cache.cache_dtype = s.cache_dtype;

  PagedAttentionParams attention;
  attention.out = attn;
  attention.query = qkv;
  attention.query_start_loc = b.query_start_loc;
  attention.context_lens = b.context_lens;
  attention.block_tables = b.block_tables;
  attention.num_tokens = t;
  attention.num_seqs = b.num_seqs;
  attention.num_heads = s.num_heads;
  attention.num_kv_heads = s.num_kv_heads;
  attention.head_size = s.head_dim;
  attention.block_size = s.block_size;
  attention.num_blocks = s.num_blocks;
  attention.max_blocks_per_seq = b.max_blocks_per_seq;
  attention.query_token_stride = qkv_width;
  attention.out_token_stride = q_size_;
  attention.scale = s.attn_scale;
  attention.sliding_window = s.sliding_window;
  attention.cache_dtype = s.cache_dtype;
  attention.max_context_len = b.max_context_len;

  ActAndMulParams silu;
  silu.out = act;
  silu.input = gate_up;
  silu.num_tokens = t;
  silu.d = s.intermediate;
  silu.input_stride = 2 * s.intermediate;
  silu.out_stride = s.intermediate;

  // Runs fn, adding its wall time to *part when profiling.
  auto timed = [this](double* part, auto&& fn) {
    if (!profiling_) return fn();
    const auto start = std::chrono::steady_clock::now();
    fn();
    *part += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  // Adds the step's LoRA terms of (layer, target) to out (a column slice of a wider row).
  const DecoderLora* lora = b.lora;
  auto add_lora = [&](size_t l, int target, const float* x, int64_t x_stride, int64_t k, float* out,
                      int64_t out_stride, int64_t n) {
    if (lora == nullptr) return;
    const int64_t at = (static_cast<int64_t>(l) * kNumLoraTargets + target) * lora->num_slots;
    bool any = false;
    for (int64_t s = 0; s < lora->num_slots; ++s) any = any || lora->a[at + s] != nullptr;
    if (!any) return;
    LoraParams p;
    p.out = out;
    p.out_stride = out_stride;
    p.input = x;
    p.input_stride = x_stride;
    p.num_tokens = t;
    p.in_features = k;
    p.out_features = n;
    p.token_slots = lora->token_slots;
    p.num_slots = lora->num_slots;
    p.lora_a = lora->a + at;
    p.lora_b = lora->b + at;
    p.ranks = lora->ranks + at;
    p.scales = lora->scales + at;
    p.max_rank = lora->max_rank;
    p.b_transposed = true;  // the executor keeps B as [rank][n]
    p.weight_dtype = lora->weight_dtype;
    lora_cpu(p);
  };
  double* const gemm = &profile_.gemm;
  double* const attend = &profile_.attention;
  double* const other = &profile_.norms_rope_act;

  for (size_t l = 0; l < layers_.size(); ++l) {
    const DecoderLayerRef& layer = layers_[l];
    timed(other, [&] {
      if (l == 0) {
        std::memcpy(residual, hidden, static_cast<size_t>(t * h) * sizeof(float));
        first_norm.weight = layer.input_norm;
        rms_norm_cpu(first_norm);
      } else {
        add_norm.weight = layer.input_norm;
        fused_add_rms_norm_cpu(add_norm);
      }
    });
    timed(gemm, [&] {
      linear(layer.qkv, hidden, h, qkv, t);
      add_lora(l, 0, hidden, h, h, qkv, qkv_width, q_size_);
      add_lora(l, 1, hidden, h, h, qkv + q_size_, qkv_width, kv_size_);
      add_lora(l, 2, hidden, h, h, qkv + q_size_ + kv_size_, qkv_width, kv_size_);
    });
    timed(other, [&] {
      if (layer.q_norm != nullptr) head_norms(layer, qkv, qkv_width, t);
      rotary_embedding_cpu(rope);
    });
    timed(attend, [&] {
      cache.key_cache = layer.key_cache;
      cache.value_cache = layer.value_cache;
      cache.k_scale = attention.k_scale = layer.k_scale;
      cache.v_scale = attention.v_scale = layer.v_scale;
      reshape_and_cache_cpu(cache);
      attention.key_cache = layer.key_cache;
      attention.value_cache = layer.value_cache;
      paged_attention_cpu(attention);
    });
    timed(gemm, [&] {
      linear(layer.o_proj, attn, q_size_, hidden, t);
      add_lora(l, 3, attn, q_size_, q_size_, hidden, h, h);
    });
    timed(other, [&] {
      add_norm.weight = layer.post_attention_norm;
      fused_add_rms_norm_cpu(add_norm);
    });
    if (layer.moe.num_experts > 0) {
      timed(gemm, [&] { sparse_mlp(layer.moe, hidden, t); });
      continue;
    }
    timed(gemm, [&] {
      linear(layer.gate_up, hidden, h, gate_up, t);
      add_lora(l, 4, hidden, h, h, gate_up, 2 * s.intermediate, s.intermediate);
      add_lora(l, 5, hidden, h, h, gate_up + s.intermediate, 2 * s.intermediate, s.intermediate);
    });
    timed(other, [&] { act_and_mul_cpu(silu); });
    timed(gemm, [&] {
      linear(layer.down, act, s.intermediate, hidden, t);
      add_lora(l, 6, act, s.intermediate, s.intermediate, hidden, h, h);
    });
  }
  timed(other, [&] {
    if (layers_.empty()) {
      first_norm.weight = s.final_norm;
      rms_norm_cpu(first_norm);
    } else {
      add_norm.weight = s.final_norm;
      fused_add_rms_norm_cpu(add_norm);
    }
  });
}

}  // namespace fastllm::models
