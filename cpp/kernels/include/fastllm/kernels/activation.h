// Gated activations: out = act(x[:, :d]) * x[:, d:] over rows of 2*d inputs.
#pragma once

#include <cstdint>

#include "fastllm/kernels/common.h"

namespace fastllm::kernels {

enum class Activation : int32_t {
  kSilu = 0,      // x * sigmoid(x)
  kGeluTanh = 1,  // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
  kGelu = 2,      // 0.5 x (1 + erf(x / sqrt(2)))
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

void act_and_mul_cpu(const ActAndMulParams& params);

#ifdef FASTLLM_WITH_CUDA
void act_and_mul_cuda(const ActAndMulParams& params, void* stream);
#endif

}  // namespace fastllm::kernels
