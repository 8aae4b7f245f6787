// CUDA/HIP portability for the kernels under src/cuda: the same .cu sources build with nvcc and
// with hipcc (-x hip). Runtime names are spelled the CUDA way and mapped to HIP here. Kernels use
// logical 32-lane warps: on 64-wide AMD wavefronts the shuffles below work within 32-lane halves.
#pragma once

#include <stdexcept>
#include <string>

#if defined(__HIPCC__) || defined(__HIP_PLATFORM_AMD__)
#include <hip/hip_fp16.h>
#include <hip/hip_runtime.h>
#define FASTLLM_HIP 1
#define cudaError_t hipError_t
#define cudaSuccess hipSuccess
#define cudaStream_t hipStream_t
#define cudaGetLastError hipGetLastError
#define cudaGetErrorString hipGetErrorString
#define cudaMemcpyAsync hipMemcpyAsync
#define cudaMallocAsync hipMallocAsync
#define cudaFreeAsync hipFreeAsync
#define cudaMemcpyDefault hipMemcpyDefault
#define cudaFuncSetAttribute hipFuncSetAttribute
#define cudaFuncAttributeMaxDynamicSharedMemorySize hipFuncAttributeMaxDynamicSharedMemorySize
#else
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include "fastllm/kernels/dtype_convert.h"

namespace fastllm::kernels::gpu {

constexpr int kWarpSize = 32;  // logical warp

// Throws std::runtime_error when the last launch (or runtime call) failed.
inline void check_launch(const char* what) {
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(error));
}

inline void check_call(cudaError_t error, const char* what) {
  if (error != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(error));
}

template <typename T>
__device__ __forceinline__ T shfl_xor(T value, int mask) {
#ifdef FASTLLM_HIP
  return __shfl_xor(value, mask, kWarpSize);
#else
  return __shfl_xor_sync(0xffffffffu, value, mask, kWarpSize);
#endif
}

template <typename T>
__device__ __forceinline__ T shfl(T value, int lane) {
#ifdef FASTLLM_HIP
  return __shfl(value, lane, kWarpSize);
#else
  return __shfl_sync(0xffffffffu, value, lane, kWarpSize);
#endif
}

// ---- storage types ----------------------------------------------------------------------------
// Tags over the raw bits, so the kernels need neither cuda_bf16.h nor hip_bf16.h.
struct half_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};
struct fp8_t {  // e4m3fn
  uint8_t bits;
};
struct fp8e5m2_t {
  uint8_t bits;
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(half_t x) {
  return __half2float(__ushort_as_half(x.bits));
}
__device__ __forceinline__ float to_float(bf16_t x) { return bf16_to_float(x.bits); }
__device__ __forceinline__ float to_float(fp8_t x) { return fp8e4m3_to_float(x.bits); }
__device__ __forceinline__ float to_float(fp8e5m2_t x) { return fp8e5m2_to_float(x.bits); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ half_t from_float<half_t>(float x) {
  return half_t{__half_as_ushort(__float2half_rn(x))};
}
template <>
__device__ __forceinline__ bf16_t from_float<bf16_t>(float x) {
  return bf16_t{float_to_bf16(x)};
}
template <>
__device__ __forceinline__ fp8_t from_float<fp8_t>(float x) {
  return fp8_t{float_to_fp8e4m3(x)};
}
template <>
__device__ __forceinline__ fp8e5m2_t from_float<fp8e5m2_t>(float x) {
  return fp8e5m2_t{float_to_fp8e5m2(x)};
}

// Elements of T in one 16-byte word, and their conversion to float.
template <typename T>
struct Chunk {
  static constexpr int kElems = 16 / sizeof(T);
};

__device__ __forceinline__ void chunk_to_float(const uint4& w, float* out, float) {
  out[0] = __uint_as_float(w.x);
  out[1] = __uint_as_float(w.y);
  out[2] = __uint_as_float(w.z);
  out[3] = __uint_as_float(w.w);
}
__device__ __forceinline__ void chunk_to_float(const uint4& w, float* out, half_t) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(words[i] & 0xffffu)));
    out[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(words[i] >> 16)));
  }
}
__device__ __forceinline__ void chunk_to_float(const uint4& w, float* out, bf16_t) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __uint_as_float(words[i] << 16);
    out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ void chunk_to_float(const uint4& w, float* out, fp8_t) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int b = 0; b < 4; ++b)
      out[4 * i + b] = fp8e4m3_to_float(static_cast<uint8_t>((words[i] >> (8 * b)) & 0xffu));
  }
}
// e5m2 bytes are float16 high bytes: two codes of a 16-bit lane pair become two halves.
__device__ __forceinline__ void chunk_to_float(const uint4& w, float* out, fp8e5m2_t) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const auto h = static_cast<unsigned short>(((words[i] >> (8 * b)) & 0xffu) << 8);
      out[4 * i + b] = __half2float(__ushort_as_half(h));
    }
  }
}

// ---- reductions -------------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v += shfl_xor(v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v = fmaxf(v, shfl_xor(v, o));
  return v;
}

// Block-wide reductions; every thread gets the result. scratch: 32 floats of shared memory.
// Blocks are a multiple of 32 threads, at most 1024.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) total += scratch[w];
  return total;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  v = warp_max(v);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  float m = scratch[0];
  for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w) m = fmaxf(m, scratch[w]);
  return m;
}

}  // namespace fastllm::kernels::gpu
