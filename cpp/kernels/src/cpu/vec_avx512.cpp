// AVX-512 attention primitives (built with -mavx512f -mavx512bw -mavx512vl on top of AVX2/FMA/F16C;
// nothing here runs unless vec_ops() saw those features at run time and FASTLLM_CPU_ISA allows
// avx512). The table is the AVX2 one with attn_scores / attn_values and silu_mul replaced: the
// other row primitives work on a row or two at a time, where 512-bit vectors buy little.
//
// Both kernels keep attention's tile invariance (attention.cpp): a query row's scores and its
// weighted value sum are computed by the same instructions in the same order whichever rows share
// the call, so a token decoded alone and the same token inside a multi-token query (speculative
// decoding's verification) give the same bits.
#include <immintrin.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "vec.h"

namespace fastllm::kernels::cpu {
namespace {

// Sixteen e4m3 codes as floats without a table: the AVX2 path's conversion (vec_avx2.cpp, e4m3x8)
// sixteen at a time, so both paths decode every code to the same float. The code's 4 exponent
// and 3 mantissa bits placed in a float16 read 2^(e-15) (1 + m/8) (or float16's subnormal
// 2^-14 m/8 for e = 0); one exact multiply by 2^8 moves the bias from 15 to e4m3's 7. Codes
// 0x7F / 0xFF are e4m3fn's NaN.
inline __m512 e4m3x16(const uint8_t* x) {
  const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
  const __m256i magnitude = _mm256_and_si256(w, _mm256_set1_epi16(0x7F));
  const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x80)), 8);
  __m256i half = _mm256_or_si256(_mm256_slli_epi16(magnitude, 7), sign);
  const __m256i nan = _mm256_cmpeq_epi16(magnitude, _mm256_set1_epi16(0x7F));
  half = _mm256_blendv_epi8(half, _mm256_or_si256(sign, _mm256_set1_epi16(0x7E00)), nan);
  return _mm512_mul_ps(_mm512_cvtph_ps(half), _mm512_set1_ps(256.0f));
}

// Sixteen e5m2 codes as floats: each code is the high byte of a float16.
inline __m512 e5m2x16(const uint8_t* x) {
  const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
  return _mm512_cvtph_ps(_mm256_slli_epi16(w, 8));
}

// Sixteen elements of a cache row as floats (one vcvtph2ps for float16).
template <DType kType>
inline __m512 load16(const void* base, int64_t offset) {
  if constexpr (kType == DType::kFloat32) {
    return _mm512_loadu_ps(static_cast<const float*>(base) + offset);
  } else if constexpr (kType == DType::kFloat16) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + offset)));
  } else if constexpr (kType == DType::kBFloat16) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + offset)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  } else if constexpr (kType == DType::kFloat8E5M2) {
    return e5m2x16(static_cast<const uint8_t*>(base) + offset);
  } else {
    return e4m3x16(static_cast<const uint8_t*>(base) + offset);
  }
}

// The lane sums of four accumulators, [sum(a0), sum(a1), sum(a2), sum(a3)]. Every accumulator
// goes through the same tree, ((0+2)+(1+3)) within each 128-bit lane L, then
// ((L0+L2)+(L1+L3)), whichever argument it is: a score does not depend on where its key falls
// in a group, nor on the keys beside it.
inline __m128 sum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  const __m512d d01 = _mm512_castps_pd(s01), d23 = _mm512_castps_pd(s23);
  const __m512 s = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(d01, d23)),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(d01, d23)));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// Scores of kRows query rows (kC 16-float chunks each) against kKeys (<= 4) consecutive keys,
