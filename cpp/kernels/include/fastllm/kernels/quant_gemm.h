// Linear layers over weights kept in GGUF (ggml) block encodings: out[m][n] = x[m] . W[n] (+ bias),
// with x float32 [m][k] and W [n][k] stored row by row as whole blocks.
//
// Block layouts (little endian, fp16 = IEEE half):
//   Q8_0  32 values,  34 bytes | d fp16 | q int8[32]             w = q * d
//   Q4_0  32 values,  18 bytes | d fp16 | nibbles u8[16]         w = (nibble - 8) * d
//   Q4_1  32 values,  20 bytes | d fp16 | m fp16 | nibbles[16]   w = nibble * d + m
//   Q4_K 256 values, 144 bytes | d, dmin fp16 | 12 bytes of 6-bit scales/mins | nibbles[128]
//   Q6_K 256 values, 210 bytes | low nibbles[128] | high 2 bits[64] | scales int8[16] | d fp16
// In the 32-value formats byte j holds value j in its low nibble and value j + 16 in its high one.
//
// CPU fast path (Q8_0/Q4_0/Q4_1): x is quantized per 32 values to int8 with one float scale (like
// the weights), and each block pair becomes an integer dot product scaled once; parallel over
// slices of n, tiles of 4 rows of x inside each slice so a weight slice is read from memory once.
// The K-quants dequantize a weight row to float and use float dot products.
#pragma once

#include <cstdint>

#include "fastllm/kernels/common.h"

namespace fastllm::kernels {

// Values match ggml's type ids, so the Python side can pass GGUF type numbers straight through.
enum class QuantType : int32_t { kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8, kQ4_K = 12, kQ6_K = 14 };

// Values per block of type (32 or 256); 0 for an unknown type.
int64_t quant_block_values(QuantType type);

// Bytes per block of type; 0 for an unknown type.
int64_t quant_block_bytes(QuantType type);

// "Q8_0", "Q4_0", ... for messages.
const char* quant_type_name(QuantType type);

struct QuantGemmParams {
  float* out = nullptr;          // [m][n], rows out_stride floats apart
  const float* input = nullptr;  // [m][k], rows input_stride floats apart
  const void* weight = nullptr;  // [n] rows of k / block_values blocks, densely packed
  const float* bias = nullptr;   // optional [n]
  int64_t m = 0;
  int64_t n = 0;
  int64_t k = 0;  // a multiple of the type's block_values
  int64_t input_stride = 0;
  int64_t out_stride = 0;
  QuantType type = QuantType::kQ8_0;
  // False runs the portable scalar code even on an AVX2 CPU (tests compare the two).
  bool allow_simd = true;
};

void quant_gemm_cpu(const QuantGemmParams& params);

// Name of the code path quant_gemm_cpu takes for the 32-value types: "avx512_vnni" (3+ rows of x
// in AVX-512 VNNI, fewer rows as "avx_vnni"), "avx_vnni", "avx2" or "scalar". Env
// FASTLLM_QUANT_GEMM_ISA=avx2|avx_vnni, read at the first call, caps the choice.
const char* quant_gemm_cpu_isa();

#ifdef FASTLLM_WITH_CUDA
// Dequantizes in the kernel and accumulates in float (no activation quantization).
void quant_gemm_cuda(const QuantGemmParams& params, void* stream);
#endif

}  // namespace fastllm::kernels
