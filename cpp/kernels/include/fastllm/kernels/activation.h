// Gated activations: out = act(x[:, :d]) * x[:, d:] over rows of 2*d inputs; plain activations
// out = act(x) over rows of d; and the logit softcap x = cap * tanh(x / cap) (Gemma 2's final
// logits; the attention kernels apply the same cap to their scores).
#pragma once

#include <cstdint>

#include "fastllm/kernels/common.h"

namespace fastllm::kernels {

enum class Activation : int32_t {
  kSilu = 0,      // x * sigmoid(x)
  kGeluTanh = 1,  // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
  kGelu = 2,      // 0.5 x (1 + erf(x / sqrt(2)))
  kRelu = 3,      // max(x, 0); plain activation only
};

struct ActAndMulParams {
  void* out = nullptr;          // [num_tokens][d], rows out_stride apart
  const void* input = nullptr;  // [num_tokens][2 d], rows input_stride apart
  int64_t num_tokens = 0;
  int64_t d = 0;
  int64_t input_stride = 0;
  int64_t out_stride = 0;
  Activation activation = Activation::kSilu;
  DType dtype = DType::kFloat32;
};

struct ActivationParams {
  void* out = nullptr;          // [num_tokens][d], rows out_stride apart (may alias input)
  const void* input = nullptr;  // [num_tokens][d], rows input_stride apart
  int64_t num_tokens = 0;
  int64_t d = 0;
  int64_t input_stride = 0;
  int64_t out_stride = 0;
  Activation activation = Activation::kSilu;
  DType dtype = DType::kFloat32;
};

// In place: data = cap * tanh(data / cap), cap > 0.
struct SoftcapParams {
  void* data = nullptr;  // [num_tokens][d], rows stride apart
  int64_t num_tokens = 0;
  int64_t d = 0;
  int64_t stride = 0;
  float cap = 0.0f;
  DType dtype = DType::kFloat32;
};

void act_and_mul_cpu(const ActAndMulParams& params);
void activation_cpu(const ActivationParams& params);
void softcap_cpu(const SoftcapParams& params);

#ifdef FASTLLM_WITH_CUDA
void act_and_mul_cuda(const ActAndMulParams& params, void* stream);
void activation_cuda(const ActivationParams& params, void* stream);
void softcap_cuda(const SoftcapParams& params, void* stream);
#endif

}  // namespace fastllm::kernels