// the first at element offset `first`. Each chunk of a key is loaded and converted once for all
// rows; each (row, key) pair has its own accumulator, taking the chunks in order, so its sum is the
// same whatever kRows and kKeys are. qr: the rows' chunks when they stay in registers (kHold);
// otherwise they are read from q, once per group.
template <DType kType, int kRows, int kC, int kKeys, bool kHold>
[[gnu::always_inline]] inline void scores_group(
    const void* keys, int64_t first, int64_t key_stride,
    const __m512 (&qr)[kHold ? kRows : 1][kHold ? kC : 1], const float* q, float* scores,
    int64_t score_stride) {
  __m512 acc[kRows][4];
  if constexpr (kHold) {
    for (int k = 0; k < kKeys; ++k) {
      for (int c = 0; c < kC; ++c) {
        const __m512 kv = load16<kType>(keys, first + k * key_stride + 16 * c);
        for (int r = 0; r < kRows; ++r)
          acc[r][k] =
              c == 0 ? _mm512_mul_ps(kv, qr[r][c]) : _mm512_fmadd_ps(kv, qr[r][c], acc[r][k]);
      }
    }
  } else {
    // Chunk by chunk: each row's chunk is read once for the group's keys (reading it per key and
    // row would make the loads, not the FMAs, the limit).
    for (int c = 0; c < kC; ++c) {
      __m512 qv[kRows];
      for (int r = 0; r < kRows; ++r) qv[r] = _mm512_loadu_ps(q + (r * kC + c) * 16);
      for (int k = 0; k < kKeys; ++k) {
        const __m512 kv = load16<kType>(keys, first + k * key_stride + 16 * c);
        for (int r = 0; r < kRows; ++r)
          acc[r][k] = c == 0 ? _mm512_mul_ps(kv, qv[r]) : _mm512_fmadd_ps(kv, qv[r], acc[r][k]);
      }
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int k = kKeys; k < 4; ++k) acc[r][k] = _mm512_setzero_ps();
  for (int r = 0; r < kRows; ++r) {
    const __m128 sums = sum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
    float* out = scores + r * score_stride;
    if constexpr (kKeys == 4)
      _mm_storeu_ps(out, sums);
    else
      _mm_mask_storeu_ps(out, static_cast<__mmask8>((1u << kKeys) - 1u), sums);
  }
}

// The scores of kRows rows against n keys, four keys per step (the steps are independent, so
// the core overlaps one's reduction with the next one's FMAs). The rows' query chunks stay in
// registers where they fit beside the accumulators (32 zmm).
template <DType kType, int kRows, int kC>
void scores_rows(const void* keys, int64_t key_stride, int64_t n, const float* q, float* scores,
                 int64_t score_stride) {
  constexpr bool kHold = kRows * kC + kRows * 4 <= 24;
  __m512 qr[kHold ? kRows : 1][kHold ? kC : 1];
  if constexpr (kHold)
    for (int r = 0; r < kRows; ++r)
      for (int c = 0; c < kC; ++c) qr[r][c] = _mm512_loadu_ps(q + (r * kC + c) * 16);
  else
    qr[0][0] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 4 <= n; j += 4)
    scores_group<kType, kRows, kC, 4, kHold>(keys, j * key_stride, key_stride, qr, q, scores + j,
                                             score_stride);
  const int64_t first = j * key_stride;
  switch (n - j) {
    case 3:
      return scores_group<kType, kRows, kC, 3, kHold>(keys, first, key_stride, qr, q, scores + j,
                                                      score_stride);
    case 2:
      return scores_group<kType, kRows, kC, 2, kHold>(keys, first, key_stride, qr, q, scores + j,
                                                      score_stride);
    case 1:
      return scores_group<kType, kRows, kC, 1, kHold>(keys, first, key_stride, qr, q, scores + j,
                                                      score_stride);
    default:
      return;
  }
}

// Rows four at a time (a GQA group of 2-4 query heads decoding one token is one pass over the
// keys), the rest three, two or one.
template <DType kType, int kC>
void scores_impl(const void* keys, int64_t key_stride, int64_t n, const float* q, int64_t rows,
                 float* scores, int64_t score_stride) {
  constexpr int64_t d = 16 * kC;
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4)
    scores_rows<kType, 4, kC>(keys, key_stride, n, q + r * d, scores + r * score_stride,
                              score_stride);
  const float* qr = q + r * d;
  float* out = scores + r * score_stride;
  switch (rows - r) {
    case 3:
      return scores_rows<kType, 3, kC>(keys, key_stride, n, qr, out, score_stride);
    case 2:
      return scores_rows<kType, 2, kC>(keys, key_stride, n, qr, out, score_stride);
    case 1:
      return scores_rows<kType, 1, kC>(keys, key_stride, n, qr, out, score_stride);
    default:
      return;
  }
}

