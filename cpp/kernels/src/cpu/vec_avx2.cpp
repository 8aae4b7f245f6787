// AVX2 + FMA + F16C row primitives. This is the only file built with -mavx2 -mfma -mf16c; nothing
// here runs unless vec_ops() saw those features at run time.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "fastllm/kernels/dtype_convert.h"
#include "vec.h"

namespace fastllm::kernels::cpu {
namespace {

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  const __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

inline float hmax(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  const __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_max_ps(lo, hi);
  lo = _mm_max_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_max_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// exp(x) for x <= 88 (Cody-Waite range reduction, degree-6 polynomial, ~1 ulp); 0 below -87.3,
// which also maps -inf to exactly 0.
inline __m256 exp256(__m256 x) {
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-87.33f), _CMP_GE_OQ);
  x = _mm256_min_ps(x, _mm256_set1_ps(88.37f));
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.33f));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}

// Eight e4m3 codes as floats without a table (a gather per 8 codes cost fp8 caches ~20 % of a
// 16-sequence decode step): the code's 4 exponent and 3 mantissa bits placed in a float16 read
// 2^(e-15) (1 + m/8), or for e = 0 float16's subnormal 2^-14 m/8, so one exact multiply by 2^8
// moves the bias from float16's 15 to e4m3's 7. Codes 0x7F / 0xFF are e4m3fn's NaN.
inline __m256 e4m3x8(const uint8_t* x) {
  const __m128i w = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(x)));
  const __m128i magnitude = _mm_and_si128(w, _mm_set1_epi16(0x7F));
  const __m128i sign = _mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x80)), 8);
  __m128i half = _mm_or_si128(_mm_slli_epi16(magnitude, 7), sign);
  const __m128i nan = _mm_cmpeq_epi16(magnitude, _mm_set1_epi16(0x7F));
  half = _mm_blendv_epi8(half, _mm_or_si128(sign, _mm_set1_epi16(0x7E00)), nan);
  return _mm256_mul_ps(_mm256_cvtph_ps(half), _mm256_set1_ps(256.0f));
}

// Eight e5m2 codes as floats: each code is the high byte of a float16, so F16C converts them
// exactly, without a table.
inline __m256 e5m2x8(const uint8_t* x) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(x));
  return _mm256_cvtph_ps(_mm_slli_epi16(_mm_cvtepu8_epi16(bytes), 8));
}

void load(const void* src, DType dtype, float* dst, int64_t n, float scale) {
  int64_t i = 0;
  const __m256 s = _mm256_set1_ps(scale);
  switch (dtype) {
    case DType::kFloat32: {
      const float* x = static_cast<const float*>(src);
      if (scale == 1.0f) {
        std::memcpy(dst, x, n * sizeof(float));
        return;
      }
      for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), s));
      for (; i < n; ++i) dst[i] = x[i] * scale;
      return;
    }
    case DType::kFloat16: {
      const uint16_t* x = static_cast<const uint16_t*>(src);
      for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i)));
        _mm256_storeu_ps(dst + i, _mm256_mul_ps(v, s));
      }
      for (; i < n; ++i) dst[i] = half_to_float(x[i]) * scale;
      return;
    }
    case DType::kBFloat16: {
      const uint16_t* x = static_cast<const uint16_t*>(src);
      for (; i + 8 <= n; i += 8) {
        const __m256i w =
            _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i)));
        const __m256 v = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
        _mm256_storeu_ps(dst + i, _mm256_mul_ps(v, s));
      }
      for (; i < n; ++i) dst[i] = bf16_to_float(x[i]) * scale;
      return;
    }
    case DType::kFloat8E4M3: {
      const uint8_t* x = static_cast<const uint8_t*>(src);
      for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_mul_ps(e4m3x8(x + i), s));
      for (; i < n; ++i) dst[i] = fp8e4m3_to_float(x[i]) * scale;
      return;
    }
    case DType::kFloat8E5M2: {
      const uint8_t* x = static_cast<const uint8_t*>(src);
      for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_mul_ps(e5m2x8(x + i), s));
      for (; i < n; ++i) dst[i] = fp8e5m2_to_float(x[i]) * scale;
      return;
    }
  }
}

