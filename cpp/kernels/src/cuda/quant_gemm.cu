// CUDA quantized GEMM: one warp per output element (row m of x, weight row n); each lane takes
// 32-value sub-blocks of the weight row in turn, dequantizes them in registers and accumulates in
// float against x; a warp reduction finishes the dot product. Meant for decode-sized m (a GEMV per
// row of x); weights stay in their GGUF encoding in device memory.
#include "fastllm/kernels/cuda_compat.cuh"
#include "fastllm/kernels/quant_gemm.h"

namespace fastllm::kernels {
namespace {

using namespace gpu;

constexpr int kWarpsPerBlock = 8;

__device__ __forceinline__ float half_at(const uint8_t* p) {
  return half_to_float(static_cast<uint16_t>(p[0] | (p[1] << 8)));
}

__device__ __forceinline__ void q4_k_scale_min(const uint8_t* s, int j, int* scale, int* min) {
  if (j < 4) {
    *scale = s[j] & 63;
    *min = s[j + 4] & 63;
  } else {
    *scale = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    *min = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Dot product of 32-value sub-block `sub` of a weight row with the matching 32 values of x.
template <QuantType kType>
__device__ __forceinline__ float sub_block_dot(const uint8_t* row, int64_t sub, const float* x) {
  float acc = 0.0f;
  if constexpr (kType == QuantType::kQ8_0) {
    const uint8_t* blk = row + sub * 34;
    const float d = half_at(blk);
    const auto* q = reinterpret_cast<const int8_t*>(blk + 2);
#pragma unroll
    for (int i = 0; i < 32; ++i) acc += static_cast<float>(q[i]) * x[i];
    return acc * d;
  } else if constexpr (kType == QuantType::kQ4_0 || kType == QuantType::kQ4_1) {
    constexpr int bytes = kType == QuantType::kQ4_0 ? 18 : 20;
    const uint8_t* blk = row + sub * bytes;
    const float d = half_at(blk);
    const float m = kType == QuantType::kQ4_0 ? -8.0f * d : half_at(blk + 2);
    const uint8_t* q = blk + (kType == QuantType::kQ4_0 ? 2 : 4);
    float xsum = 0.0f;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      acc += static_cast<float>(q[i] & 0x0F) * x[i] + static_cast<float>(q[i] >> 4) * x[i + 16];
      xsum += x[i] + x[i + 16];
    }
    return acc * d + xsum * m;
  } else if constexpr (kType == QuantType::kQ4_K) {
    const uint8_t* blk = row + (sub / 8) * 144;
    const int j = static_cast<int>(sub % 8);
    int sc, mn;
    q4_k_scale_min(blk + 4, j, &sc, &mn);
    const float d = half_at(blk) * sc;
    const float m = half_at(blk + 2) * mn;
    const uint8_t* q = blk + 16 + 32 * (j / 2);
    const int shift = 4 * (j % 2);
    float xsum = 0.0f;
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      acc += static_cast<float>((q[i] >> shift) & 0x0F) * x[i];
      xsum += x[i];
    }
    return acc * d - xsum * m;
  } else {  // Q6_K: sub-block j of 32 = half j / 4, run j % 4 of that half
    const uint8_t* blk = row + (sub / 8) * 210;
    const int j = static_cast<int>(sub % 8);
    const int half = j / 4, run = j % 4;
    const uint8_t* ql = blk + 64 * half + 32 * (run % 2);
    const uint8_t* qh = blk + 128 + 32 * half;
    const auto* sc = reinterpret_cast<const int8_t*>(blk + 192) + 8 * half + 2 * run;
    const float d = half_at(blk + 208);
    const int low_shift = 4 * (run / 2);
    const int high_shift = 2 * run;
    float acc_hi = 0.0f;
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const int q = (((ql[i] >> low_shift) & 0x0F) | (((qh[i] >> high_shift) & 3) << 4)) - 32;
      if (i < 16)
        acc += static_cast<float>(q) * x[i];
      else
        acc_hi += static_cast<float>(q) * x[i];
    }
    return d * (sc[0] * acc + sc[1] * acc_hi);
  }
}

template <QuantType kType>
__global__ void quant_gemm_kernel(float* __restrict__ out, const float* __restrict__ input,
                                  const uint8_t* __restrict__ weight,
                                  const float* __restrict__ bias, int64_t n, int64_t k,
                                  int64_t row_bytes, int64_t input_stride, int64_t out_stride) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (col >= n) return;
  const int64_t r = blockIdx.y;
  const float* x = input + r * input_stride;
  const uint8_t* row = weight + col * row_bytes;
  float acc = 0.0f;
  for (int64_t sub = lane; sub < k / 32; sub += kWarpSize)
    acc += sub_block_dot<kType>(row, sub, x + sub * 32);
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) acc += shfl_xor(acc, offset);
  if (lane == 0) out[r * out_stride + col] = acc + (bias != nullptr ? bias[col] : 0.0f);
}

template <QuantType kType>
void launch(const QuantGemmParams& p, cudaStream_t stream) {
  const int64_t row_bytes = p.k / quant_block_values(p.type) * quant_block_bytes(p.type);
  const dim3 grid(static_cast<unsigned>((p.n + kWarpsPerBlock - 1) / kWarpsPerBlock),
                  static_cast<unsigned>(p.m));
  quant_gemm_kernel<kType><<<grid, kWarpsPerBlock * kWarpSize, 0, stream>>>(
      p.out, p.input, static_cast<const uint8_t*>(p.weight), p.bias, p.n, p.k, row_bytes,
      p.input_stride, p.out_stride);
  check_launch("quant_gemm");
}

}  // namespace

void quant_gemm_cuda(const QuantGemmParams& p, void* stream_handle) {
  const int64_t values = quant_block_values(p.type);
  check_arg(values > 0, "quant_gemm: unknown quantization type");
  check_arg(p.m >= 0 && p.n >= 0 && p.k > 0 && p.k % values == 0, "quant_gemm: bad sizes");
  check_arg(p.m <= 65535, "quant_gemm: at most 65535 rows of x per call on CUDA");
  check_arg(quant_row_group(p.type) == 1 && p.type != QuantType::kF32,
            std::string("quant_gemm: ") + quant_type_name(p.type) + " is a CPU layout");
  if (p.m == 0 || p.n == 0) return;
  auto stream = static_cast<cudaStream_t>(stream_handle);
  switch (p.type) {
    case QuantType::kQ8_0:
      return launch<QuantType::kQ8_0>(p, stream);
    case QuantType::kQ4_0:
      return launch<QuantType::kQ4_0>(p, stream);
    case QuantType::kQ4_1:
      return launch<QuantType::kQ4_1>(p, stream);
    case QuantType::kQ4_K:
      return launch<QuantType::kQ4_K>(p, stream);
    case QuantType::kQ6_K:
      return launch<QuantType::kQ6_K>(p, stream);
  }
}

}  // namespace fastllm::kernels