// kVecs 16-float columns of kRows accumulator rows (d floats apart), from column c, held in
// registers while the n value rows (a cache block, in L1) stream through. Each lane is one FMA
// chain over the keys in order, starting from acc's value: the same for a row whatever kRows,
// kVecs and the other rows are.
template <DType kType, int kRows, int kVecs>
[[gnu::always_inline]] inline void values_pass(const void* values, int64_t value_stride, int64_t n,
                                               const float* w, int64_t weight_stride, int64_t d,
                                               int64_t c, float* acc) {
  __m512 a[kRows][kVecs];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVecs; ++v) a[r][v] = _mm512_loadu_ps(acc + r * d + c + 16 * v);
  for (int64_t j = 0; j < n; ++j) {
    __m512 weight[kRows];
    for (int r = 0; r < kRows; ++r) weight[r] = _mm512_set1_ps(w[r * weight_stride + j]);
    for (int v = 0; v < kVecs; ++v) {
      const __m512 x = load16<kType>(values, j * value_stride + c + 16 * v);
      for (int r = 0; r < kRows; ++r) a[r][v] = _mm512_fmadd_ps(weight[r], x, a[r][v]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVecs; ++v) _mm512_storeu_ps(acc + r * d + c + 16 * v, a[r][v]);
}

// The columns from chunk kDone on, in passes of at most 24 accumulators (8 or more independent
// FMA chains keep both FMA pipes busy through their 4-cycle latency), split evenly.
template <DType kType, int kRows, int kC, int kDone = 0>
[[gnu::always_inline]] inline void values_rows(const void* values, int64_t value_stride, int64_t n,
                                               const float* w, int64_t weight_stride, float* acc) {
  if constexpr (kDone < kC) {
    constexpr int kMax = 24 / kRows;
    constexpr int kPasses = (kC - kDone + kMax - 1) / kMax;
    constexpr int kVecs = (kC - kDone + kPasses - 1) / kPasses;
    values_pass<kType, kRows, kVecs>(values, value_stride, n, w, weight_stride, 16 * kC, 16 * kDone,
                                     acc);
    values_rows<kType, kRows, kC, kDone + kVecs>(values, value_stride, n, w, weight_stride, acc);
  }
}

template <DType kType, int kC>
void values_impl(const void* values, int64_t value_stride, int64_t n, const float* weights,
                 int64_t weight_stride, int64_t rows, float* acc) {
  constexpr int64_t d = 16 * kC;
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4)
    values_rows<kType, 4, kC>(values, value_stride, n, weights + r * weight_stride, weight_stride,
                              acc + r * d);
  const float* w = weights + r * weight_stride;
  float* a = acc + r * d;
  switch (rows - r) {
    case 3:
      return values_rows<kType, 3, kC>(values, value_stride, n, w, weight_stride, a);
    case 2:
      return values_rows<kType, 2, kC>(values, value_stride, n, w, weight_stride, a);
    case 1:
      return values_rows<kType, 1, kC>(values, value_stride, n, w, weight_stride, a);
    default:
      return;
  }
}

