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
// CPU layouts Q4_0x8 / Q4_1x8 (quant_repack_rows8): groups of 8 consecutive rows stored together,
// block by block. One block of a group (8 x the source block bytes) is
//   d fp16[8] | (Q4_1x8: m fp16[8]) | 4 chunks of 32 bytes
// where byte 4 r + i of chunk c is source byte 4 c + i of row r (values 4c+i and 16+4c+i), so one
// 32-byte load holds the same 4 values of all 8 rows and each product of a GEMM lands in its own
// output lane. Rows keep their byte size, so a slice of rows starting at a multiple of 8 is a
// plain pointer offset.
//
// CPU layouts Q8_0x8 / Q7_0x8 (quant_pack_q8_0x8 / quant_pack_q7_0x8; for output projections):
// Q8_0 rows grouped by 8 rows like the x8 layouts above, their values kept (Q8_0x8) or
// requantized to 7 bits (Q7_0x8: |q| <= 63, a block keeps its values when they already fit). One
// block of a group (8 x 38 bytes) is
//   d fp16[8] | offset * sum(q) int32[8] | 8 chunks of 32 bytes, byte 4 r + i of chunk c =
//   q[4 c + i] of row r
// with offset 128 (Q8_0x8) or 64 (Q7_0x8). VNNI kernels read the activations stored offset by it
// (unsigned, as vpdpbusd takes them) and subtract the int32 term, which restores the exact
// integer dot product. On AVX2 without VNNI, Q8_0x8 moves the weights' signs onto the
// activations (llama.cpp's vpsignb trick) and widens every vpmaddubsw; Q7_0x8's 7-bit
// activations keep a vpmaddubsw pair within +-16002, so two sum in 16 bits before widening:
// ~1.5x faster there at 16-32 rows, at a cost in fidelity (README "Fidelity": the 7-bit output
// projection was the largest single source of divergence from fp32). On VNNI both cost the same.
//
// CPU layout F32 (type 0, ggml's id): rows of k float32 values, float dot products with no
// activation quantization; the reference the fidelity benchmark switches layers to.
//
// CPU fast path (Q8_0/Q4_0/Q4_1): x is quantized per 32 values to int8 with one float scale (like
// the weights), and each block pair becomes an integer dot product scaled once; parallel over
// slices of n, tiles of 4 rows of x inside each slice so a weight slice is read from memory once.
// The K-quants dequantize a weight row to float and use float dot products.
//
// Logits (refine_top_logits_cpu): the int8 activations move every logit a little; the few that
// carry a row's probability mass are then recomputed as float dot products with the
// dequantized rows, so the sampled distribution's head is the float model's.
#pragma once

#include <cstdint>

#include "fastllm/kernels/common.h"

