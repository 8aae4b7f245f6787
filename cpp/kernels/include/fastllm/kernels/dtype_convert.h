// Bit-exact scalar conversions between float and the 16/8-bit storage types, usable on the host
// and (through FASTLLM_HOST_DEVICE) in CUDA/HIP device code, so CPU and GPU round identically.
// All conversions from float round to nearest even; float -> e4m3 saturates to +-448 and
// float -> e5m2 to +-57344 (infinities too: a KV cache holds no inf), NaN stays NaN.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__HIPCC__)
#include <hip/hip_runtime.h>
#define FASTLLM_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__CUDACC__)
#define FASTLLM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTLLM_HOST_DEVICE inline
#endif

namespace fastllm::kernels {

FASTLLM_HOST_DEVICE uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

FASTLLM_HOST_DEVICE float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

FASTLLM_HOST_DEVICE float bf16_to_float(uint16_t h) { return bits_float(uint32_t(h) << 16); }

FASTLLM_HOST_DEVICE uint16_t float_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

FASTLLM_HOST_DEVICE float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    // Subnormal (or zero): mantissa * 2^-24 is exact in float.
    const float magnitude = float(mantissa) * 5.9604644775390625e-08f;
    return bits_float(sign | float_bits(magnitude));
  }
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

FASTLLM_HOST_DEVICE uint16_t float_to_half(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);   // NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: infinity
  if (a < 0x38800000u) {
    // Result is subnormal in half: round a * 2^24 to an integer (exact float arithmetic + RNE).
    const float scaled = bits_float(a) * 16777216.0f;
    uint32_t q = uint32_t(scaled);
    const float rest = scaled - float(q);
    if (rest > 0.5f || (rest == 0.5f && (q & 1u))) ++q;
    return uint16_t(sign | q);
  }
  a += 0x0fffu + ((a >> 13) & 1u);
  return uint16_t(sign | (((a >> 23) - 112u) << 10) | ((a >> 13) & 0x3ffu));
}

FASTLLM_HOST_DEVICE float fp8e4m3_to_float(uint8_t c) {
  const uint32_t sign = uint32_t(c & 0x80u) << 24;
  const uint32_t exponent = (c >> 3) & 0xfu;
  const uint32_t mantissa = c & 0x7u;
  if (exponent == 0xf && mantissa == 0x7) return bits_float(0x7fc00000u | sign);
  if (exponent == 0) return bits_float(sign | float_bits(float(mantissa) * 0.001953125f));
  return bits_float(sign | ((exponent + 120u) << 23) | (mantissa << 20));
}

FASTLLM_HOST_DEVICE uint8_t float_to_fp8e4m3(float f) {
  const uint32_t u = float_bits(f);
  const uint8_t sign = uint8_t((u >> 24) & 0x80u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint8_t(sign | 0x7fu);
  if (a >= 0x43e00000u) return uint8_t(sign | 0x7eu);  // >= 448: saturate
  if (a < 0x3c800000u) {
    // Below 2^-6: subnormal e4m3, round a * 2^9 to an integer 0..8 (8 is the smallest normal).
    const float scaled = bits_float(a) * 512.0f;
    uint32_t q = uint32_t(scaled);
    const float rest = scaled - float(q);
    if (rest > 0.5f || (rest == 0.5f && (q & 1u))) ++q;
    return uint8_t(sign | q);
  }
  a += 0x7ffffu + ((a >> 20) & 1u);
  uint32_t code = (((a >> 23) - 120u) << 3) | ((a >> 20) & 0x7u);
  if (code > 0x7eu) code = 0x7eu;
  return uint8_t(sign | code);
}

// e5m2 is the top byte of a float16 (same sign, exponent and bias), so decoding is exact.
FASTLLM_HOST_DEVICE float fp8e5m2_to_float(uint8_t c) { return half_to_float(uint16_t(c) << 8); }

FASTLLM_HOST_DEVICE uint8_t float_to_fp8e5m2(float f) {
  const uint32_t u = float_bits(f);
  const uint8_t sign = uint8_t((u >> 24) & 0x80u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint8_t(sign | 0x7fu);
  if (a >= 0x47700000u) return uint8_t(sign | 0x7bu);  // rounds to >= 65536 (or inf): saturate
  if (a < 0x38800000u) {
    // Below 2^-14: subnormal e5m2, round a * 2^16 to an integer 0..4 (4 is the smallest normal).
    const float scaled = bits_float(a) * 65536.0f;
    uint32_t q = uint32_t(scaled);
    const float rest = scaled - float(q);
    if (rest > 0.5f || (rest == 0.5f && (q & 1u))) ++q;
    return uint8_t(sign | q);
  }
  // Rounding from the float's 23 mantissa bits to 2 (RNE); a carry moves into the exponent.
  a += 0xfffffu + ((a >> 21) & 1u);
  return uint8_t(sign | (((a >> 23) - 112u) << 2) | ((a >> 21) & 0x3u));
}

}  // namespace fastllm::kernels