// Calls f(std::integral_constant<DType, dtype>(), std::integral_constant<int, d / 16>()) for a
// head size with its own kernels (every supported one, 64, 80, 96, 128 and 256, is a multiple
// of 16 and gets code with its chunk count built in) and returns true; any other d returns
// false and goes to the AVX2 kernels, always, so a given d still takes one path.
template <typename F>
bool with_cache_shape(DType dtype, int64_t d, F&& f) {
  auto by_size = [&](auto type) {
    switch (d) {
      case 64:
        f(type, std::integral_constant<int, 4>());
        return true;
      case 80:
        f(type, std::integral_constant<int, 5>());
        return true;
      case 96:
        f(type, std::integral_constant<int, 6>());
        return true;
      case 128:
        f(type, std::integral_constant<int, 8>());
        return true;
      case 256:
        f(type, std::integral_constant<int, 16>());
        return true;
      default:
        return false;
    }
  };
  switch (dtype) {
    case DType::kFloat32:
      return by_size(std::integral_constant<DType, DType::kFloat32>());
    case DType::kFloat16:
      return by_size(std::integral_constant<DType, DType::kFloat16>());
    case DType::kBFloat16:
      return by_size(std::integral_constant<DType, DType::kBFloat16>());
    case DType::kFloat8E4M3:
      return by_size(std::integral_constant<DType, DType::kFloat8E4M3>());
    case DType::kFloat8E5M2:
      return by_size(std::integral_constant<DType, DType::kFloat8E5M2>());
  }
  return false;
}

void attn_scores(const void* keys, int64_t key_stride, DType dtype, int64_t n, const float* q,
                 int64_t rows, int64_t d, float* scores, int64_t score_stride) {
  const bool done = with_cache_shape(dtype, d, [&](auto type, auto chunks) {
    scores_impl<decltype(type)::value, decltype(chunks)::value>(keys, key_stride, n, q, rows,
                                                                scores, score_stride);
  });
  if (!done)
    avx2_vec_ops()->attn_scores(keys, key_stride, dtype, n, q, rows, d, scores, score_stride);
}

void attn_values(const void* values, int64_t value_stride, DType dtype, int64_t n,
                 const float* weights, int64_t weight_stride, int64_t rows, int64_t d, float* acc) {
  const bool done = with_cache_shape(dtype, d, [&](auto type, auto chunks) {
    values_impl<decltype(type)::value, decltype(chunks)::value>(values, value_stride, n, weights,
                                                                weight_stride, rows, acc);
  });
  if (!done)
    avx2_vec_ops()->attn_values(values, value_stride, dtype, n, weights, weight_stride, rows, d,
                                acc);
}

// exp(x) sixteen lanes at a time: vec_avx2.cpp's exp256, step for step (the same constants,
// roundings and clamps), so each lane gets the bits the 256-bit path gives it.
inline __m512 exp512(__m512 x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33f), _CMP_GE_OQ);
  x = _mm512_min_ps(x, _mm512_set1_ps(88.37f));
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.33f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i e =
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mov_ps(keep, _mm512_mul_ps(p, _mm512_castsi512_ps(e)));
}

// silu(gate) * up: the AVX2 path's steps sixteen lanes at a time (that path takes the rest).
// The MoE experts' SiLU runs over every token's intermediate row (~4 % of a 16-token step of the
// MoE benchmark model on 256-bit vectors).
void silu_mul(const float* gate, const float* up, float* out, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 g = _mm512_loadu_ps(gate + i);
    // exp(-g) overflows to inf for g < -88: then g / inf = -0, which is silu's limit.
    const __m512 neg = _mm512_sub_ps(_mm512_setzero_ps(), g);
    const __mmask16 big = _mm512_cmp_ps_mask(neg, _mm512_set1_ps(88.0f), _CMP_GT_OQ);
    const __m512 e = _mm512_mask_mov_ps(exp512(neg), big,
                                        _mm512_set1_ps(std::numeric_limits<float>::infinity()));
    const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, e));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(silu, _mm512_loadu_ps(up + i)));
  }
  if (i < n) avx2_vec_ops()->silu_mul(gate + i, up + i, out + i, n - i);
}

}  // namespace

const VecOps* avx512_vec_ops() {
  static const VecOps ops = [] {
    VecOps o = *avx2_vec_ops();
    o.attn_scores = attn_scores;
    o.attn_values = attn_values;
    o.silu_mul = silu_mul;
    return o;
  }();
  return &ops;
}

}  // namespace fastllm::kernels::cpu
