// FP8 weight GEMM on CUDA (fp8_gemm.h): one warp per output element; lanes stride over the row
// 16 weight bytes (one 128-bit load) at a time, convert them with dtype_convert.h's bit
// arithmetic (no FP8 instructions needed, so it builds for every architecture; sm_89+ could use
// the hardware conversion) and accumulate in float; a warp reduction finishes the dot product.
#include "fastllm/kernels/cuda_compat.cuh"
#include "fastllm/kernels/dtype_convert.h"
#include "fastllm/kernels/fp8_gemm.h"

namespace fastllm::kernels {
namespace {

using namespace gpu;

constexpr int kWarpsPerBlock = 8;

__global__ void fp8_gemm_kernel(float* __restrict__ out, const float* __restrict__ input,
                                const uint8_t* __restrict__ weight, const float* __restrict__ scale,
                                const float* __restrict__ bias, int64_t n, int64_t k,
                                int64_t input_stride, int64_t out_stride) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (col >= n) return;
  const float* x = input + blockIdx.y * input_stride;
  const uint8_t* w = weight + col * k;
  float acc = 0.0f;
  const bool aligned = (k % 16 == 0) && (reinterpret_cast<uintptr_t>(w) % 16 == 0);
  if (aligned) {
    for (int64_t i = static_cast<int64_t>(lane) * 16; i < k; i += kWarpSize * 16) {
      const uint4 packed = *reinterpret_cast<const uint4*>(w + i);
      const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
#pragma unroll
      for (int j = 0; j < 16; ++j)
        acc += fp8e4m3_to_float(static_cast<uint8_t>(words[j / 4] >> (8 * (j % 4)))) * x[i + j];
    }
  } else {
    for (int64_t i = lane; i < k; i += kWarpSize) acc += fp8e4m3_to_float(w[i]) * x[i];
  }
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) acc += shfl_xor(acc, offset);
  if (lane == 0)
    out[blockIdx.y * out_stride + col] = acc * scale[col] + (bias != nullptr ? bias[col] : 0.0f);
}

}  // namespace

void fp8_gemm_cuda(const Fp8GemmParams& p, void* stream_handle) {
  check_fp8_gemm_params(p);
  check_arg(p.m <= 65535, "fp8_gemm: at most 65535 rows of x per call on CUDA");
  if (p.m == 0 || p.n == 0) return;
  const dim3 grid(static_cast<unsigned>((p.n + kWarpsPerBlock - 1) / kWarpsPerBlock),
                  static_cast<unsigned>(p.m));
  fp8_gemm_kernel<<<grid, kWarpsPerBlock * kWarpSize, 0,
                    static_cast<cudaStream_t>(stream_handle)>>>(
      p.out, p.input, p.weight, p.scale, p.bias, p.n, p.k, p.input_stride, p.out_stride);
  check_launch("fp8_gemm");
}

}  // namespace fastllm::kernels
