// Internals shared by the CPU quantized GEMM launcher (quant_gemm.cpp) and its AVX2 micro-kernels
// (quant_gemm_avx2.cpp, the only file of the two built with -mavx2 -mfma -mf16c).
#pragma once

#include <cstdint>
#include <type_traits>

#include "fastllm/kernels/quant_gemm.h"

namespace fastllm::kernels::cpu {

// One block of 32 activations quantized to int8: x[i] ~= q[i] * d; s = d * sum(q) serves the
// offset terms of Q4_0 (-8 d_w) and Q4_1 (m_w).
struct Q8ActBlock {
  float d;
  float s;
  int8_t q[32];
};
static_assert(sizeof(Q8ActBlock) == 40, "Q8ActBlock must be packed");

// Calls f(std::integral_constant<int, rows>) for 1..8 rows (8 for more): the micro-kernels'
// row counts as template arguments. (Each kernel file instantiates it with its own lambdas.)
template <typename F>
inline void with_rows(int64_t m_rows, F&& f) {
  switch (m_rows) {
    case 1:
      return f(std::integral_constant<int, 1>());
    case 2:
      return f(std::integral_constant<int, 2>());
    case 3:
      return f(std::integral_constant<int, 3>());
    case 4:
      return f(std::integral_constant<int, 4>());
    case 5:
      return f(std::integral_constant<int, 5>());
    case 6:
      return f(std::integral_constant<int, 6>());
    case 7:
      return f(std::integral_constant<int, 7>());
    default:
      return f(std::integral_constant<int, 8>());
  }
}

// Rows of x processed together by one tile call; each weight block is decoded once per tile.
constexpr int kQuantTileRows = 8;

// Bytes of one block of a tile's interleaved activations: 8 groups of 4 values x 8 rows.
constexpr int64_t kInterleavedBlockBytes = 32 * kQuantTileRows;

// Rows of x up to which the x8 tile kernels request all of the next weight groups' lines when
// the groups before them start (and the first groups' when the tile starts): so few rows compute
// faster than their weights arrive. With more rows the requests are paced by the compute.
constexpr int64_t kBurstRows = 4;

struct QuantGemmKernels {
  const char* name;
  // Quantizes k floats (k a multiple of 32) into k / 32 blocks: d = max|x| / 127, q = round(x / d)
  // half to even; all-zero blocks get d = 0. Both implementations round identically.
  void (*quantize_row)(const float* x, int64_t k, Q8ActBlock* out);
  // For the 32-value types: out[r * out_stride + j] = x_r . W_j for r < m_rows (<= 8) and
  // j < n_rows, where W_j is the weight row at weight + j * blocks * block_bytes and x_r the
  // blocks at x + r * blocks. xd / xs hold the tile's scales transposed: xd[b * 8 + r] = x_r's
  // block b d (s likewise), 0 for rows past m_rows. xi holds the tile's quants interleaved
  // for one broadcast weight group against all rows: xi[b * 256 + g * 32 + r * 4 + i] = x_r's
  // block b value 4 g + i (0 for rows past m_rows).
  void (*tile)(QuantType type, const uint8_t* weight, int64_t n_rows, const Q8ActBlock* x,
               int64_t blocks, const float* xd, const float* xs, const int8_t* xi, int64_t m_rows,
               float* out, int64_t out_stride);
  // Whether tile reads xi for Q4_0/Q4_1 tiles of 3+ rows; the launcher builds it only then.
  bool reads_interleaved = false;
  // For the x8 layouts: out[r * out_stride + 8 g + i] = x_r . W_{8g+i} for r < m_rows (any
  // number) and g < groups, W the groups at weight. Each output is computed by the same
  // operations in the same order whatever m_rows is, so a row's result does not depend on the
  // batch it came in.
  // (Q7_0x8 reads blocks of quantize_row_u7, Q8_0x8 those of quantize_row_q8_0x8.)
  void (*tile_x8)(QuantType type, const uint8_t* weight, int64_t groups, const Q8ActBlock* x,
                  int64_t blocks, int64_t m_rows, float* out, int64_t out_stride) = nullptr;
  // As quantize_row with d = max|x| / 63 and q stored as round(x / d) + 64 (1..127); s = d *
  // sum(round(x / d)).
  void (*quantize_row_u7)(const float* x, int64_t k, Q8ActBlock* out) = nullptr;
  // The activations tile_x8 reads for Q8_0x8: quantize_row's, with q stored + 128 (1..255,
  // unsigned for vpdpbusd) by the VNNI kernels and as they are by the others.
  void (*quantize_row_q8_0x8)(const float* x, int64_t k, Q8ActBlock* out) = nullptr;
  // weight_row_dot for the x8 layouts (others, and a null entry: the scalar code), bit for bit.
  double (*row_dot)(QuantType type, const uint8_t* weight, int64_t k, int64_t row,
                    const float* x) = nullptr;
};

const QuantGemmKernels& scalar_quant_gemm_kernels();

// The x8 layouts' GEMM in its two halves, for a caller that multiplies one set of activations by
// several weights (the MoE experts): quantize_x8_row writes one row of k values of x as k / 32
// blocks, the way quant_gemm_cpu quantizes it for `type`; x8_gemm_quantized sets
// out[r * out_stride + 8 g + i] = x_r . W_{8 g + i} for r < m and g < groups, x_r the blocks at
// xq + r * k / 32 and W the 8-row groups at weight (of k values), bit for bit quant_gemm_cpu's
// result. Both run on the calling thread.
void quantize_x8_row(QuantType type, const float* x, int64_t k, Q8ActBlock* out, bool allow_simd);
void x8_gemm_quantized(QuantType type, const void* weight, int64_t groups, const Q8ActBlock* xq,
                       int64_t k, int64_t m, float* out, int64_t out_stride, bool allow_simd);

// Row `row` of a weight in any layout quant_gemm_cpu reads (rows of k values) as k floats, with
// the GGUF loader's arithmetic.
void dequantize_weight_row(QuantType type, const void* weight, int64_t k, int64_t row, float* y);
// x . W_row for row `row` of a weight in any layout quant_gemm_cpu reads (k values a row, k a
// whole number of 32-value blocks), on dequantize_weight_row's values: per block eight float
// lanes (each product rounded, then added: no fused multiply-add), the lanes summed pairwise,
// ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)), into a double, block after block. The same
// bits on every instruction set (refine_top_logits_cpu's dot products).
double weight_row_dot(QuantType type, const void* weight, int64_t k, int64_t row, const float* x);
double weight_row_dot_scalar(QuantType type, const uint8_t* weight, int64_t k, int64_t row,
                             const float* x);
// Null when the library was built without the AVX2 file (non-x86 targets).
const QuantGemmKernels* avx2_quant_gemm_kernels();
// Null when the compiler had no -mavxvnni.
const QuantGemmKernels* avxvnni_quant_gemm_kernels();
// Null when the compiler had no -mavx512vnni.
const QuantGemmKernels* avx512_quant_gemm_kernels();
// The AVX2 kernels with the EVEX vpdpbusd; built (and used by the AVX-512 kernels) with them.
const QuantGemmKernels* avx512vl_quant_gemm_kernels();

}  // namespace fastllm::kernels::cpu
