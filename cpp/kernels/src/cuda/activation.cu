// CUDA gated activations: grid (row, chunk of d), one element per thread.
#include "fastllm/kernels/activation.h"
#include "fastllm/kernels/cuda_compat.cuh"

namespace fastllm::kernels {
namespace {

using namespace gpu;

constexpr int kThreads = 256;

template <typename T>
__global__ void act_and_mul_kernel(T* __restrict__ out, const T* __restrict__ input, int64_t d,
                                   int64_t in_stride, int64_t out_stride, int activation) {
  const int64_t j = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (j >= d) return;
  const T* row = input + blockIdx.x * in_stride;
  const float x = to_float(row[j]);
  const float up = to_float(row[j + d]);
  float a;
  if (activation == static_cast<int>(Activation::kSilu)) {
    a = x / (1.0f + expf(-x));
  } else if (activation == static_cast<int>(Activation::kGeluTanh)) {
    a = 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
  } else {
    a = 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
  }
  out[blockIdx.x * out_stride + j] = from_float<T>(a * up);
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

}  // namespace

void act_and_mul_cuda(const ActAndMulParams& p, void* stream_handle) {
  check_arg(p.num_tokens >= 0 && p.d > 0, "act_and_mul: bad sizes");
  check_arg(p.dtype != DType::kFloat8E4M3, "act_and_mul: float8 is not supported");
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
