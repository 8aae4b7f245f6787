// AVX2 micro-kernels of the quantized GEMM: int8 activations against Q8_0/Q4_0/Q4_1 weight blocks
// with _mm256_maddubs_epi16 (u8 x s8 -> s16 pairs) and _mm256_madd_epi16 (-> s32), one float FMA
// per block pair. Built with -mavx2 -mfma -mf16c; runs only when the CPU has them.
// quant_gemm_avxvnni.cpp compiles this file again with FASTLLM_QUANT_GEMM_VNNI (and -mavxvnni):
// then one _mm256_dpbusd_avx_epi32 replaces each maddubs + madd pair, with identical results.
// quant_gemm_avx512vl.cpp does the same with AVX-512 VL + VNNI (FASTLLM_QUANT_GEMM_VNNI=2): the
// EVEX form of the 256-bit instruction, for CPUs with AVX-512 VNNI but no AVX-VNNI (Ice Lake,
// Zen 4), whose AVX-512 kernels hand small tiles and the x8 layouts to these.
#include <immintrin.h>

#include <cstring>
#include <type_traits>

#include "quant_gemm_impl.h"

namespace fastllm::kernels::cpu {
namespace {

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  lo = _mm_add_ps(lo, _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

inline int hsum_epi32(__m256i v) {
  __m128i lo = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  lo = _mm_add_epi32(lo, _mm_shuffle_epi32(lo, _MM_SHUFFLE(1, 0, 3, 2)));
  lo = _mm_add_epi32(lo, _mm_shuffle_epi32(lo, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(lo);
}

// Sums of 4 adjacent u8 x s8 products as int32 lanes (no saturation can occur for our operands:
// |u| <= 128 and |s| <= 127, so a maddubs pair stays below 32767).
#ifdef FASTLLM_QUANT_GEMM_VNNI
inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) {
#if FASTLLM_QUANT_GEMM_VNNI == 2
  return _mm256_dpbusd_epi32(acc, u, s);
#else
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#endif
}

inline __m256i dot_u8s8(__m256i u, __m256i s, __m256i /*ones*/) {
  return dpbusd(_mm256_setzero_si256(), u, s);
}
#else
inline __m256i dot_u8s8(__m256i u, __m256i s, __m256i ones) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), ones);
}
#endif

inline float load_half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// kMax / kOffset as quantize_row_scalar's (identical rounding).
template <int kMax, int kOffset>
void quantize_row_avx2(const float* x, int64_t k, Q8ActBlock* out) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b = 0; b < k / 32; ++b) {
    const float* v = x + b * 32;
    __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8);
    __m256 v2 = _mm256_loadu_ps(v + 16), v3 = _mm256_loadu_ps(v + 24);
    __m256 m =
        _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v0, abs_mask), _mm256_and_ps(v1, abs_mask)),
                      _mm256_max_ps(_mm256_and_ps(v2, abs_mask), _mm256_and_ps(v3, abs_mask)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float amax = _mm_cvtss_f32(h);
    const float d = amax / static_cast<float>(kMax);
    const __m256 id = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
    constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, id), kRound));
    const __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, id), kRound));
    const __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, id), kRound));
    const __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, id), kRound));
    const int sum =
        hsum_epi32(_mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
    __m256i packed = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3)), order);
    if constexpr (kOffset != 0)
      packed = _mm256_add_epi8(packed, _mm256_set1_epi8(static_cast<char>(kOffset)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[b].q), packed);
    out[b].d = d;
    out[b].s = d * static_cast<float>(sum);
  }
}

// 32 nibbles as bytes 0..15 in the low lane (low nibbles) and 16..31 in the high lane.
inline __m256i unpack_nibbles(const uint8_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), mask), _mm_and_si128(raw, mask));
}

constexpr int64_t kPrefetchRows = 8;

#ifdef FASTLLM_QUANT_GEMM_VNNI
constexpr bool kVnni = true;
#else
constexpr bool kVnni = false;
#endif

template <QuantType kType>
constexpr int64_t kBlockBytes = kType == QuantType::kQ8_0   ? 34
                                : kType == QuantType::kQ4_0 ? 18
                                                            : 20;

