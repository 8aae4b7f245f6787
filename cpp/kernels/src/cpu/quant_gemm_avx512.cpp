// AVX-512 VNNI micro-kernels of the quantized GEMM for 3 to 8 rows of x (prefill and batched
// decode): each 512-bit dot product covers two weight blocks (two consecutive blocks of a 4-bit
// row; the same block of two Q8_0 rows), and one reduction tree turns the 8 rows x 2 blocks of
// int32 partial sums into a single vector, so the per-block float work is shared by 16 pairs.
// 1-2 rows, the x8 layouts and the activation quantization use the 256-bit kernels with the EVEX
// vpdpbusd (quant_gemm_avx512vl.cpp). Built with -mavx512f
// -mavx512bw -mavx512vl -mavx512vnni; picked at run time only on CPUs that have them.
#include <immintrin.h>

#include <cstring>

#include "quant_gemm_impl.h"

namespace fastllm::kernels::cpu {
namespace {

inline float load_half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline __m256i unpack_nibbles(const uint8_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), mask), _mm_and_si128(raw, mask));
}

constexpr int64_t kPrefetchRows = 8;  // see quant_gemm_avx2.cpp

template <QuantType kType>
constexpr int64_t kBlockBytes = kType == QuantType::kQ8_0   ? 34
                                : kType == QuantType::kQ4_0 ? 18
                                                            : 20;

// 32 nibbles of a 4-bit block as bytes.
template <QuantType kType>
inline __m256i block_quants(const uint8_t* w) {
  return unpack_nibbles(w + (kType == QuantType::kQ4_0 ? 2 : 4));
}

template <QuantType kType>
inline float block_min(const uint8_t* w, float dw) {
  if constexpr (kType == QuantType::kQ4_0) return -8.0f * dw;
  return load_half(w + 2);
}

// p[r] holds row r's int32 partial sums, lanes 0-7 for block b and 8-15 for block b + 1. Returns
// the 16 totals in 128-bit lanes [rows 0-3 of b, rows 0-3 of b+1, rows 4-7 of b, rows 4-7 of b+1].
inline __m512i reduce8x2(const __m512i* p) {
  auto pairs = [](__m512i a, __m512i b) {
    return _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  };
  const __m512i t0 = pairs(p[0], p[1]), t1 = pairs(p[2], p[3]);
  const __m512i t2 = pairs(p[4], p[5]), t3 = pairs(p[6], p[7]);
  const __m512i u0 = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
  const __m512i u1 = _mm512_add_epi32(_mm512_unpacklo_epi64(t2, t3), _mm512_unpackhi_epi64(t2, t3));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(u0, u1, _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_i32x4(u0, u1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// 4-bit weights (row-major Q4_0 / Q4_1; the x8 layouts have their own kernels).
template <QuantType kType, int kRows>
void tile_rows_zmm(const uint8_t* weight, int64_t n_rows, const Q8ActBlock* x, int64_t blocks,
                   const float* xd, const float* xs, float* out, int64_t out_stride) {
  constexpr int64_t block_bytes = kBlockBytes<kType>;
  constexpr __mmask16 kSecond = 0xF0F0;  // lanes of block b + 1 in reduce8x2's order
  const __m512i zero = _mm512_setzero_si512();
  const int64_t row_bytes = blocks * block_bytes;
  for (int64_t j = 0; j < n_rows; ++j) {
    const uint8_t* row = weight + j * row_bytes;
    if (j + kPrefetchRows < n_rows)
      for (int64_t off = 0; off < row_bytes; off += 64)
        _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchRows * row_bytes + off),
                     _MM_HINT_T0);
    __m512 acc = _mm512_setzero_ps();
    __m512 offset = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b += 2) {
      const bool pair = b + 1 < blocks;
      const uint8_t* w0 = row + b * block_bytes;
      const uint8_t* w1 = w0 + block_bytes;
      const float dw0 = load_half(w0);
      const float dw1 = pair ? load_half(w1) : 0.0f;
      const __m512i wq =
          _mm512_inserti64x4(_mm512_castsi256_si512(block_quants<kType>(w0)),
                             pair ? block_quants<kType>(w1) : _mm256_setzero_si256(), 1);
      __m512i p[8];
      for (int r = 0; r < 8; ++r) {
        if (r >= kRows) {
          p[r] = zero;
          continue;
        }
        const Q8ActBlock* xb = x + r * blocks + b;
        const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb[0].q));
        const __m512i xv =
            pair ? _mm512_inserti64x4(_mm512_castsi256_si512(lo),
                                      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb[1].q)),
                                      1)
                 : _mm512_zextsi256_si512(lo);
        p[r] = _mm512_dpbusd_epi32(zero, wq, xv);
      }
      const __mmask16 valid = pair ? 0xFFFF : 0x00FF;
      const __m512 d = _mm512_maskz_loadu_ps(valid, xd + b * 8);
      const __m512 scale =
          _mm512_mul_ps(_mm512_shuffle_f32x4(d, d, _MM_SHUFFLE(3, 1, 2, 0)),
                        _mm512_mask_blend_ps(kSecond, _mm512_set1_ps(dw0), _mm512_set1_ps(dw1)));
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(reduce8x2(p)), scale, acc);
      const __m512 s = _mm512_maskz_loadu_ps(valid, xs + b * 8);
      const float m1 = pair ? block_min<kType>(w1, dw1) : 0.0f;
      offset =
          _mm512_fmadd_ps(_mm512_shuffle_f32x4(s, s, _MM_SHUFFLE(3, 1, 2, 0)),
                          _mm512_mask_blend_ps(kSecond, _mm512_set1_ps(block_min<kType>(w0, dw0)),
                                               _mm512_set1_ps(m1)),
                          offset);
    }
    acc = _mm512_add_ps(acc, offset);
    // Rows 0-3 are lanes L0 + L1, rows 4-7 lanes L2 + L3.
    const __m512 sum = _mm512_add_ps(_mm512_shuffle_f32x4(acc, acc, _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_f32x4(acc, acc, _MM_SHUFFLE(3, 1, 3, 1)));
    alignas(32) float sums[8];
    _mm256_store_ps(sums, _mm512_castps512_ps256(sum));
    for (int r = 0; r < kRows; ++r) out[r * out_stride + j] = sums[r];
  }
}