void store(const float* src, DType dtype, void* dst, int64_t n, float inv_scale) {
  int64_t i = 0;
  const __m256 s = _mm256_set1_ps(inv_scale);
  switch (dtype) {
    case DType::kFloat32: {
      float* y = static_cast<float*>(dst);
      if (inv_scale == 1.0f) {
        std::memcpy(y, src, n * sizeof(float));
        return;
      }
      for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_loadu_ps(src + i), s));
      for (; i < n; ++i) y[i] = src[i] * inv_scale;
      return;
    }
    case DType::kFloat16: {
      uint16_t* y = static_cast<uint16_t*>(dst);
      for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm256_cvtps_ph(_mm256_mul_ps(_mm256_loadu_ps(src + i), s),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i), h);
      }
      for (; i < n; ++i) y[i] = float_to_half(src[i] * inv_scale);
      return;
    }
    case DType::kBFloat16: {
      uint16_t* y = static_cast<uint16_t*>(dst);
      for (; i < n; ++i) y[i] = float_to_bf16(src[i] * inv_scale);
      return;
    }
    case DType::kFloat8E4M3: {
      uint8_t* y = static_cast<uint8_t*>(dst);
      for (; i < n; ++i) y[i] = float_to_fp8e4m3(src[i] * inv_scale);
      return;
    }
    case DType::kFloat8E5M2: {
      uint8_t* y = static_cast<uint8_t*>(dst);
      for (; i < n; ++i) y[i] = float_to_fp8e5m2(src[i] * inv_scale);
      return;
    }
  }
}

inline float dot_inline(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps();
  __m256 acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8)
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  float s = hsum(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

float dot(const float* a, const float* b, int64_t n) { return dot_inline(a, b, n); }

void dots(const float* x, const float* rows, int64_t num_rows, int64_t n, float* out,
          int64_t out_stride) {
  int64_t r = 0;
  if (n % 8 == 0) {
    // Two rows at a time share the loads of x.
    for (; r + 2 <= num_rows; r += 2) {
      const float* a = rows + r * n;
      const float* b = a + n;
      __m256 acc_a = _mm256_setzero_ps();
      __m256 acc_b = _mm256_setzero_ps();
      for (int64_t i = 0; i < n; i += 8) {
        const __m256 xv = _mm256_loadu_ps(x + i);
        acc_a = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), xv, acc_a);
        acc_b = _mm256_fmadd_ps(_mm256_loadu_ps(b + i), xv, acc_b);
      }
      out[r * out_stride] = hsum(acc_a);
      out[(r + 1) * out_stride] = hsum(acc_b);
    }
  }
  for (; r < num_rows; ++r) out[r * out_stride] = dot_inline(rows + r * n, x, n);
}

void axpys(const float* x, const float* weights, int64_t weight_stride, int64_t num_rows,
           float* acc, int64_t n) {
  for (int64_t r = 0; r < num_rows; ++r) {
    const float w = weights[r * weight_stride];
    if (w == 0.0f) continue;
    const __m256 wv = _mm256_set1_ps(w);
    float* y = acc + r * n;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(y + i, _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; ++i) y[i] += w * x[i];
  }
}

void scale(float a, float* x, int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), av));
  for (; i < n; ++i) x[i] *= a;
}

float sum_squares(const float* x, int64_t n) { return dot_inline(x, x, n); }

void mul_scaled(const float* x, const float* w, float s, float* y, int64_t n) {
  const __m256 sv = _mm256_set1_ps(s);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(
        y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), sv), _mm256_loadu_ps(w + i)));
  for (; i < n; ++i) y[i] = x[i] * s * w[i];
}

float max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  if (n >= 8) {
    __m256 mv = _mm256_loadu_ps(x);
    for (i = 8; i + 8 <= n; i += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(x + i));
    m = hmax(mv);
  }
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