// 1 or 2 rows of x (decode): per row a float vector accumulator; blocks alternate between two
// accumulator sets so consecutive FMAs do not wait on each other (with one chain, FMA latency,
// not memory, bounded a batch-1 GEMV).
template <QuantType kType, int kRows>
void tile_rows(const uint8_t* weight, int64_t n_rows, const Q8ActBlock* x, int64_t blocks,
               float* out, int64_t out_stride) {
  constexpr int64_t block_bytes = kBlockBytes<kType>;
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t row_bytes = blocks * block_bytes;
  for (int64_t j = 0; j < n_rows; ++j) {
    const uint8_t* row = weight + j * row_bytes;
    // Decode streams each weight once from DRAM in short slices; asking for the rows a few
    // ahead keeps more misses in flight than the hardware prefetcher does at a slice's start.
    if (j + kPrefetchRows < n_rows)
      for (int64_t off = 0; off < row_bytes; off += 64)
        _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchRows * row_bytes + off),
                     _MM_HINT_T0);
    __m256 acc0[kRows], acc1[kRows];
    float offset0[kRows], offset1[kRows];
    for (int r = 0; r < kRows; ++r) {
      acc0[r] = acc1[r] = _mm256_setzero_ps();
      offset0[r] = offset1[r] = 0.0f;
    }
    auto step = [&](int64_t b, __m256 * acc, float* offset) __attribute__((always_inline)) {
      const uint8_t* w = row + b * block_bytes;
      const float dw = load_half(w);
      __m256i wq;
      float wo = 0.0f;
      if constexpr (kType == QuantType::kQ8_0) {
        wq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2));
      } else if constexpr (kType == QuantType::kQ4_0) {
        wq = unpack_nibbles(w + 2);
        wo = -8.0f * dw;
      } else {
        wq = unpack_nibbles(w + 4);
        wo = load_half(w + 2);
      }
      // maddubs takes unsigned x signed: for signed Q8_0 weights, move the sign onto x.
      const __m256i wu = kType == QuantType::kQ8_0 ? _mm256_abs_epi8(wq) : wq;
      for (int r = 0; r < kRows; ++r) {
        const Q8ActBlock& xb = x[r * blocks + b];
        __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb.q));
        if constexpr (kType == QuantType::kQ8_0) xv = _mm256_sign_epi8(xv, wq);
        const __m256i dot = dot_u8s8(wu, xv, ones);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dw * xb.d), acc[r]);
        if constexpr (kType != QuantType::kQ8_0) offset[r] += wo * xb.s;
      }
    };
    int64_t b = 0;
    for (; b + 1 < blocks; b += 2) {
      step(b, acc0, offset0);
      step(b + 1, acc1, offset1);
    }
    if (b < blocks) step(b, acc0, offset0);
    for (int r = 0; r < kRows; ++r)
      out[r * out_stride + j] = hsum(_mm256_add_ps(acc0[r], acc1[r])) + (offset0[r] + offset1[r]);
  }
}

// Horizontal sums of 8 int32 vectors, lane r of the result = sum of p[r].
inline __m256i reduce8(const __m256i* p) {
  const __m256i h0123 =
      _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
  const __m256i h4567 =
      _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(h0123, h4567, 0x20),
                          _mm256_permute2x128_si256(h0123, h4567, 0x31));
}

// 3 to 8 rows of x against Q8_0 weights: the integer dot products of one weight block with every
// row are reduced into one vector (lane = row) and scaled with the tile's transposed activation
// scales in one FMA. (Signed weights need their sign moved onto x per product, which the
// interleaved kernel below would repeat per group: this layout does it once per row.)
template <int kRows>
void tile_rows_q8_wide(const uint8_t* weight, int64_t n_rows, const Q8ActBlock* x, int64_t blocks,
                       const float* xd, float* out, int64_t out_stride) {
  constexpr int64_t block_bytes = kBlockBytes<QuantType::kQ8_0>;
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t row_bytes = blocks * block_bytes;
  for (int64_t j = 0; j < n_rows; ++j) {
    const uint8_t* row = weight + j * row_bytes;
    if (j + kPrefetchRows < n_rows)
      for (int64_t off = 0; off < row_bytes; off += 64)
        _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchRows * row_bytes + off),
                     _MM_HINT_T0);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* w = row + b * block_bytes;
      const float dw = load_half(w);
      const __m256i wq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2));
      const __m256i wu = _mm256_abs_epi8(wq);
      __m256i p[8];
      for (int r = 0; r < 8; ++r) {
        if (r >= kRows) {
          p[r] = _mm256_setzero_si256();
          continue;
        }
        __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[r * blocks + b].q));
        xv = _mm256_sign_epi8(xv, wq);
        p[r] = dot_u8s8(wu, xv, ones);
      }
      const __m256 scale = _mm256_mul_ps(_mm256_loadu_ps(xd + b * 8), _mm256_set1_ps(dw));
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(reduce8(p)), scale, acc);
    }
    alignas(32) float sums[8];
    _mm256_store_ps(sums, acc);
    for (int r = 0; r < kRows; ++r) out[r * out_stride + j] = sums[r];
  }
}

