// CUDA RMSNorm, fused residual-add + RMSNorm and LayerNorm: one thread block per row.
#include "fastllm/kernels/cuda_compat.cuh"
#include "fastllm/kernels/norm.h"

namespace fastllm::kernels {
namespace {

using namespace gpu;

constexpr int kThreads = 256;

template <typename T>
__global__ void rms_norm_kernel(T* __restrict__ out, const T* __restrict__ input,
                                const T* __restrict__ weight, int64_t hidden, int64_t in_stride,
                                int64_t out_stride, float eps) {
  __shared__ float scratch[32];
  const T* x = input + blockIdx.x * in_stride;
  float sum = 0.0f;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float v = to_float(x[i]);
    sum += v * v;
  }
  const float inv_rms = rsqrtf(block_sum(sum, scratch) / hidden + eps);
  T* y = out + blockIdx.x * out_stride;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x)
    y[i] = from_float<T>(to_float(x[i]) * inv_rms * to_float(weight[i]));
}

// Each thread reads back only the residual elements it wrote itself, so no barrier is needed
// between the two passes beyond the reduction's.
template <typename T>
__global__ void fused_add_rms_norm_kernel(T* __restrict__ input, T* __restrict__ residual,
                                          const T* __restrict__ weight, int64_t hidden,
                                          int64_t in_stride, int64_t res_stride, float eps) {
  __shared__ float scratch[32];
  T* x = input + blockIdx.x * in_stride;
  T* r = residual + blockIdx.x * res_stride;
  float sum = 0.0f;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    const T stored = from_float<T>(to_float(x[i]) + to_float(r[i]));
    r[i] = stored;
    const float v = to_float(stored);
    sum += v * v;
  }
  const float inv_rms = rsqrtf(block_sum(sum, scratch) / hidden + eps);
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x)
    x[i] = from_float<T>(to_float(r[i]) * inv_rms * to_float(weight[i]));
}

// Two reductions (mean, then centred squares): one-pass E[x^2] - E[x]^2 loses the variance of
// rows with a large mean.
template <typename T>
__global__ void layer_norm_kernel(T* __restrict__ out, const T* __restrict__ input,
                                  const T* __restrict__ weight, const T* __restrict__ bias,
                                  int64_t hidden, int64_t in_stride, int64_t out_stride,
                                  float eps) {
  __shared__ float scratch[32];
  const T* x = input + blockIdx.x * in_stride;
  float sum = 0.0f;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) sum += to_float(x[i]);
  // block_sum hands every thread the total and synchronises before reusing scratch.
  const float mean = block_sum(sum, scratch) / hidden;
  float squares = 0.0f;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float d = to_float(x[i]) - mean;
    squares += d * d;
  }
  const float inv_std = rsqrtf(block_sum(squares, scratch) / hidden + eps);
  T* y = out + blockIdx.x * out_stride;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    float v = (to_float(x[i]) - mean) * inv_std * to_float(weight[i]);
    if (bias != nullptr) v += to_float(bias[i]);
    y[i] = from_float<T>(v);
  }
}

template <typename T>
void launch_layer_norm(const LayerNormParams& p, cudaStream_t stream) {
  layer_norm_kernel<T><<<static_cast<unsigned>(p.num_tokens), kThreads, 0, stream>>>(
      static_cast<T*>(p.out), static_cast<const T*>(p.input), static_cast<const T*>(p.weight),
      static_cast<const T*>(p.bias), p.hidden, p.input_stride, p.out_stride, p.eps);
}

void check_dtype(DType dtype, const char* op) {
  check_arg(!is_float8(dtype), std::string(op) + ": float8 is not supported");
}

}  // namespace

void rms_norm_cuda(const RmsNormParams& p, void* stream_handle) {
  check_dtype(p.dtype, "rms_norm");
  check_arg(p.num_tokens >= 0 && p.hidden > 0, "rms_norm: bad sizes");
  if (p.num_tokens == 0) return;
  auto stream = static_cast<cudaStream_t>(stream_handle);
  const unsigned grid = static_cast<unsigned>(p.num_tokens);
  switch (p.dtype) {
    case DType::kFloat32:
      rms_norm_kernel<float><<<grid, kThreads, 0, stream>>>(
          static_cast<float*>(p.out), static_cast<const float*>(p.input),
          static_cast<const float*>(p.weight), p.hidden, p.input_stride, p.out_stride, p.eps);
      break;
    case DType::kFloat16:
      rms_norm_kernel<half_t><<<grid, kThreads, 0, stream>>>(
          static_cast<half_t*>(p.out), static_cast<const half_t*>(p.input),
          static_cast<const half_t*>(p.weight), p.hidden, p.input_stride, p.out_stride, p.eps);
      break;
    default:
      rms_norm_kernel<bf16_t><<<grid, kThreads, 0, stream>>>(
          static_cast<bf16_t*>(p.out), static_cast<const bf16_t*>(p.input),
          static_cast<const bf16_t*>(p.weight), p.hidden, p.input_stride, p.out_stride, p.eps);
      break;
  }
  check_launch("rms_norm");
}

void fused_add_rms_norm_cuda(const FusedAddRmsNormParams& p, void* stream_handle) {
  check_dtype(p.dtype, "fused_add_rms_norm");
  check_arg(p.num_tokens >= 0 && p.hidden > 0, "fused_add_rms_norm: bad sizes");
  if (p.num_tokens == 0) return;
  auto stream = static_cast<cudaStream_t>(stream_handle);
  const unsigned grid = static_cast<unsigned>(p.num_tokens);
  switch (p.dtype) {
    case DType::kFloat32:
      fused_add_rms_norm_kernel<float><<<grid, kThreads, 0, stream>>>(
          static_cast<float*>(p.input), static_cast<float*>(p.residual),
          static_cast<const float*>(p.weight), p.hidden, p.input_stride, p.residual_stride, p.eps);
      break;
    case DType::kFloat16:
      fused_add_rms_norm_kernel<half_t><<<grid, kThreads, 0, stream>>>(
          static_cast<half_t*>(p.input), static_cast<half_t*>(p.residual),
          static_cast<const half_t*>(p.weight), p.hidden, p.input_stride, p.residual_stride, p.eps);
      break;
    default:
      fused_add_rms_norm_kernel<bf16_t><<<grid, kThreads, 0, stream>>>(
          static_cast<bf16_t*>(p.input), static_cast<bf16_t*>(p.residual),
          static_cast<const bf16_t*>(p.weight), p.hidden, p.input_stride, p.residual_stride, p.eps);
      break;
  }
  check_launch("fused_add_rms_norm");
}

void layer_norm_cuda(const LayerNormParams& p, void* stream_handle) {
  check_dtype(p.dtype, "layer_norm");
  check_arg(p.num_tokens >= 0 && p.hidden > 0, "layer_norm: bad sizes");
  if (p.num_tokens == 0) return;
  auto stream = static_cast<cudaStream_t>(stream_handle);
  switch (p.dtype) {
    case DType::kFloat32:
      launch_layer_norm<float>(p, stream);
      break;
    case DType::kFloat16:
      launch_layer_norm<half_t>(p, stream);
      break;
    default:
      launch_layer_norm<bf16_t>(p, stream);
      break;
  }
  check_launch("layer_norm");
}

}  // namespace fastllm::kernels