// 3 to 8 rows of x against Q8_0 weights, two weight rows at a time: each 512-bit dot product
// pairs one block of weight row j (low half) with the same block of row j + 1 (high half) against
// the row of x broadcast to both halves, and reduce8x2 turns the 8 rows x 2 weight rows of int32
// sums into one vector. Every lane then takes acc = fma(isum, d_x * d_w, acc) in block order:
// the arithmetic of the AVX2 / AVX-VNNI Q8_0 kernels for any number of rows, so a row's result
// does not depend on the batch it came in (nor on which of these kernels ran).
template <int kRows>
void tile_rows_q8(const uint8_t* weight, int64_t n_rows, const Q8ActBlock* x, int64_t blocks,
                  const float* xd, float* out, int64_t out_stride) {
  constexpr int64_t block_bytes = kBlockBytes<QuantType::kQ8_0>;
  constexpr __mmask16 kSecond = 0xF0F0;  // lanes of weight row j + 1 in reduce8x2's order
  const __m512i zero = _mm512_setzero_si512();
  const int64_t row_bytes = blocks * block_bytes;
  for (int64_t j = 0; j < n_rows; j += 2) {
    const bool pair = j + 1 < n_rows;
    const uint8_t* row0 = weight + j * row_bytes;
    const uint8_t* row1 = pair ? row0 + row_bytes : row0;
    const bool prefetch = j + kPrefetchRows + 1 < n_rows;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* w0 = row0 + b * block_bytes;
      const uint8_t* w1 = row1 + b * block_bytes;
      // The rows kPrefetchRows ahead, a block at a time: one burst per row pair at its start
      // (as the 4-bit kernel does) left this two-stream loop 20% slower from DRAM.
      if (prefetch) {
        _mm_prefetch(reinterpret_cast<const char*>(w0 + kPrefetchRows * row_bytes), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(w0 + (kPrefetchRows + 1) * row_bytes),
                     _MM_HINT_T0);
      }
      // A lone last row pairs with zeros (scale 0): its own lanes are computed as in a pair.
      const __m512i wq = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + 2))),
          pair ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w1 + 2))
               : _mm256_setzero_si256(),
          1);
      // dpbusd takes unsigned x signed: move the weights' signs onto x.
      const __m512i wu = _mm512_abs_epi8(wq);
      const __mmask64 negative = _mm512_movepi8_mask(wq);
      __m512i p[8];
      for (int r = 0; r < 8; ++r) {
        if (r >= kRows) {
          p[r] = zero;
          continue;
        }
        const __m512i xv = _mm512_broadcast_i64x4(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[r * blocks + b].q)));
        p[r] = _mm512_dpbusd_epi32(zero, wu, _mm512_mask_sub_epi8(xv, negative, zero, xv));
      }
      // xd's rows 0-3 and 4-7 each in two 128-bit lanes, times d_w of row j or j + 1.
      const __m512 d = _mm512_castps256_ps512(_mm256_loadu_ps(xd + b * 8));
      const __m512 dw = _mm512_mask_blend_ps(kSecond, _mm512_set1_ps(load_half(w0)),
                                             _mm512_set1_ps(pair ? load_half(w1) : 0.0f));
      const __m512 scale = _mm512_mul_ps(_mm512_shuffle_f32x4(d, d, _MM_SHUFFLE(1, 1, 0, 0)), dw);
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(reduce8x2(p)), scale, acc);
    }
    // Lanes [rows 0-3 of j, rows 0-3 of j + 1, rows 4-7 of j, rows 4-7 of j + 1].
    alignas(64) float sums[16];
    _mm512_store_ps(sums, acc);
    for (int r = 0; r < kRows; ++r) {
      const int lane = (r / 4) * 8 + r % 4;
      out[r * out_stride + j] = sums[lane];
      if (pair) out[r * out_stride + j + 1] = sums[lane + 4];
    }
  }
}