// 1 or 2 rows of x against Q8_0 weights with the arithmetic of tile_rows_q8_wide, so that a row's
// results do not depend on how many rows came with it: per block the exact integer dot product,
// then acc = fma(isum, d_x * d_w, acc) in block order. Four weight rows go together: their four
// integer sums come out of one reduction tree and share the float work.
template <int kRows>
void tile_rows_q8_narrow(const uint8_t* weight, int64_t n_rows, const Q8ActBlock* x, int64_t blocks,
                         float* out, int64_t out_stride) {
  constexpr int64_t block_bytes = kBlockBytes<QuantType::kQ8_0>;
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t row_bytes = blocks * block_bytes;
  auto block_dot = [&](const uint8_t* w, const int8_t* q) __attribute__((always_inline)) {
    const __m256i wq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2));
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
    return dot_u8s8(_mm256_abs_epi8(wq), _mm256_sign_epi8(xv, wq), ones);
  };
  int64_t j = 0;
  for (; j + 4 <= n_rows; j += 4) {
    const uint8_t* row = weight + j * row_bytes;
    if (j + kPrefetchRows < n_rows)
      for (int64_t off = 0; off < 4 * row_bytes; off += 64)
        _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchRows * row_bytes + off),
                     _MM_HINT_T0);
    __m128 acc[kRows];
    for (int r = 0; r < kRows; ++r) acc[r] = _mm_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* w = row + b * block_bytes;
      const __m128 dw = _mm_setr_ps(load_half(w), load_half(w + row_bytes),
                                    load_half(w + 2 * row_bytes), load_half(w + 3 * row_bytes));
      for (int r = 0; r < kRows; ++r) {
        const Q8ActBlock& xb = x[r * blocks + b];
        const __m256i h =
            _mm256_hadd_epi32(_mm256_hadd_epi32(block_dot(w, xb.q), block_dot(w + row_bytes, xb.q)),
                              _mm256_hadd_epi32(block_dot(w + 2 * row_bytes, xb.q),
                                                block_dot(w + 3 * row_bytes, xb.q)));
        const __m128i isum =
            _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
        acc[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(isum), _mm_mul_ps(_mm_set1_ps(xb.d), dw), acc[r]);
      }
    }
    for (int r = 0; r < kRows; ++r) _mm_storeu_ps(out + r * out_stride + j, acc[r]);
  }
  for (; j < n_rows; ++j) {
    const uint8_t* row = weight + j * row_bytes;
    __m128 acc[kRows];
    for (int r = 0; r < kRows; ++r) acc[r] = _mm_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* w = row + b * block_bytes;
      const __m128 dw = _mm_set_ss(load_half(w));
      for (int r = 0; r < kRows; ++r) {
        const Q8ActBlock& xb = x[r * blocks + b];
        const __m128 isum = _mm_cvtepi32_ps(_mm_cvtsi32_si128(hsum_epi32(block_dot(w, xb.q))));
        acc[r] = _mm_fmadd_ss(isum, _mm_mul_ss(_mm_set_ss(xb.d), dw), acc[r]);
      }
    }
    for (int r = 0; r < kRows; ++r) out[r * out_stride + j] = _mm_cvtss_f32(acc[r]);
  }
}