float exp_shift_sum(float* x, int64_t n, float shift) {
  const __m256 sh = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh));
    _mm256_storeu_ps(x + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  float s = hsum(acc);
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    s += x[i];
  }
  return s;
}

void silu_mul(const float* gate, const float* up, float* out, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 zero = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    // exp(-g) overflows to inf for g < -88: then g / inf = -0, which is silu's limit.
    const __m256 neg = _mm256_sub_ps(zero, g);
    const __m256 big = _mm256_cmp_ps(neg, _mm256_set1_ps(88.0f), _CMP_GT_OQ);
    __m256 e = exp256(neg);
    e = _mm256_blendv_ps(e, _mm256_set1_ps(std::numeric_limits<float>::infinity()), big);
    const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, e));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
  }
  for (; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

// Eight elements of a cache row as floats.
template <DType kType>
inline __m256 load8(const void* base, int64_t offset) {
  if constexpr (kType == DType::kFloat32) {
    return _mm256_loadu_ps(static_cast<const float*>(base) + offset);
  } else if constexpr (kType == DType::kFloat16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(
        reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + offset)));
  } else if constexpr (kType == DType::kBFloat16) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(
        reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + offset)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  } else if constexpr (kType == DType::kFloat8E5M2) {
    return e5m2x8(static_cast<const uint8_t*>(base) + offset);
  } else {
    return e4m3x8(static_cast<const uint8_t*>(base) + offset);
  }
}

// Scores of kRows query rows against kKeys (<= 4) consecutive keys: each key chunk is loaded
// (and converted) once for all rows. Every score is reduced by the same tree, ((0+1)+(2+3)) +
// ((4+5)+(6+7)) over its accumulator's lanes, wherever the key falls in a group, so a score does
// not depend on how many keys or rows came with it. first: the first key's element offset.
template <DType kType, int kRows, int kKeys>
inline void attn_scores_group(const void* keys, int64_t first, int64_t key_stride, const float* q,
                              int64_t d, float* scores, int64_t score_stride) {
  __m256 acc[kRows][4];
  for (int r = 0; r < kRows; ++r)
    for (int k = 0; k < 4; ++k) acc[r][k] = _mm256_setzero_ps();
  for (int64_t c = 0; c < d; c += 8) {
    for (int k = 0; k < kKeys; ++k) {
      const __m256 kv = load8<kType>(keys, first + k * key_stride + c);
      for (int r = 0; r < kRows; ++r)
        acc[r][k] = _mm256_fmadd_ps(kv, _mm256_loadu_ps(q + r * d + c), acc[r][k]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    const __m256 h =
        _mm256_hadd_ps(_mm256_hadd_ps(acc[r][0], acc[r][1]), _mm256_hadd_ps(acc[r][2], acc[r][3]));
    const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    float* out = scores + r * score_stride;
    if constexpr (kKeys == 4) {
      _mm_storeu_ps(out, sums);
    } else {
      alignas(16) float tmp[4];
      _mm_store_ps(tmp, sums);
      for (int k = 0; k < kKeys; ++k) out[k] = tmp[k];
    }
  }
}

template <DType kType, int kRows>
void attn_scores_rows(const void* keys, int64_t key_stride, int64_t n, const float* q, int64_t d,
                      float* scores, int64_t score_stride) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4)
    attn_scores_group<kType, kRows, 4>(keys, j * key_stride, key_stride, q, d, scores + j,
                                       score_stride);
  const int64_t first = j * key_stride;
  switch (n - j) {
    case 3:
      return attn_scores_group<kType, kRows, 3>(keys, first, key_stride, q, d, scores + j,
                                                score_stride);
    case 2:
      return attn_scores_group<kType, kRows, 2>(keys, first, key_stride, q, d, scores + j,
                                                score_stride);
    case 1:
      return attn_scores_group<kType, kRows, 1>(keys, first, key_stride, q, d, scores + j,
                                                score_stride);
    default:
      return;
  }
}

