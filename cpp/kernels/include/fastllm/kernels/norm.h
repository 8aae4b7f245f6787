// RMSNorm, fused residual-add + RMSNorm and LayerNorm over rows of `hidden` elements.
// RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, accumulated in float; weight has the dtype of x.
// LayerNorm: y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias (biased variance, as torch).
#pragma once

#include <cstdint>

#include "fastllm/kernels/common.h"

namespace fastllm::kernels {

struct RmsNormParams {
  void* out = nullptr;           // [num_tokens][hidden], rows out_stride apart (may alias input)
  const void* input = nullptr;   // [num_tokens][hidden], rows input_stride apart
  const void* weight = nullptr;  // [hidden]
  int64_t num_tokens = 0;
  int64_t hidden = 0;
  int64_t input_stride = 0;
  int64_t out_stride = 0;
  float eps = 1e-6f;
  DType dtype = DType::kFloat32;
};

// In place: residual <- input + residual (rounded to dtype), input <- rms_norm(residual) * weight.
struct FusedAddRmsNormParams {
  void* input = nullptr;     // [num_tokens][hidden], rows input_stride apart
  void* residual = nullptr;  // [num_tokens][hidden], rows residual_stride apart
  const void* weight = nullptr;
  int64_t num_tokens = 0;
  int64_t hidden = 0;
  int64_t input_stride = 0;
  int64_t residual_stride = 0;
  float eps = 1e-6f;
  DType dtype = DType::kFloat32;
};

struct LayerNormParams {
  void* out = nullptr;           // [num_tokens][hidden], rows out_stride apart (may alias input)
  const void* input = nullptr;   // [num_tokens][hidden], rows input_stride apart
  const void* weight = nullptr;  // [hidden]
  const void* bias = nullptr;    // [hidden], or null for none
  int64_t num_tokens = 0;
  int64_t hidden = 0;
  int64_t input_stride = 0;
  int64_t out_stride = 0;
  float eps = 1e-5f;
  DType dtype = DType::kFloat32;
};

void rms_norm_cpu(const RmsNormParams& params);
void fused_add_rms_norm_cpu(const FusedAddRmsNormParams& params);
void layer_norm_cpu(const LayerNormParams& params);

#ifdef FASTLLM_WITH_CUDA
void rms_norm_cuda(const RmsNormParams& params, void* stream);
void fused_add_rms_norm_cuda(const FusedAddRmsNormParams& params, void* stream);
void layer_norm_cuda(const LayerNormParams& params, void* stream);
#endif

}  // namespace fastllm::kernels