// 3 to 8 rows of x against 4-bit weights, over the tile's interleaved quants (quant_gemm_impl.h):
// each group of 4 weight values is broadcast to all 8 lanes and multiplied with 4 values of every
// row at once, so lane r accumulates row r's dot product with no horizontal reduction. The 8
// maddubs results of a block are summed in int16 (|sum| <= 8 * 2 * 15 * 127 = 30480) as a tree
// and widened once: 9 multiply instructions per block for all rows. Two weight rows go together,
// sharing the activation loads and giving the core two independent chains.
template <QuantType kType, int kCols>
inline void wide_rows(const uint8_t* const* rows, int64_t blocks, const int8_t* xi, const float* xd,
                      const float* xs, __m256* total) {
  constexpr int64_t block_bytes = kBlockBytes<kType>;
  constexpr int64_t quant_offset = kType == QuantType::kQ4_1 ? 4 : 2;
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i mask = _mm256_set1_epi8(0x0F);
  __m256 acc[kCols], offset[kCols];
  for (int c = 0; c < kCols; ++c) acc[c] = offset[c] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const int8_t* xb = xi + b * kInterleavedBlockBytes;
    __m256i x[8];
    for (int g = 0; g < 8; ++g)
      x[g] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 32 * g));
    const __m256 xdv = _mm256_loadu_ps(xd + b * 8);
    const __m256 xsv = _mm256_loadu_ps(xs + b * 8);
    for (int c = 0; c < kCols; ++c) {
      const uint8_t* w = rows[c] + b * block_bytes;
      const float dw = load_half(w);
      // The 16 bytes in both lanes: low nibbles are values 0..15, high nibbles 16..31; group g
      // (values 4g..4g+3) is then one dword broadcast by an in-lane shuffle.
      const __m256i raw = _mm256_broadcastsi128_si256(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + quant_offset)));
      const __m256i lo = _mm256_and_si256(raw, mask);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
      const __m256i s0 =
          _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_shuffle_epi32(lo, 0x00), x[0]),
                           _mm256_maddubs_epi16(_mm256_shuffle_epi32(lo, 0x55), x[1]));
      const __m256i s1 =
          _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_shuffle_epi32(lo, 0xAA), x[2]),
                           _mm256_maddubs_epi16(_mm256_shuffle_epi32(lo, 0xFF), x[3]));
      const __m256i s2 =
          _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_shuffle_epi32(hi, 0x00), x[4]),
                           _mm256_maddubs_epi16(_mm256_shuffle_epi32(hi, 0x55), x[5]));
      const __m256i s3 =
          _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_shuffle_epi32(hi, 0xAA), x[6]),
                           _mm256_maddubs_epi16(_mm256_shuffle_epi32(hi, 0xFF), x[7]));
      const __m256i sum16 = _mm256_add_epi16(_mm256_add_epi16(s0, s1), _mm256_add_epi16(s2, s3));
      const float wo = kType == QuantType::kQ4_0 ? -8.0f * dw : load_half(w + 2);
      offset[c] = _mm256_fmadd_ps(xsv, _mm256_set1_ps(wo), offset[c]);
      acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(sum16, ones)),
                               _mm256_mul_ps(xdv, _mm256_set1_ps(dw)), acc[c]);
    }
  }
  for (int c = 0; c < kCols; ++c) total[c] = _mm256_add_ps(acc[c], offset[c]);
}

template <QuantType kType, int kRows>
void tile_rows_wide(const uint8_t* weight, int64_t n_rows, const int8_t* xi, int64_t blocks,
                    const float* xd, const float* xs, float* out, int64_t out_stride) {
  const int64_t row_bytes = blocks * kBlockBytes<kType>;
  auto store = [&](__m256 sums_v, int64_t j) {
    alignas(32) float sums[8];
    _mm256_store_ps(sums, sums_v);
    for (int r = 0; r < kRows; ++r) out[r * out_stride + j] = sums[r];
  };
  int64_t j = 0;
  for (; j < n_rows; j += 2) {
    const uint8_t* row = weight + j * row_bytes;
    if (j + kPrefetchRows < n_rows)
      for (int64_t off = 0; off < 2 * row_bytes; off += 64)
        _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchRows * row_bytes + off),
                     _MM_HINT_T0);
    __m256 total[2];
    if (j + 1 < n_rows) {
      const uint8_t* rows[2] = {row, row + row_bytes};
      wide_rows<kType, 2>(rows, blocks, xi, xd, xs, total);
      store(total[0], j);
      store(total[1], j + 1);
    } else {
      const uint8_t* rows[1] = {row};
      wide_rows<kType, 1>(rows, blocks, xi, xd, xs, total);
      store(total[0], j);
    }
  }
}