// d is a multiple of 8 (every supported head size is). Rows go three at a time (a GQA group of
// three query heads shares each key load; 12 accumulators stay in registers).
template <DType kType>
void attn_scores_impl(const void* keys, int64_t key_stride, int64_t n, const float* q, int64_t rows,
                      int64_t d, float* scores, int64_t score_stride) {
  int64_t r = 0;
  for (; r + 3 <= rows; r += 3)
    attn_scores_rows<kType, 3>(keys, key_stride, n, q + r * d, d, scores + r * score_stride,
                               score_stride);
  if (rows - r == 2)
    attn_scores_rows<kType, 2>(keys, key_stride, n, q + r * d, d, scores + r * score_stride,
                               score_stride);
  else if (rows - r == 1)
    attn_scores_rows<kType, 1>(keys, key_stride, n, q + r * d, d, scores + r * score_stride,
                               score_stride);
}

// Up to four rows at a time, 16 dimensions per pass: 8 accumulators stay in registers while the
// value rows (a cache block, in L1) stream through.
template <DType kType, int kRows>
void attn_values_rows(const void* values, int64_t value_stride, int64_t n, const float* w,
                      int64_t weight_stride, int64_t d, float* acc) {
  int64_t c = 0;
  for (; c + 16 <= d; c += 16) {
    __m256 lo[kRows], hi[kRows];
    for (int r = 0; r < kRows; ++r) {
      lo[r] = _mm256_loadu_ps(acc + r * d + c);
      hi[r] = _mm256_loadu_ps(acc + r * d + c + 8);
    }
    for (int64_t j = 0; j < n; ++j) {
      const __m256 v0 = load8<kType>(values, j * value_stride + c);
      const __m256 v1 = load8<kType>(values, j * value_stride + c + 8);
      for (int r = 0; r < kRows; ++r) {
        const __m256 weight = _mm256_broadcast_ss(w + r * weight_stride + j);
        lo[r] = _mm256_fmadd_ps(weight, v0, lo[r]);
        hi[r] = _mm256_fmadd_ps(weight, v1, hi[r]);
      }
    }
    for (int r = 0; r < kRows; ++r) {
      _mm256_storeu_ps(acc + r * d + c, lo[r]);
      _mm256_storeu_ps(acc + r * d + c + 8, hi[r]);
    }
  }
  for (; c < d; c += 8) {
    __m256 a[kRows];
    for (int r = 0; r < kRows; ++r) a[r] = _mm256_loadu_ps(acc + r * d + c);
    for (int64_t j = 0; j < n; ++j) {
      const __m256 v0 = load8<kType>(values, j * value_stride + c);
      for (int r = 0; r < kRows; ++r)
        a[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(w + r * weight_stride + j), v0, a[r]);
    }
    for (int r = 0; r < kRows; ++r) _mm256_storeu_ps(acc + r * d + c, a[r]);
  }
}

template <DType kType>
void attn_values_impl(const void* values, int64_t value_stride, int64_t n, const float* weights,
                      int64_t weight_stride, int64_t rows, int64_t d, float* acc) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4)
    attn_values_rows<kType, 4>(values, value_stride, n, weights + r * weight_stride, weight_stride,
                               d, acc + r * d);
  const float* w = weights + r * weight_stride;
  float* a = acc + r * d;
  switch (rows - r) {
    case 3:
      return attn_values_rows<kType, 3>(values, value_stride, n, w, weight_stride, d, a);
    case 2:
      return attn_values_rows<kType, 2>(values, value_stride, n, w, weight_stride, d, a);
    case 1:
      return attn_values_rows<kType, 1>(values, value_stride, n, w, weight_stride, d, a);
    default:
      return;
  }
}

