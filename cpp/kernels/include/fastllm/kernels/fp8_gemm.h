// Linear layers over FP8 (OCP e4m3fn) weights with one float scale per output row, as FP8
// checkpoints store them (a per-tensor scale is the same scale for every row):
//   out[m][n] = scale[n] * sum_k e4m3(W[n][k]) * x[m][k] (+ bias[n])
// The weight bytes stay as stored; each is converted to float where it is used (a 256-entry
// table on the CPU, bit arithmetic on CUDA), and products accumulate in float. The activations
// are not quantized (an FP8 checkpoint's input_scale is not applied: weight-only arithmetic).
//
// On the CPU the engine converts FP8 weights to Q8_0 at load instead (the integer kernels read
// 1.06 bytes per weight either way and run several times faster than float dot products); this
// CPU version is the portable reference of the CUDA kernel and what tests compare it with.
#pragma once

#include <cstdint>

#include "fastllm/kernels/common.h"

namespace fastllm::kernels {

struct Fp8GemmParams {
  float* out = nullptr;             // [m][n], rows out_stride floats apart
  const float* input = nullptr;     // [m][k], rows input_stride floats apart
  const uint8_t* weight = nullptr;  // [n][k] e4m3fn codes, row-major
  const float* scale = nullptr;     // [n] per-row scales
  const float* bias = nullptr;      // optional [n]
  int64_t m = 0;
  int64_t n = 0;
  int64_t k = 0;
  int64_t input_stride = 0;
  int64_t out_stride = 0;
};

// Checks sizes and pointers shared by both backends; throws KernelArgumentError.
void check_fp8_gemm_params(const Fp8GemmParams& params);

// Host pointers; parallel over output rows n.
void fp8_gemm_cpu(const Fp8GemmParams& params);

#ifdef FASTLLM_WITH_CUDA
// Device pointers, queued on stream (a cudaStream_t): one warp per output element.
void fp8_gemm_cuda(const Fp8GemmParams& params, void* stream);
#endif

}  // namespace fastllm::kernels