template <QuantType kType>
void tile_type(const uint8_t* weight, int64_t n_rows, const Q8ActBlock* x, int64_t blocks,
               const float* xd, const float* xs, const int8_t* xi, int64_t m_rows, float* out,
               int64_t out_stride) {
  if constexpr (kType == QuantType::kQ8_0) {
    if (m_rows == 1) return tile_rows_q8_narrow<1>(weight, n_rows, x, blocks, out, out_stride);
    if (m_rows == 2) return tile_rows_q8_narrow<2>(weight, n_rows, x, blocks, out, out_stride);
  }
  if (m_rows == 1) return tile_rows<kType, 1>(weight, n_rows, x, blocks, out, out_stride);
  if (m_rows == 2) return tile_rows<kType, 2>(weight, n_rows, x, blocks, out, out_stride);
  with_rows(m_rows, [&](auto rows) {  // 3..8 rows here
    if constexpr (kType == QuantType::kQ8_0) {
      tile_rows_q8_wide<decltype(rows)::value>(weight, n_rows, x, blocks, xd, out, out_stride);
    } else {
      tile_rows_wide<kType, decltype(rows)::value>(weight, n_rows, xi, blocks, xd, xs, out,
                                                   out_stride);
    }
  });
}

void tile_avx2(QuantType type, const uint8_t* weight, int64_t n_rows, const Q8ActBlock* x,
               int64_t blocks, const float* xd, const float* xs, const int8_t* xi, int64_t m_rows,
               float* out, int64_t out_stride) {
  static_assert(kQuantTileRows == 8, "tile_type handles up to 8 rows");
  switch (type) {
    case QuantType::kQ8_0:
      return tile_type<QuantType::kQ8_0>(weight, n_rows, x, blocks, xd, xs, xi, m_rows, out,
                                         out_stride);
    case QuantType::kQ4_0:
      return tile_type<QuantType::kQ4_0>(weight, n_rows, x, blocks, xd, xs, xi, m_rows, out,
                                         out_stride);
    default:
      return tile_type<QuantType::kQ4_1>(weight, n_rows, x, blocks, xd, xs, xi, m_rows, out,
                                         out_stride);
  }
}

// ---- x8 layouts (quant_gemm.h): 8 weight rows per 32-byte load ---------------------------------

// Row r's int32 dot products with the 8 rows of one block, lane i = weight row i: the 4 values of
// group g of x are broadcast from memory against the group's 32 bytes (4 values x 8 rows).
inline __m256i x8_block_dot(const __m256i* w, const int8_t* xq) {
  auto bcast = [xq](int g) {
    int32_t v;
    std::memcpy(&v, xq + 4 * g, 4);
    return _mm256_set1_epi32(v);
  };
#ifdef FASTLLM_QUANT_GEMM_VNNI
  __m256i acc = _mm256_setzero_si256();
  for (int g = 0; g < 8; ++g) acc = dpbusd(acc, w[g], bcast(g));
  return acc;
#else
  // int16 sums of the 8 maddubs stay below 8 * 2 * 15 * 127 = 30480 (no saturation).
  const __m256i s0 =
      _mm256_add_epi16(_mm256_maddubs_epi16(w[0], bcast(0)), _mm256_maddubs_epi16(w[1], bcast(1)));
  const __m256i s1 =
      _mm256_add_epi16(_mm256_maddubs_epi16(w[2], bcast(2)), _mm256_maddubs_epi16(w[3], bcast(3)));
  const __m256i s2 =
      _mm256_add_epi16(_mm256_maddubs_epi16(w[4], bcast(4)), _mm256_maddubs_epi16(w[5], bcast(5)));
  const __m256i s3 =
      _mm256_add_epi16(_mm256_maddubs_epi16(w[6], bcast(6)), _mm256_maddubs_epi16(w[7], bcast(7)));
  return _mm256_madd_epi16(_mm256_add_epi16(_mm256_add_epi16(s0, s1), _mm256_add_epi16(s2, s3)),
                           _mm256_set1_epi16(1));
#endif
}