void attn_scores(const void* keys, int64_t key_stride, DType dtype, int64_t n, const float* q,
                 int64_t rows, int64_t d, float* scores, int64_t score_stride) {
  switch (dtype) {
    case DType::kFloat32:
      return attn_scores_impl<DType::kFloat32>(keys, key_stride, n, q, rows, d, scores,
                                               score_stride);
    case DType::kFloat16:
      return attn_scores_impl<DType::kFloat16>(keys, key_stride, n, q, rows, d, scores,
                                               score_stride);
    case DType::kBFloat16:
      return attn_scores_impl<DType::kBFloat16>(keys, key_stride, n, q, rows, d, scores,
                                                score_stride);
    case DType::kFloat8E4M3:
      return attn_scores_impl<DType::kFloat8E4M3>(keys, key_stride, n, q, rows, d, scores,
                                                  score_stride);
    case DType::kFloat8E5M2:
      return attn_scores_impl<DType::kFloat8E5M2>(keys, key_stride, n, q, rows, d, scores,
                                                  score_stride);
  }
}

void attn_values(const void* values, int64_t value_stride, DType dtype, int64_t n,
                 const float* weights, int64_t weight_stride, int64_t rows, int64_t d, float* acc) {
  switch (dtype) {
    case DType::kFloat32:
      return attn_values_impl<DType::kFloat32>(values, value_stride, n, weights, weight_stride,
                                               rows, d, acc);
    case DType::kFloat16:
      return attn_values_impl<DType::kFloat16>(values, value_stride, n, weights, weight_stride,
                                               rows, d, acc);
    case DType::kBFloat16:
      return attn_values_impl<DType::kBFloat16>(values, value_stride, n, weights, weight_stride,
                                                rows, d, acc);
    case DType::kFloat8E4M3:
      return attn_values_impl<DType::kFloat8E4M3>(values, value_stride, n, weights, weight_stride,
                                                  rows, d, acc);
    case DType::kFloat8E5M2:
      return attn_values_impl<DType::kFloat8E5M2>(values, value_stride, n, weights, weight_stride,
                                                  rows, d, acc);
  }
}

int64_t argmax(const float* x, int64_t n) {
  // The largest value, then its first position.
  const float m = max(x, n);
  const __m256 mv = _mm256_set1_ps(m);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), mv, _CMP_EQ_OQ));
    if (mask != 0) return i + __builtin_ctz(static_cast<unsigned>(mask));
  }
  for (; i < n; ++i)
    if (x[i] == m) return i;
  return std::max_element(x, x + n) - x;  // NaNs: no element equals the maximum
}

void add_residual(float* x, float* residual, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 sum = _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(residual + i));
    _mm256_storeu_ps(x + i, sum);
    _mm256_storeu_ps(residual + i, sum);
  }
  for (; i < n; ++i) residual[i] = x[i] += residual[i];
}

void rotate_half(float* x, const float* cos, const float* sin, int64_t half) {
  int64_t i = 0;
  for (; i + 8 <= half; i += 8) {
    const __m256 x1 = _mm256_loadu_ps(x + i), x2 = _mm256_loadu_ps(x + i + half);
    const __m256 c = _mm256_loadu_ps(cos + i), s = _mm256_loadu_ps(sin + i);
    // Products rounded apart, then subtracted/added: the scalar code's arithmetic.
    _mm256_storeu_ps(x + i, _mm256_sub_ps(_mm256_mul_ps(x1, c), _mm256_mul_ps(x2, s)));
    _mm256_storeu_ps(x + i + half, _mm256_add_ps(_mm256_mul_ps(x2, c), _mm256_mul_ps(x1, s)));
  }
  for (; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    x[i] = x1 * cos[i] - x2 * sin[i];
    x[i + half] = x2 * cos[i] + x1 * sin[i];
  }
}

const VecOps kAvx2 = {"avx2",      load,        store,      dot,          dots,          axpys,
                      scale,       sum_squares, mul_scaled, max,          exp_shift_sum, silu_mul,
                      attn_scores, attn_values, argmax,     add_residual, rotate_half};

}  // namespace

const VecOps* avx2_vec_ops() { return &kAvx2; }

}  // namespace fastllm::kernels::cpu