namespace fastllm::kernels {

// Values match ggml's type ids, so the Python side can pass GGUF type numbers straight through.
// The x8 layouts have no ggml id; theirs are 1000 + the source type's.
enum class QuantType : int32_t {
  kF32 = 0,  // float32 rows (no quantization)
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ8_0 = 8,
  kQ4_K = 12,
  kQ6_K = 14,
  kQ4_0x8 = 1002,
  kQ4_1x8 = 1003,
  kQ7_0x8 = 1008,  // made from Q8_0, 7-bit
  kQ8_0x8 = 2008,  // made from Q8_0, its values kept
};

// The row-major type an x8 layout was made from (type itself otherwise).
QuantType quant_base_type(QuantType type);

// Rows of type that form one unit of its layout: 8 for the x8 layouts (Q7_0x8 and Q8_0x8
// included), else 1.
int64_t quant_row_group(QuantType type);

// Values per block of type (32 or 256; 1 for F32); 0 for an unknown type.
int64_t quant_block_values(QuantType type);

// Bytes per block of type; 0 for an unknown type.
int64_t quant_block_bytes(QuantType type);

// "Q8_0", "Q4_0", ... for messages.
const char* quant_type_name(QuantType type);

// Rewrites n rows of k values of type in place into its x8 layout and returns the x8 type; returns
// type unchanged (and leaves the bytes) when type has none (only Q4_0 and Q4_1 have) or n is not a
// multiple of 8. The x8 layouts are read by quant_gemm_cpu and embed_quant_rows_cpu only.
QuantType quant_repack_rows8(QuantType type, void* weight, int64_t n, int64_t k);

// Writes n Q8_0 rows of k values (n a multiple of 8) as Q7_0x8 into out (n * k / 32 * 38
// bytes).
void quant_pack_q7_0x8(const void* q8_0_rows, int64_t n, int64_t k, void* out);

// Writes n Q8_0 rows of k values (n a multiple of 8) as Q8_0x8 into out (n * k / 32 * 38
// bytes); the values are the rows' own.
void quant_pack_q8_0x8(const void* q8_0_rows, int64_t n, int64_t k, void* out);

// Writes n rows of k values of type (row-major) as target rows into dst, for the CPU kernels
// that read target faster: Q4_K -> Q4_1 (each 32-value sub-block is a Q4_1 block already: its
// scale d * sc and min -dmin * m are rounded to fp16, the nibbles kept), or any row-major type ->
// Q8_0 (values dequantized to float and rounded to 8 bits per 32, scale max|w| / 127; Q6_K's 16-
// value sub-blocks lose at most a quarter of their own step). Throws for other pairs.
void quant_convert_rows(QuantType type, const void* src, int64_t n, int64_t k, QuantType target,
                        void* dst);

// One block of a row-major 32-value type (Q8_0, Q4_0, Q4_1) as 32 floats, with the GGUF
// loader's arithmetic (Q4_0: (q - 8) * d, Q4_1: q * d + m).
void quant_dequantize_block(QuantType type, const uint8_t* block, float* out);

// Rows [0, n) of a weight in any layout quant_gemm_cpu reads (rows of k values) as float32
// out[n][k], with the GGUF loader's arithmetic.
void quant_dequantize_rows(QuantType type, const void* weight, int64_t n, int64_t k, float* out);

// Copies block `block` of row `row` of a weight in type's layout (rows of k values) as a block of
// the base type (quant_base_type) to out (quant_block_bytes(type) bytes).
void quant_read_block(QuantType type, const void* weight, int64_t k, int64_t row, int64_t block,
                      uint8_t* out);

// Token embedding rows from a table in a 32-value GGUF encoding (Q8_0, Q4_0, Q4_1, or their x8
// layouts): out[i] = dequantize(table row ids[i]), the same float arithmetic as the GGUF loader
// (Q4_0: (q - 8) * d, Q4_1: q * d + m). Throws KernelArgumentError for an id outside
// [0, num_rows) or another encoding.
void embed_quant_rows_cpu(const void* table, QuantType type, int64_t num_rows, int64_t dim,
                          const int32_t* ids, int64_t num_ids, float* out);

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
  QuantType type = QuantType::kQ8_0;  // x8 layouts need n % 8 == 0
  // False runs the portable scalar code even on an AVX2 CPU (tests compare the two).
  bool allow_simd = true;
};

void quant_gemm_cpu(const QuantGemmParams& params);

// Entries of a logits row refine_top_logits_cpu considers: those within this many logits of the
// row's largest (e^-16 ~ 1e-7 of its probability, below anything sampling or a logprob shows).
inline constexpr float kRefineMargin = 16.0f;

struct RefineLogitsParams {
  float* logits = nullptr;       // [m][n], rows logits_stride floats apart: quant_gemm_cpu's out
  const float* input = nullptr;  // [m][k], rows input_stride floats apart: its input
  const void* weight = nullptr;  // its weight, in any CPU layout quant_gemm_cpu reads
  const float* bias = nullptr;   // its bias (optional [n])
  int64_t m = 0;
  int64_t n = 0;
  int64_t k = 0;
  int64_t logits_stride = 0;
  int64_t input_stride = 0;
  QuantType type = QuantType::kQ8_0;
  int64_t count = 0;  // entries per row to recompute (0: none)
};

// In each row, recomputes the `count` largest logits among those within kRefineMargin of the
// row's maximum (ties: the lower index) as x . dequantize(W_j) (+ bias), in float within each
// 32-value block and in double across blocks: the float model's logits on the weights' own values,
// free of the activations' int8 rounding. Every row is computed alone (its result does not depend
// on the batch). F32 and the K-quants (float GEMMs already) are left as they are.
void refine_top_logits_cpu(const RefineLogitsParams& params);

// Name of the code path quant_gemm_cpu takes for the 32-value types: "avx512_vnni" (3+ rows of x
// in AVX-512 VNNI, fewer rows as "avx_vnni" or "avx2"), "avx_vnni", "avx2" or "scalar". Env
// FASTLLM_CPU_ISA=scalar|avx2|avx_vnni|avx512, read at the first call, caps the choice (an
// unknown value throws KernelArgumentError).
const char* quant_gemm_cpu_isa();

#ifdef FASTLLM_WITH_CUDA
// Dequantizes in the kernel and accumulates in float (no activation quantization).
void quant_gemm_cuda(const QuantGemmParams& params, void* stream);
#endif

}  // namespace fastllm::kernels