// kRows (<= 8) rows of x against one 8-row group: the group's block is unpacked once into 8
// vectors of nibbles and multiplied with every row; row r's 8 outputs accumulate in one vector.
// Per block and row: acc += isum * (d_w * d_x), then acc += m_w * s_x, in that order for every
// kRows, so results do not depend on how rows are batched.
template <QuantType kType, int kRows>
void x8_group(const uint8_t* group, const Q8ActBlock* x, int64_t blocks, float* out,
              int64_t out_stride) {
  constexpr int64_t group_block = 8 * (kType == QuantType::kQ4_1x8 ? 20 : 18);
  constexpr int64_t header = kType == QuantType::kQ4_1x8 ? 32 : 16;
  const __m256i mask = _mm256_set1_epi8(0x0F);
  __m256 acc[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* w = group + b * group_block;
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
    const __m256 mw =
        kType == QuantType::kQ4_1x8
            ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16)))
            : _mm256_mul_ps(dw, _mm256_set1_ps(-8.0f));
    __m256i q[8];
    for (int c = 0; c < 4; ++c) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + header + 32 * c));
      q[c] = _mm256_and_si256(raw, mask);
      q[c + 4] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
    }
    for (int r = 0; r < kRows; ++r) {
      const Q8ActBlock& xb = x[r * blocks + b];
      const __m256i isum = x8_block_dot(q, xb.q);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dw, _mm256_set1_ps(xb.d)),
                               acc[r]);
      acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(xb.s), acc[r]);
    }
  }
  for (int r = 0; r < kRows; ++r) _mm256_storeu_ps(out + r * out_stride, acc[r]);
}

// Q7_0x8 / Q8_0x8: kRows (<= 8) rows of activations against one group of 8-bit or 7-bit
// weights. With VNNI both read the activations offset into unsigned bytes (Q7_0x8 by 64, Q8_0x8
// by 128) and subtract the block's offset * sum(q) term, which leaves the exact integer dot
// product. Without VNNI, Q7_0x8's vpmaddubsw pairs are at most 2 * 127 * 63 = 16002 in magnitude,
// so two sum in 16 bits before widening; Q8_0x8 reads signed activations, moves each weight's sign
// onto them (vpsignb) against |q| and widens every vpmaddubsw (pairs up to 2 * 128 * 127 = 32512,
// no room for a second). Per block and row: acc += isum * (d_w * d_x), in that order for every
// kRows, so results do not depend on how rows are batched.
template <QuantType kType, int kRows>
void q8_rows8_group(const uint8_t* group, const Q8ActBlock* x, int64_t blocks, float* out,
                    int64_t out_stride) {
  constexpr int64_t group_block = 8 * 38, header = 48;
  constexpr bool kSignedActivations = kType == QuantType::kQ8_0x8 && !kVnni;
  __m256 acc[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* w = group + b * group_block;
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
    __m256i q[8], q_abs[8];
    for (int c = 0; c < 8; ++c) {
      q[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + header + 32 * c));
      if constexpr (kSignedActivations) q_abs[c] = _mm256_abs_epi8(q[c]);
    }
    for (int r = 0; r < kRows; ++r) {
      const Q8ActBlock& xb = x[r * blocks + b];
      auto bcast = [&xb](int c) {
        int32_t v;
        std::memcpy(&v, xb.q + 4 * c, 4);
        return _mm256_set1_epi32(v);
      };
      __m256i isum;
#ifdef FASTLLM_QUANT_GEMM_VNNI
      isum = _mm256_setzero_si256();
      for (int c = 0; c < 8; ++c) isum = dpbusd(isum, bcast(c), q[c]);
      isum = _mm256_sub_epi32(isum, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16)));
#else
      const __m256i ones = _mm256_set1_epi16(1);
      if constexpr (kSignedActivations) {
        auto dot = [&](int c) {
          return _mm256_madd_epi16(_mm256_maddubs_epi16(q_abs[c], _mm256_sign_epi8(bcast(c), q[c])),
                                   ones);
        };
        isum = _mm256_add_epi32(
            _mm256_add_epi32(_mm256_add_epi32(dot(0), dot(1)), _mm256_add_epi32(dot(2), dot(3))),
            _mm256_add_epi32(_mm256_add_epi32(dot(4), dot(5)), _mm256_add_epi32(dot(6), dot(7))));
      } else {
        auto pair = [&](int c) {
          return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(bcast(c), q[c]),
                                                    _mm256_maddubs_epi16(bcast(c + 1), q[c + 1])),
                                   ones);
        };
        isum = _mm256_add_epi32(_mm256_add_epi32(pair(0), pair(2)),
                                _mm256_add_epi32(pair(4), pair(6)));
        isum = _mm256_sub_epi32(isum, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16)));
      }
