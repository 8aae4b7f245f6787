// The CPU LoRA micro-kernels with AVX2 + FMA (built with -mavx2 -mfma; run only when the launcher
// saw those features at run time).
#include <immintrin.h>

#include <cmath>

#include "lora_impl.h"

namespace fastllm::kernels::cpu {
namespace {

struct Avx2 {
  using Reg = __m256;
  static constexpr int64_t kWidth = 8;
  static constexpr int kRegs = 16;
  static Reg zero() { return _mm256_setzero_ps(); }
  static Reg set1(float v) { return _mm256_set1_ps(v); }
  static Reg load(const float* p) { return _mm256_loadu_ps(p); }
  static Reg load_partial(const float* p, int n) {
    // Masked-off lanes read as 0 and are never touched, so the tail of a row can end a page.
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lanes));
  }
  static float to_float(uint16_t h) { return _cvtsh_ss(h); }
  static Reg load(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static Reg load_partial(const uint16_t* p, int n) {
    alignas(16) uint16_t tmp[8] = {};
    for (int i = 0; i < n; ++i) tmp[i] = p[i];
    return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(tmp)));
  }
  static void store(float* p, Reg v) { _mm256_storeu_ps(p, v); }
  static Reg fma(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  static float fma1(float a, float b, float c) { return std::fma(a, b, c); }
  static float sum(Reg v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
  }
};

}  // namespace
}  // namespace fastllm::kernels::cpu

#include "lora_simd.h"

namespace fastllm::kernels::cpu {

const LoraKernels* avx2_lora_kernels() {
  static const LoraKernels kernels = make_lora_kernels<Avx2>("avx2");
  return &kernels;
}

}  // namespace fastllm::kernels::cpu