template <QuantType kType>
void tile_type(const uint8_t* weight, int64_t n_rows, const Q8ActBlock* x, int64_t blocks,
               const float* xd, const float* xs, int64_t m_rows, float* out, int64_t out_stride) {
  switch (m_rows) {
    case 3:
      return tile_rows_zmm<kType, 3>(weight, n_rows, x, blocks, xd, xs, out, out_stride);
    case 4:
      return tile_rows_zmm<kType, 4>(weight, n_rows, x, blocks, xd, xs, out, out_stride);
    case 5:
      return tile_rows_zmm<kType, 5>(weight, n_rows, x, blocks, xd, xs, out, out_stride);
    case 6:
      return tile_rows_zmm<kType, 6>(weight, n_rows, x, blocks, xd, xs, out, out_stride);
    case 7:
      return tile_rows_zmm<kType, 7>(weight, n_rows, x, blocks, xd, xs, out, out_stride);
    default:
      return tile_rows_zmm<kType, 8>(weight, n_rows, x, blocks, xd, xs, out, out_stride);
  }
}

// The 256-bit kernels with the EVEX vpdpbusd (quant_gemm_avx512vl.cpp): AVX-512 VNNI does not
// imply AVX-VNNI (Ice Lake, Zen 4 lack the VEX form), and these need only what this file does.
const QuantGemmKernels* narrow_kernels() { return avx512vl_quant_gemm_kernels(); }

void tile_avx512(QuantType type, const uint8_t* weight, int64_t n_rows, const Q8ActBlock* x,
                 int64_t blocks, const float* xd, const float* xs, const int8_t* xi, int64_t m_rows,
                 float* out, int64_t out_stride) {
  static_assert(kQuantTileRows == 8, "tile_type handles up to 8 rows");
  if (m_rows <= 2)
    return narrow_kernels()->tile(type, weight, n_rows, x, blocks, xd, xs, xi, m_rows, out,
                                  out_stride);
  switch (type) {
    case QuantType::kQ8_0:
      switch (m_rows) {
        case 3:
          return tile_rows_q8<3>(weight, n_rows, x, blocks, xd, out, out_stride);
        case 4:
          return tile_rows_q8<4>(weight, n_rows, x, blocks, xd, out, out_stride);
        case 5:
          return tile_rows_q8<5>(weight, n_rows, x, blocks, xd, out, out_stride);
        case 6:
          return tile_rows_q8<6>(weight, n_rows, x, blocks, xd, out, out_stride);
        case 7:
          return tile_rows_q8<7>(weight, n_rows, x, blocks, xd, out, out_stride);
        default:
          return tile_rows_q8<8>(weight, n_rows, x, blocks, xd, out, out_stride);
      }
    case QuantType::kQ4_0:
      return tile_type<QuantType::kQ4_0>(weight, n_rows, x, blocks, xd, xs, m_rows, out,
                                         out_stride);
    default:
      return tile_type<QuantType::kQ4_1>(weight, n_rows, x, blocks, xd, xs, m_rows, out,
                                         out_stride);
  }
}

void quantize_row_avx512(const float* x, int64_t k, Q8ActBlock* out) {
  narrow_kernels()->quantize_row(x, k, out);
}

void quantize_row_u7_avx512(const float* x, int64_t k, Q8ActBlock* out) {
  narrow_kernels()->quantize_row_u7(x, k, out);
}

