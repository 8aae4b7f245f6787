// Internals of the CPU LoRA kernel: the per-ISA micro-kernels (lora_simd.h instantiated in
// lora.cpp for plain C++, lora_avx2.cpp and lora_avx512.cpp with their instruction sets) and the
// table the launcher (lora.cpp) picks at run time.
#pragma once

#include <cstdint>

namespace fastllm::kernels::cpu {

struct LoraKernels {
  const char* name;
  // h[i * h_stride + r] = x_i . a[r] for i < count and r in [r0, r1), where x_i is the input row
  // input + tokens[i] * input_stride (k values) and a[r] the row a + r * k.
  void (*shrink)(const float* input, int64_t input_stride, const int64_t* tokens, int64_t count,
                 const void* a, int64_t k, int64_t r0, int64_t r1, float* h, int64_t h_stride);
  // out_i[j] += scale * (h_i . b[j]) for i < count and j in [c0, c1), where out_i is the row
  // out + tokens[i] * out_stride, h_i the rank values at h + i * h_stride and b[j] the row
  // b + j * rank; or, with b_t_stride > 0, b already transposed: b[j][r] at b + r * b_t_stride
  // + j. bt is scratch of rank * kLoraColumnTile floats (unused when b comes transposed).
  void (*expand)(float* out, int64_t out_stride, const int64_t* tokens, int64_t count,
                 const float* h, int64_t h_stride, const void* b, int64_t rank, int64_t c0,
                 int64_t c1, float scale, float* bt, int64_t b_t_stride);
  // The same with float16 A and B (uint16_t bits), converted as they are read.
  decltype(shrink) shrink_f16;
  decltype(expand) expand_f16;
};

// Columns of B transposed at a time by expand (a multiple of every vector width).
constexpr int64_t kLoraColumnTile = 128;

const LoraKernels& scalar_lora_kernels();
// Null when the library was built without the file (non-x86 targets, or a compiler without the
// flags).
const LoraKernels* avx2_lora_kernels();
const LoraKernels* avx512_lora_kernels();

}  // namespace fastllm::kernels::cpu
