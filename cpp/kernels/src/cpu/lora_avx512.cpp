// The CPU LoRA micro-kernels with AVX-512F (built with -mavx512f -mfma; run only when the launcher
// saw AVX-512F at run time).
#include <immintrin.h>

#include <cmath>

#include "lora_impl.h"

namespace fastllm::kernels::cpu {
namespace {

struct Avx512 {
  using Reg = __m512;
  static constexpr int64_t kWidth = 16;
  static constexpr int kRegs = 32;
  static Reg zero() { return _mm512_setzero_ps(); }
  static Reg set1(float v) { return _mm512_set1_ps(v); }
  static Reg load(const float* p) { return _mm512_loadu_ps(p); }
  static Reg load_partial(const float* p, int n) {
    // Masked-off lanes read as 0 and are never touched, so the tail of a row can end a page.
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), p);
  }
  static float to_float(uint16_t h) { return _cvtsh_ss(h); }
  static Reg load(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static Reg load_partial(const uint16_t* p, int n) {
    alignas(32) uint16_t tmp[16] = {};
    for (int i = 0; i < n; ++i) tmp[i] = p[i];
    return _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(tmp)));
  }
  static void store(float* p, Reg v) { _mm512_storeu_ps(p, v); }
  static Reg fma(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  static float fma1(float a, float b, float c) { return std::fma(a, b, c); }
  static float sum(Reg v) {
    // Halves folded in a fixed order (the same for every call).
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
  }
};

}  // namespace
}  // namespace fastllm::kernels::cpu

#include "lora_simd.h"

namespace fastllm::kernels::cpu {

const LoraKernels* avx512_lora_kernels() {
  static const LoraKernels kernels = make_lora_kernels<Avx512>("avx512");
  return &kernels;
}

}  // namespace fastllm::kernels::cpu