void quantize_row_q8_0x8_avx512(const float* x, int64_t k, Q8ActBlock* out) {
  narrow_kernels()->quantize_row_q8_0x8(x, k, out);
}

// ---- x8 layouts, two 8-row groups per 512-bit vector
// --------------------------------------------- Lanes 0-7 hold group g's rows and lanes 8-15 group
// g + 1's: the 256-bit kernels' per-lane arithmetic (quant_gemm_avx2.cpp: x8_group, q8_rows8_group)
// at twice the width, so every output gets the same bits from either (a lone last group runs the
// 256-bit kernel).

// 32 bytes at a (low half) and at b (high half).
inline __m512i load_pair(const uint8_t* a, const uint8_t* b) {
  return _mm512_inserti64x4(
      _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a))),
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)), 1);
}

// 8 fp16 at a and 8 at b as 16 floats.
inline __m512 halves_pair(const uint8_t* a, const uint8_t* b) {
  return _mm512_cvtph_ps(_mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a))),
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(b)), 1));
}

inline __m512i bcast4(const int8_t* q) {
  int32_t v;
  std::memcpy(&v, q, 4);
  return _mm512_set1_epi32(v);
}

// Every line of bytes [p, p + n), non-temporal: weights stream through once.
inline void prefetch_lines(const uint8_t* p, int64_t n) {
  for (int64_t off = 0; off < n; off += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p + off), _MM_HINT_NTA);
}

// The lines of bytes [off, off + n) of the group at `next` and of the one group_bytes after it,
// non-temporal.
inline void prefetch_block(const uint8_t* next, int64_t group_bytes, int64_t off, int64_t n) {
  for (int64_t i = 0; i < n; i += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(next + off + i), _MM_HINT_NTA);
    _mm_prefetch(reinterpret_cast<const char*>(next + group_bytes + off + i), _MM_HINT_NTA);
  }
}

// kRows (<= 8) rows of x against groups a and b. Q4_0x8 / Q4_1x8: x8_group's arithmetic (the
// nibbles unpacked, weights by activations, then Q4_0's -8 d_w or Q4_1's m_w times s_x); Q7_0x8 /
// Q8_0x8: q8_rows8_group's VNNI arithmetic (activations stored offset into unsigned bytes, the
// block's offset term subtracted).
template <QuantType kType, int kRows>
void group_pair(const uint8_t* a, const uint8_t* b, const Q8ActBlock* x, int64_t blocks, float* out,
                int64_t out_stride, const uint8_t* next) {
  constexpr bool kEightBit = kType == QuantType::kQ7_0x8 || kType == QuantType::kQ8_0x8;
  constexpr bool kQ4_1 = kType == QuantType::kQ4_1x8;
  constexpr int64_t group_block = 8 * (kEightBit ? 38 : kQ4_1 ? 20 : 18);
  constexpr int64_t header = kEightBit ? 48 : kQ4_1 ? 32 : 16;
  const __m512i mask = _mm512_set1_epi8(0x0F);
  __m512 acc[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const uint8_t* wa = a + blk * group_block;
    const uint8_t* wb = b + blk * group_block;
    if (next != nullptr) prefetch_block(next, b - a, blk * group_block, group_block);
    const __m512 dw = halves_pair(wa, wb);
    __m512 mw = _mm512_setzero_ps();          // the 4-bit types' offset term per s_x
    __m512i offset = _mm512_setzero_si512();  // the 8-bit types' offset term
    __m512i q[8];
    if constexpr (kEightBit) {
      offset = load_pair(wa + 16, wb + 16);
      for (int c = 0; c < 8; ++c) q[c] = load_pair(wa + header + 32 * c, wb + header + 32 * c);
    } else {
      mw = kQ4_1 ? halves_pair(wa + 16, wb + 16) : _mm512_mul_ps(dw, _mm512_set1_ps(-8.0f));
      for (int c = 0; c < 4; ++c) {
        const __m512i raw = load_pair(wa + header + 32 * c, wb + header + 32 * c);
        q[c] = _mm512_and_si512(raw, mask);
        q[c + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), mask);
      }
    }
    for (int r = 0; r < kRows; ++r) {
      const Q8ActBlock& xb = x[r * blocks + blk];
      // Two chains of four (integer sums: the same total in any order) halve the dependent
      // dpbusd latency, which bounds the few-row tiles. vpdpbusd's unsigned operand: the 4-bit
      // weights, or the 8-bit types' offset activations.
      __m512i even = _mm512_setzero_si512(), odd = _mm512_setzero_si512();
      for (int c = 0; c < 8; c += 2) {
        if constexpr (kEightBit) {
          even = _mm512_dpbusd_epi32(even, bcast4(xb.q + 4 * c), q[c]);
          odd = _mm512_dpbusd_epi32(odd, bcast4(xb.q + 4 * c + 4), q[c + 1]);
        } else {
          even = _mm512_dpbusd_epi32(even, q[c], bcast4(xb.q + 4 * c));
          odd = _mm512_dpbusd_epi32(odd, q[c + 1], bcast4(xb.q + 4 * c + 4));
        }
      }
      __m512i isum = _mm512_add_epi32(even, odd);
      if constexpr (kEightBit) isum = _mm512_sub_epi32(isum, offset);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dw, _mm512_set1_ps(xb.d)),
                               acc[r]);
      if constexpr (!kEightBit) acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(xb.s), acc[r]);
    }
  }
  for (int r = 0; r < kRows; ++r) _mm512_storeu_ps(out + r * out_stride, acc[r]);
}

