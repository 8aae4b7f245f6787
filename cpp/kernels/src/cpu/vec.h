// Row primitives of the CPU kernels, picked once at run time: AVX2+FMA+F16C when the CPU has them
// (vec_avx2.cpp, the only file compiled with -mavx2 -mfma -mf16c), portable scalar code otherwise.
// With AVX-512F/BW/VL (and FASTLLM_CPU_ISA allowing avx512), the AVX2 table with the attention
// kernels of vec_avx512.cpp.
#pragma once

#include <cstdint>

#include "fastllm/kernels/common.h"

namespace fastllm::kernels::cpu {

struct VecOps {
  const char* name;
  // dst[i] = float(src[i]) * scale (scale matters for fp8 only; pass 1 otherwise).
  void (*load)(const void* src, DType dtype, float* dst, int64_t n, float scale);
  // dst[i] = dtype(src[i] * inv_scale), round to nearest even (fp8: saturating).
  void (*store)(const float* src, DType dtype, void* dst, int64_t n, float inv_scale);
  float (*dot)(const float* a, const float* b, int64_t n);
  // out[r * out_stride] = dot(rows + r * n, x) for r < num_rows.
  void (*dots)(const float* x, const float* rows, int64_t num_rows, int64_t n, float* out,
               int64_t out_stride);
  // acc[r * n + i] += weights[r * weight_stride] * x[i] for r < num_rows (rows with weight 0
  // skipped).
  void (*axpys)(const float* x, const float* weights, int64_t weight_stride, int64_t num_rows,
                float* acc, int64_t n);
  void (*scale)(float a, float* x, int64_t n);
  float (*sum_squares)(const float* x, int64_t n);
  // y[i] = x[i] * s * w[i]
  void (*mul_scaled)(const float* x, const float* w, float s, float* y, int64_t n);
  float (*max)(const float* x, int64_t n);
  // x[i] = exp(x[i] - shift) (exactly 0 for -inf), returns the sum.
  float (*exp_shift_sum)(float* x, int64_t n, float shift);
  // out[i] = silu(gate[i]) * up[i]
  void (*silu_mul)(const float* gate, const float* up, float* out, int64_t n);
  // Attention scores of `rows` float query rows q[rows][d] against n cache rows of dtype at
  // keys, keys + key_stride, ... (elements): scores[r * score_stride + j] = q[r] . key[j].
  void (*attn_scores)(const void* keys, int64_t key_stride, DType dtype, int64_t n, const float* q,
                      int64_t rows, int64_t d, float* scores, int64_t score_stride);
  // acc[r * d + i] += sum_j weights[r * weight_stride + j] * value[j][i] over n cache rows.
  void (*attn_values)(const void* values, int64_t value_stride, DType dtype, int64_t n,
                      const float* weights, int64_t weight_stride, int64_t rows, int64_t d,
                      float* acc);
  // Index of the first largest value (std::max_element's, for x without NaN); n > 0.
  int64_t (*argmax)(const float* x, int64_t n);
  // x[i] += residual[i], and residual[i] = the new x[i].
  void (*add_residual)(float* x, float* residual, int64_t n);
  // Rotates each pair (x[i], x[i + half]) by the angle of cos[i], sin[i] (neox-style RoPE).
  void (*rotate_half)(float* x, const float* cos, const float* sin, int64_t half);
};

// Instruction-set levels of the CPU dispatchers, each including the ones before it.
enum class IsaLevel { kScalar, kAvx2, kAvxVnni, kAvx512 };

// The highest level any CPU dispatcher may pick, from env FASTLLM_CPU_ISA (scalar, avx2, avx_vnni,
// avx512; unset or empty: avx512, i.e. no cap), read at each call. A dispatcher still picks only
// what the CPU has, so a cap above the CPU's level is the CPU's level. Any other value throws
// KernelArgumentError naming the variable and the accepted values.
IsaLevel isa_cap();

const VecOps& vec_ops();
const VecOps& scalar_vec_ops();
// Null when the library was built without the AVX2 file (non-x86 targets).
const VecOps* avx2_vec_ops();
// The AVX2 table with AVX-512 attn_scores / attn_values (its name stays "avx2": cpu_isa() names
// the row primitives, attention_cpu_isa() the attention kernels). Null when the library was built
// without the AVX-512 file.
const VecOps* avx512_vec_ops();

// Thread-local float scratch of at least n elements; `slot` selects one of a few independent
// buffers.
float* scratch(int slot, int64_t n);

}  // namespace fastllm::kernels::cpu
