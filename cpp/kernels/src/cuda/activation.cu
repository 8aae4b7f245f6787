// CUDA activations (gated, plain) and the logit softcap: grid (row, chunk of d), one element per
// thread.
#include "fastllm/kernels/activation.h"
#include "fastllm/kernels/cuda_compat.cuh"

namespace fastllm::kernels {
namespace {

using namespace gpu;

constexpr int kThreads = 256;

__device__ __forceinline__ float apply(int activation, float x) {
  if (activation == static_cast<int>(Activation::kSilu)) return x / (1.0f + expf(-x));
  if (activation == static_cast<int>(Activation::kGeluTanh))
    return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
  if (activation == static_cast<int>(Activation::kGelu))
    return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
  return x > 0.0f ? x : 0.0f;  // kRelu
}

template <typename T>
__global__ void activation_kernel(T* __restrict__ out, const T* __restrict__ input, int64_t d,
                                  int64_t in_stride, int64_t out_stride, int activation) {
  const int64_t j = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (j >= d) return;
  out[blockIdx.x * out_stride + j] =
      from_float<T>(apply(activation, to_float(input[blockIdx.x * in_stride + j])));
}

template <typename T>
__global__ void softcap_kernel(T* __restrict__ data, int64_t d, int64_t stride, float cap) {
  const int64_t j = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (j >= d) return;
  T* x = data + blockIdx.x * stride + j;
  *x = from_float<T>(cap * tanhf(to_float(*x) / cap));
}

template <typename T>
__global__ void act_and_mul_kernel(T* __restrict__ out, const T* __restrict__ input, int64_t d,
                                   int64_t in_stride, int64_t out_stride, int activation) {
  const int64_t j = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (j >= d) return;
  const T* row = input + blockIdx.x * in_stride;
  const float x = to_float(row[j]);
  const float up = to_float(row[j + d]);
  out[blockIdx.x * out_stride + j] = from_float<T>(apply(activation, x) * up);
}

template <typename T>
void launch(const ActAndMulParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.num_tokens),
                  static_cast<unsigned>((p.d + kThreads - 1) / kThreads));
  act_and_mul_kernel<T>
      <<<grid, kThreads, 0, stream>>>(static_cast<T*>(p.out), static_cast<const T*>(p.input), p.d,
                                      p.input_stride, p.out_stride, static_cast<int>(p.activation));
  check_launch("act_and_mul");
}

dim3 grid_of(int64_t rows, int64_t d) {
  return dim3(static_cast<unsigned>(rows), static_cast<unsigned>((d + kThreads - 1) / kThreads));
}

template <typename T>
void launch_activation(const ActivationParams& p, cudaStream_t stream) {
  activation_kernel<T><<<grid_of(p.num_tokens, p.d), kThreads, 0, stream>>>(
      static_cast<T*>(p.out), static_cast<const T*>(p.input), p.d, p.input_stride, p.out_stride,
      static_cast<int>(p.activation));
}

template <typename T>
void launch_softcap(const SoftcapParams& p, cudaStream_t stream) {
  softcap_kernel<T><<<grid_of(p.num_tokens, p.d), kThreads, 0, stream>>>(static_cast<T*>(p.data),
                                                                         p.d, p.stride, p.cap);
}

}  // namespace

void activation_cuda(const ActivationParams& p, void* stream_handle) {
  check_arg(p.num_tokens >= 0 && p.d > 0, "activation: bad sizes");
  check_arg(!is_float8(p.dtype), "activation: float8 is not supported");
  if (p.num_tokens == 0) return;
  auto stream = static_cast<cudaStream_t>(stream_handle);
  switch (p.dtype) {
    case DType::kFloat32:
      launch_activation<float>(p, stream);
      break;
    case DType::kFloat16:
      launch_activation<half_t>(p, stream);
      break;
    default:
      launch_activation<bf16_t>(p, stream);
      break;
  }
  check_launch("activation");
}

void softcap_cuda(const SoftcapParams& p, void* stream_handle) {
  check_arg(p.num_tokens >= 0 && p.d > 0, "softcap: bad sizes");
  check_arg(p.cap > 0.0f, "softcap: cap must be > 0");
  check_arg(!is_float8(p.dtype), "softcap: float8 is not supported");
  if (p.num_tokens == 0) return;
  auto stream = static_cast<cudaStream_t>(stream_handle);
  switch (p.dtype) {
    case DType::kFloat32:
      launch_softcap<float>(p, stream);
      break;
    case DType::kFloat16:
      launch_softcap<half_t>(p, stream);
      break;
    default:
      launch_softcap<bf16_t>(p, stream);
      break;
  }
  check_launch("softcap");
}

void act_and_mul_cuda(const ActAndMulParams& p, void* stream_handle) {
  check_arg(p.num_tokens >= 0 && p.d > 0, "act_and_mul: bad sizes");
  check_arg(!is_float8(p.dtype), "act_and_mul: float8 is not supported");
  if (p.num_tokens == 0) return;
  auto stream = static_cast<cudaStream_t>(stream_handle);
  switch (p.dtype) {
    case DType::kFloat32:
      return launch<float>(p, stream);
    case DType::kFloat16:
      return launch<half_t>(p, stream);
    default:
      return launch<bf16_t>(p, stream);
  }
}

}  // namespace fastllm::kernels