#endif
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dw, _mm256_set1_ps(xb.d)),
                               acc[r]);
    }
  }
  for (int r = 0; r < kRows; ++r) _mm256_storeu_ps(out + r * out_stride, acc[r]);
}

template <QuantType kType>
void tile_x8_type(const uint8_t* weight, int64_t groups, const Q8ActBlock* x, int64_t blocks,
                  int64_t m_rows, float* out, int64_t out_stride) {
  const int64_t group_bytes = blocks * 8 * quant_block_bytes(kType);
  // The next group streams in while this one computes, all its lines requested at once and
  // non-temporal; with at most kBurstRows rows of x the first group's lines too when the tile
  // starts (a group of few rows computes in less time than its memory takes to arrive). moe_step
  // under FASTLLM_CPU_ISA=avx2, alternating runs: 1 token -2 to -7 %, 16 tokens -5 to -6 % against
  // T0 requests and no first-group request.
  auto request = [group_bytes](const uint8_t* group) {
    for (int64_t off = 0; off < group_bytes; off += 64)
      _mm_prefetch(reinterpret_cast<const char*>(group + off), _MM_HINT_NTA);
  };
  if (m_rows <= kBurstRows) request(weight);
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* group = weight + g * group_bytes;
    if (g + 1 < groups) request(group + group_bytes);
    for (int64_t r = 0; r < m_rows; r += 8) {
      with_rows(m_rows - r, [&](auto rows) {
        if constexpr (kType == QuantType::kQ7_0x8 || kType == QuantType::kQ8_0x8) {
          q8_rows8_group<kType, decltype(rows)::value>(group, x + r * blocks, blocks,
                                                       out + r * out_stride + 8 * g, out_stride);
        } else {
          x8_group<kType, decltype(rows)::value>(group, x + r * blocks, blocks,
                                                 out + r * out_stride + 8 * g, out_stride);
        }
      });
    }
  }
}

void tile_x8_avx2(QuantType type, const uint8_t* weight, int64_t groups, const Q8ActBlock* x,
                  int64_t blocks, int64_t m_rows, float* out, int64_t out_stride) {
  if (type == QuantType::kQ4_1x8)
    return tile_x8_type<QuantType::kQ4_1x8>(weight, groups, x, blocks, m_rows, out, out_stride);
  if (type == QuantType::kQ7_0x8)
    return tile_x8_type<QuantType::kQ7_0x8>(weight, groups, x, blocks, m_rows, out, out_stride);
  if (type == QuantType::kQ8_0x8)
    return tile_x8_type<QuantType::kQ8_0x8>(weight, groups, x, blocks, m_rows, out, out_stride);
  tile_x8_type<QuantType::kQ4_0x8>(weight, groups, x, blocks, m_rows, out, out_stride);
}

// ---- weight_row_dot (quant_gemm_impl.h) for the x8 layouts --------------------------------------

// v, opaque to the compiler: a product passed through it is rounded on its own, never fused
// with the following add (the scalar code's arithmetic, which has no fused multiply-add).
inline __m256 rounded(__m256 v) {
  __asm__("" : "+x"(v));
  return v;
}

// lanes += x[0, 8) * v, each product rounded.
inline __m256 add_products(__m256 lanes, const float* x, __m256 v) {
  return _mm256_add_ps(lanes, rounded(_mm256_mul_ps(_mm256_loadu_ps(x), v)));
}

// ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)).
inline float pairwise_sum(__m256 lanes) {
  const __m128 h1 = _mm_hadd_ps(_mm256_castps256_ps128(lanes), _mm256_extractf128_ps(lanes, 1));
  const __m128 h2 = _mm_hadd_ps(h1, h1);
  return _mm_cvtss_f32(h2) + _mm_cvtss_f32(_mm_shuffle_ps(h2, h2, 1));
}