template <QuantType kType>
void tile_x8_pairs(const uint8_t* weight, int64_t groups, const Q8ActBlock* x, int64_t blocks,
                   int64_t m_rows, float* out, int64_t out_stride) {
  const int64_t group_bytes = blocks * 8 * quant_block_bytes(kType), pair_bytes = 2 * group_bytes;
  // The next pair streams in while this one computes. With a few rows of x (decoding a few
  // sequences) a pair computes in less time than its memory takes to arrive, so all of the next
  // pair's lines are requested when this one starts (the first pair's when the tile does); with
  // more rows the requests go out block by block, paced by the pair's longer compute. Each measured
  // best where it is used (moe_step, alternating runs: 1 token -6 %, 2 tokens -3 % with the burst;
  // 8 tokens +9 %, 16 tokens +12 % with it).
  const bool burst = m_rows <= kBurstRows;
  if (burst && groups >= 2) prefetch_lines(weight, pair_bytes);
  for (int64_t g = 0; g + 1 < groups; g += 2) {
    const uint8_t* a = weight + g * group_bytes;
    const bool more = g + 3 < groups;
    if (burst && more) prefetch_lines(a + pair_bytes, pair_bytes);
    auto next = [&](int64_t r) { return !burst && more && r == 0 ? a + pair_bytes : nullptr; };
    for (int64_t r = 0; r < m_rows; r += 8) {
      with_rows(m_rows - r, [&](auto rows) {
        group_pair<kType, decltype(rows)::value>(a, a + group_bytes, x + r * blocks, blocks,
                                                 out + r * out_stride + 8 * g, out_stride, next(r));
      });
    }
  }
  if (groups % 2)
    narrow_kernels()->tile_x8(kType, weight + (groups - 1) * group_bytes, 1, x, blocks, m_rows,
                              out + 8 * (groups - 1), out_stride);
}

void tile_x8_avx512(QuantType type, const uint8_t* weight, int64_t groups, const Q8ActBlock* x,
                    int64_t blocks, int64_t m_rows, float* out, int64_t out_stride) {
  switch (type) {
    case QuantType::kQ4_0x8:
      return tile_x8_pairs<QuantType::kQ4_0x8>(weight, groups, x, blocks, m_rows, out, out_stride);
    case QuantType::kQ4_1x8:
      return tile_x8_pairs<QuantType::kQ4_1x8>(weight, groups, x, blocks, m_rows, out, out_stride);
    case QuantType::kQ7_0x8:
      return tile_x8_pairs<QuantType::kQ7_0x8>(weight, groups, x, blocks, m_rows, out, out_stride);
    case QuantType::kQ8_0x8:
      return tile_x8_pairs<QuantType::kQ8_0x8>(weight, groups, x, blocks, m_rows, out, out_stride);
    default:
      return narrow_kernels()->tile_x8(type, weight, groups, x, blocks, m_rows, out, out_stride);
  }
}

double row_dot_avx512(QuantType type, const uint8_t* weight, int64_t k, int64_t row,
                      const float* x) {
  return narrow_kernels()->row_dot(type, weight, k, row, x);
}

const QuantGemmKernels kKernels = {
    "avx512_vnni",          quantize_row_avx512,        tile_avx512,   false, tile_x8_avx512,
    quantize_row_u7_avx512, quantize_row_q8_0x8_avx512, row_dot_avx512};

}  // namespace

const QuantGemmKernels* avx512_quant_gemm_kernels() { return &kKernels; }

}  // namespace fastllm::kernels::cpu