// Four bytes of row r from each of the four consecutive 32-byte chunks at q (chunk c: the row's
// values 4c..4c+3, or their bytes) as one 16-byte vector, in value order.
inline __m128i row_chunks4(const uint8_t* q, int64_t r) {
  int32_t v[4];
  for (int c = 0; c < 4; ++c) std::memcpy(&v[c], q + 32 * c + 4 * r, 4);
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(v));
}

double row_dot_avx2(QuantType type, const uint8_t* weight, int64_t k, int64_t row, const float* x) {
  const bool q4_0 = type == QuantType::kQ4_0x8, q4_1 = type == QuantType::kQ4_1x8;
  const bool q8 = type == QuantType::kQ8_0x8 || type == QuantType::kQ7_0x8;
  if (!q4_0 && !q4_1 && !q8) return weight_row_dot_scalar(type, weight, k, row, x);
  const int64_t blocks = k / 32, group_block = 8 * quant_block_bytes(type);
  const int64_t header = q8 ? 48 : q4_1 ? 32 : 16, r = row % 8;
  const uint8_t* blk = weight + (row / 8) * blocks * group_block;
  const __m128i low4 = _mm_set1_epi8(0x0F);
  double total = 0.0;
  for (int64_t b = 0; b < blocks; ++b, blk += group_block, x += 32) {
    uint16_t h;
    std::memcpy(&h, blk + 2 * r, 2);
    const __m256 d = _mm256_set1_ps(_cvtsh_ss(h));
    __m256i q[4];  // the block's 32 values, 8 per vector, as int32
    if (q8) {
      const __m128i a = row_chunks4(blk + header, r), b2 = row_chunks4(blk + header + 128, r);
      q[0] = _mm256_cvtepi8_epi32(a);
      q[1] = _mm256_cvtepi8_epi32(_mm_srli_si128(a, 8));
      q[2] = _mm256_cvtepi8_epi32(b2);
      q[3] = _mm256_cvtepi8_epi32(_mm_srli_si128(b2, 8));
    } else {
      const __m128i bytes = row_chunks4(blk + header, r);
      const __m128i lo = _mm_and_si128(bytes, low4);
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
      q[0] = _mm256_cvtepu8_epi32(lo);
      q[1] = _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8));
      q[2] = _mm256_cvtepu8_epi32(hi);
      q[3] = _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8));
    }
    __m256 m = _mm256_setzero_ps();
    if (q4_1) {
      std::memcpy(&h, blk + 16 + 2 * r, 2);
      m = _mm256_set1_ps(_cvtsh_ss(h));
    }
    __m256 lanes = _mm256_setzero_ps();
    for (int g = 0; g < 4; ++g) {
      __m256 v = _mm256_cvtepi32_ps(q[g]);
      if (q4_0) v = _mm256_mul_ps(_mm256_sub_ps(v, _mm256_set1_ps(8.0f)), d);
      if (q4_1) v = _mm256_add_ps(rounded(_mm256_mul_ps(v, d)), m);
      if (q8) v = _mm256_mul_ps(v, d);
      lanes = add_products(lanes, x + 8 * g, v);
    }
    total += static_cast<double>(pairwise_sum(lanes));
  }
  return total;
}

// Q8_0x8's activations: unsigned (offset by 128) for vpdpbusd, signed for vpsignb.
const QuantGemmKernels kKernels = {kVnni ? "avx_vnni" : "avx2",
                                   quantize_row_avx2<127, 0>,
                                   tile_avx2,
                                   true,
                                   tile_x8_avx2,
                                   quantize_row_avx2<63, 64>,
                                   quantize_row_avx2<127, kVnni ? 128 : 0>,
                                   row_dot_avx2};

}  // namespace

#if FASTLLM_QUANT_GEMM_VNNI == 2
const QuantGemmKernels* avx512vl_quant_gemm_kernels() { return &kKernels; }
#elif defined(FASTLLM_QUANT_GEMM_VNNI)
const QuantGemmKernels* avxvnni_quant_gemm_kernels() { return &kKernels; }
#else
const QuantGemmKernels* avx2_quant_gemm_kernels() { return &kKernels; }
#endif

}  // namespace fastllm::kernels::cpu
