// CPU quantized GEMM launcher and the portable scalar micro-kernels. The AVX2 micro-kernels live in
// quant_gemm_avx2.cpp and are picked at run time.
#include "fastllm/kernels/quant_gemm.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "fastllm/kernels/dtype_convert.h"
#include "parallel.h"
#include "quant_gemm_impl.h"
#include "vec.h"

namespace fastllm::kernels {

QuantType quant_base_type(QuantType type) {
  switch (type) {
    case QuantType::kQ4_0x8:
      return QuantType::kQ4_0;
    case QuantType::kQ4_1x8:
      return QuantType::kQ4_1;
    case QuantType::kQ7_0x8:
    case QuantType::kQ8_0x8:
      return QuantType::kQ8_0;
    default:
      return type;
  }
}

int64_t quant_row_group(QuantType type) { return quant_base_type(type) == type ? 1 : 8; }

int64_t quant_block_values(QuantType type) {
  switch (quant_base_type(type)) {
    case QuantType::kF32:
      return 1;
    case QuantType::kQ8_0:
    case QuantType::kQ4_0:
    case QuantType::kQ4_1:
      return 32;
    case QuantType::kQ4_K:
    case QuantType::kQ6_K:
      return 256;
  }
  return 0;
}

int64_t quant_block_bytes(QuantType type) {
  // 8 rows: 8 scales, 8 offset sums, 256 quants
  if (type == QuantType::kQ7_0x8 || type == QuantType::kQ8_0x8) return 38;
  switch (quant_base_type(type)) {
    case QuantType::kF32:
      return 4;
    case QuantType::kQ8_0:
      return 34;
    case QuantType::kQ4_0:
      return 18;
    case QuantType::kQ4_1:
      return 20;
    case QuantType::kQ4_K:
      return 144;
    case QuantType::kQ6_K:
      return 210;
  }
  return 0;
}

const char* quant_type_name(QuantType type) {
  switch (type) {
    case QuantType::kF32:
      return "F32";
    case QuantType::kQ8_0:
      return "Q8_0";
    case QuantType::kQ4_0:
      return "Q4_0";
    case QuantType::kQ4_1:
      return "Q4_1";
    case QuantType::kQ4_K:
      return "Q4_K";
    case QuantType::kQ6_K:
      return "Q6_K";
    case QuantType::kQ4_0x8:
      return "Q4_0x8";
    case QuantType::kQ4_1x8:
      return "Q4_1x8";
    case QuantType::kQ7_0x8:
      return "Q7_0x8";
    case QuantType::kQ8_0x8:
      return "Q8_0x8";
  }
  return "unknown";
}

namespace {

// The 8-row layouts of Q8_0 values (8 or 7 bits): 8 chunks of quants after 8 scales and 8
// offset sums.
bool q8_rows8(QuantType type) { return type == QuantType::kQ7_0x8 || type == QuantType::kQ8_0x8; }

// Bytes before the quants in one block of an x8 group: the 8 scales (and 8 mins, or 8 offset
// sums).
int64_t x8_header_bytes(QuantType type) {
  return q8_rows8(type) ? 48 : type == QuantType::kQ4_1x8 ? 32 : 16;
}

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return half_to_float(h);
}

// v rounded to the nearest integer in [-limit, limit]; 0 for NaN (a corrupt scale).
inline float clamp_round(float v, float limit) {
  return v == v ? std::clamp(std::nearbyint(v), -limit, limit) : 0.0f;
}

}  // namespace

QuantType quant_repack_rows8(QuantType type, void* weight, int64_t n, int64_t k) {
  QuantType packed;
  if (type == QuantType::kQ4_0)
    packed = QuantType::kQ4_0x8;
  else if (type == QuantType::kQ4_1)
    packed = QuantType::kQ4_1x8;
  else
    return type;
  check_arg(n >= 0 && k > 0 && k % 32 == 0, "quant_repack_rows8: bad sizes");
  if (n % 8 != 0) return type;
  const int64_t block_bytes = quant_block_bytes(type), blocks = k / 32;
  const int64_t row_bytes = blocks * block_bytes, header = x8_header_bytes(packed);
  const int64_t quant_offset = block_bytes - 16;  // the 16 nibble bytes end each block
  std::vector<uint8_t> group(static_cast<size_t>(8 * row_bytes));
  auto* base = static_cast<uint8_t*>(weight);
  for (int64_t g = 0; g < n / 8; ++g) {
    uint8_t* src = base + g * 8 * row_bytes;
    for (int64_t b = 0; b < blocks; ++b) {
      uint8_t* dst = group.data() + b * 8 * block_bytes;
      for (int r = 0; r < 8; ++r) {
        const uint8_t* blk = src + r * row_bytes + b * block_bytes;
        std::memcpy(dst + 2 * r, blk, 2);                             // d
        if (header == 32) std::memcpy(dst + 16 + 2 * r, blk + 2, 2);  // m
        for (int c = 0; c < 4; ++c)
          std::memcpy(dst + header + 32 * c + 4 * r, blk + quant_offset + 4 * c, 4);
      }
    }
    std::memcpy(src, group.data(), group.size());
  }
  return packed;
}

namespace {

// Q8_0 rows into Q7_0x8 (seven_bit) or Q8_0x8 (quant_gemm.h).
void pack_q8_rows8(const void* q8_0_rows, int64_t n, int64_t k, void* out, bool seven_bit) {
  check_arg(n >= 0 && n % 8 == 0 && k > 0 && k % 32 == 0,
            std::string(seven_bit ? "quant_pack_q7_0x8" : "quant_pack_q8_0x8") +
                ": needs rows in multiples of 8 and whole blocks of 32");
  const int32_t offset = seven_bit ? 64 : 128;
  const int64_t blocks = k / 32, src_row = blocks * 34;
  const auto* src = static_cast<const uint8_t*>(q8_0_rows);
  auto* dst = static_cast<uint8_t*>(out);
  for (int64_t g = 0; g < n / 8; ++g) {
    for (int64_t b = 0; b < blocks; ++b, dst += 8 * 38) {
      for (int r = 0; r < 8; ++r) {
        const uint8_t* blk = src + (8 * g + r) * src_row + b * 34;
        const auto* q8 = reinterpret_cast<const int8_t*>(blk + 2);
        int amax = 0;
        for (int i = 0; i < 32; ++i) amax = std::max(amax, std::abs(static_cast<int>(q8[i])));
        uint16_t d = 0;
        std::memcpy(&d, blk, 2);
        int8_t values[32];
        if (!seven_bit || amax <= 63) {
          std::memcpy(values, q8, 32);  // 8-bit layout, or already 7-bit: kept exactly
        } else {
          // The new scale spans the block's largest value with 63 steps; values are rounded
          // against the scale as stored (fp16).
          const float d8 = half_to_float(d);
          d = float_to_half(d8 * static_cast<float>(amax) / 63.0f);
          const float d7 = half_to_float(d);
          const float inv = d7 != 0.0f ? 1.0f / d7 : 0.0f;
          for (int i = 0; i < 32; ++i)
            values[i] =
                static_cast<int8_t>(clamp_round(static_cast<float>(q8[i]) * d8 * inv, 63.0f));
        }
        int32_t offset_sum = 0;
        for (int i = 0; i < 32; ++i) offset_sum += offset * values[i];
        std::memcpy(dst + 2 * r, &d, 2);
        std::memcpy(dst + 16 + 4 * r, &offset_sum, 4);
        for (int c = 0; c < 8; ++c) std::memcpy(dst + 48 + 32 * c + 4 * r, values + 4 * c, 4);
      }
    }
  }
}

}  // namespace

void quant_pack_q7_0x8(const void* q8_0_rows, int64_t n, int64_t k, void* out) {
  pack_q8_rows8(q8_0_rows, n, k, out, true);
}

void quant_pack_q8_0x8(const void* q8_0_rows, int64_t n, int64_t k, void* out) {
  pack_q8_rows8(q8_0_rows, n, k, out, false);
}

void quant_dequantize_block(QuantType type, const uint8_t* block, float* out) {
  const float d = half_at(block);
  if (type == QuantType::kQ8_0) {
    const auto* q = reinterpret_cast<const int8_t*>(block + 2);
    for (int j = 0; j < 32; ++j) out[j] = static_cast<float>(q[j]) * d;
  } else if (type == QuantType::kQ4_0) {
    const uint8_t* q = block + 2;
    for (int j = 0; j < 16; ++j) {
      out[j] = (static_cast<float>(q[j] & 0x0F) - 8.0f) * d;
      out[j + 16] = (static_cast<float>(q[j] >> 4) - 8.0f) * d;
    }
  } else {
    check_arg(type == QuantType::kQ4_1,
              std::string("quant_dequantize_block: not a 32-value type: ") + quant_type_name(type));
    const float m = half_at(block + 2);
    const uint8_t* q = block + 4;
    for (int j = 0; j < 16; ++j) {
      out[j] = static_cast<float>(q[j] & 0x0F) * d + m;
      out[j + 16] = static_cast<float>(q[j] >> 4) * d + m;
    }
  }
}

void quant_read_block(QuantType type, const void* weight, int64_t k, int64_t row, int64_t block,
                      uint8_t* out) {
  const int64_t block_bytes = quant_block_bytes(type);
  const int64_t row_bytes = k / quant_block_values(type) * block_bytes;
  const auto* base = static_cast<const uint8_t*>(weight);
  if (quant_row_group(type) == 1) {
    std::memcpy(out, base + row * row_bytes + block * block_bytes, block_bytes);
    return;
  }
  const uint8_t* blk = base + (row / 8) * 8 * row_bytes + block * 8 * block_bytes;
  const int64_t r = row % 8, header = x8_header_bytes(type), quant_offset = block_bytes - 16;
  std::memcpy(out, blk + 2 * r, 2);
  if (q8_rows8(type)) {  // as a Q8_0 block: d, then the 32 values
    for (int c = 0; c < 8; ++c) std::memcpy(out + 2 + 4 * c, blk + header + 32 * c + 4 * r, 4);
    return;
  }
  if (header == 32) std::memcpy(out + 2, blk + 16 + 2 * r, 2);
  for (int c = 0; c < 4; ++c)
    std::memcpy(out + quant_offset + 4 * c, blk + header + 32 * c + 4 * r, 4);
}

namespace cpu {
namespace {

// kMax 127: the int8 blocks; kMax 63, kOffset 64: the 7-bit blocks the Q7_0x8 kernels read
// (kOffset 128: Q8_0x8's for the VNNI kernels).
template <int kMax, int kOffset>
void quantize_row_scalar(const float* x, int64_t k, Q8ActBlock* out) {
  for (int64_t b = 0; b < k / 32; ++b) {
    const float* v = x + b * 32;
    float amax = 0.0f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(v[i]));
    const float d = amax / static_cast<float>(kMax);
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    int sum = 0;
    for (int i = 0; i < 32; ++i) {
      const int q = static_cast<int>(std::nearbyint(v[i] * id));
      out[b].q[i] = static_cast<int8_t>(q + kOffset);
      sum += q;
    }
    out[b].d = d;
    out[b].s = d * static_cast<float>(sum);
  }
}

// Integer dot product of one weight block with one activation block, and the block's float
// scale / offset: x_b . w_b = isum * scale + offset * x.s.
inline int block_isum(QuantType type, const uint8_t* w, const int8_t* q) {
  int sum = 0;
  if (type == QuantType::kQ8_0) {
    const auto* wq = reinterpret_cast<const int8_t*>(w + 2);
    for (int i = 0; i < 32; ++i) sum += wq[i] * q[i];
    return sum;
  }
  const uint8_t* nib = w + (type == QuantType::kQ4_1 ? 4 : 2);
  for (int i = 0; i < 16; ++i) sum += (nib[i] & 0x0F) * q[i] + (nib[i] >> 4) * q[i + 16];
  return sum;
}

void tile_scalar(QuantType type, const uint8_t* weight, int64_t n_rows, const Q8ActBlock* x,
                 int64_t blocks, const float* /*xd*/, const float* /*xs*/, const int8_t* /*xi*/,
                 int64_t m_rows, float* out, int64_t out_stride) {
  const int64_t block_bytes = quant_block_bytes(type);
  for (int64_t j = 0; j < n_rows; ++j) {
    const uint8_t* row = weight + j * blocks * block_bytes;
    for (int64_t r = 0; r < m_rows; ++r) {
      const Q8ActBlock* xr = x + r * blocks;
      float acc = 0.0f;
      for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* w = row + b * block_bytes;
        const float dw = half_at(w);
        float offset = 0.0f;
        if (type == QuantType::kQ4_0) offset = -8.0f * dw;
        if (type == QuantType::kQ4_1) offset = half_at(w + 2);
        acc += static_cast<float>(block_isum(type, w, xr[b].q)) * (dw * xr[b].d) + offset * xr[b].s;
      }
      out[r * out_stride + j] = acc;
    }
  }
}

// x8 layouts: each block is read back into its row-major form (tests compare the layouts).
void tile_x8_scalar(QuantType type, const uint8_t* weight, int64_t groups, const Q8ActBlock* x,
                    int64_t blocks, int64_t m_rows, float* out, int64_t out_stride) {
  const QuantType base = quant_base_type(type);
  uint8_t blk[38];
  for (int64_t j = 0; j < groups * 8; ++j) {
    for (int64_t r = 0; r < m_rows; ++r) {
      const Q8ActBlock* xr = x + r * blocks;
      float acc = 0.0f;
      for (int64_t b = 0; b < blocks; ++b) {
        quant_read_block(type, weight, blocks * 32, j, b, blk);
        const float dw = half_at(blk);
        if (q8_rows8(type)) {  // Q7_0x8's activations are stored offset by 64
          const int offset = type == QuantType::kQ7_0x8 ? 64 : 0;
          const auto* wq = reinterpret_cast<const int8_t*>(blk + 2);
          int isum = 0;
          for (int i = 0; i < 32; ++i) isum += wq[i] * (xr[b].q[i] - offset);
          acc += static_cast<float>(isum) * (dw * xr[b].d);
          continue;
        }
        const float offset = base == QuantType::kQ4_0 ? -8.0f * dw : half_at(blk + 2);
        acc +=
            static_cast<float>(block_isum(base, blk, xr[b].q)) * (dw * xr[b].d) + offset * xr[b].s;
      }
      out[r * out_stride + j] = acc;
    }
  }
}

const QuantGemmKernels kScalarKernels = {"scalar",
                                         quantize_row_scalar<127, 0>,
                                         tile_scalar,
                                         false,
                                         tile_x8_scalar,
                                         quantize_row_scalar<63, 64>,
                                         quantize_row_scalar<127, 0>};

// ---- K-quants: dequantize a weight row, then float dot products -------------------------------

void q4_k_scale_min(const uint8_t* s, int j, int* scale, int* min) {
  if (j < 4) {
    *scale = s[j] & 63;
    *min = s[j + 4] & 63;
  } else {
    *scale = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    *min = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

void dequantize_q4_k_row(const uint8_t* row, int64_t blocks, float* y) {
  for (int64_t b = 0; b < blocks; ++b, y += 256) {
    const uint8_t* blk = row + b * 144;
    const float d = half_at(blk);
    const float dmin = half_at(blk + 2);
    const uint8_t* scales = blk + 4;
    const uint8_t* qs = blk + 16;
    for (int g = 0; g < 4; ++g) {
      int sc0, mn0, sc1, mn1;
      q4_k_scale_min(scales, 2 * g, &sc0, &mn0);
      q4_k_scale_min(scales, 2 * g + 1, &sc1, &mn1);
      const float d0 = d * sc0, m0 = dmin * mn0, d1 = d * sc1, m1 = dmin * mn1;
      for (int l = 0; l < 32; ++l) {
        y[64 * g + l] = d0 * (qs[32 * g + l] & 0x0F) - m0;
        y[64 * g + 32 + l] = d1 * (qs[32 * g + l] >> 4) - m1;
      }
    }
  }
}

void dequantize_q6_k_row(const uint8_t* row, int64_t blocks, float* y) {
  for (int64_t b = 0; b < blocks; ++b, y += 256) {
    const uint8_t* blk = row + b * 210;
    const uint8_t* ql = blk;
    const uint8_t* qh = blk + 128;
    const auto* sc = reinterpret_cast<const int8_t*>(blk + 192);
    const float d = half_at(blk + 208);
    for (int half = 0; half < 2; ++half) {
      float* yh = y + 128 * half;
      const uint8_t* l4 = ql + 64 * half;
      const uint8_t* h2 = qh + 32 * half;
      const int8_t* s = sc + 8 * half;
      for (int l = 0; l < 32; ++l) {
        const int q1 = ((l4[l] & 0x0F) | (((h2[l] >> 0) & 3) << 4)) - 32;
        const int q2 = ((l4[l + 32] & 0x0F) | (((h2[l] >> 2) & 3) << 4)) - 32;
        const int q3 = ((l4[l] >> 4) | (((h2[l] >> 4) & 3) << 4)) - 32;
        const int q4 = ((l4[l + 32] >> 4) | (((h2[l] >> 6) & 3) << 4)) - 32;
        const int is = l / 16;
        yh[l] = d * s[is] * q1;
        yh[l + 32] = d * s[is + 2] * q2;
        yh[l + 64] = d * s[is + 4] * q3;
        yh[l + 96] = d * s[is + 6] * q4;
      }
    }
  }
}

// One row of k values of a row-major type as floats (the loader's arithmetic).
void dequantize_row(QuantType type, const uint8_t* row, int64_t k, float* y) {
  if (type == QuantType::kF32) {
    std::memcpy(y, row, static_cast<size_t>(k) * sizeof(float));
    return;
  }
  if (type == QuantType::kQ4_K) return dequantize_q4_k_row(row, k / 256, y);
  if (type == QuantType::kQ6_K) return dequantize_q6_k_row(row, k / 256, y);
  const int64_t block_bytes = quant_block_bytes(type);
  for (int64_t b = 0; b < k / 32; ++b)
    quant_dequantize_block(type, row + b * block_bytes, y + b * 32);
}

// Weight rows per parallel task for m rows of x: two tasks per pool thread, few enough rows
// that a task's slice (re-read once per tile of 8 rows of x) stays in L1/L2. With few rows of x
// the slice is read about once and the GEMM streams its weights from memory, where every task
// starts a cold stream: the cap grows from 64 rows (64 rows of x and more) to 4096 (one row).
// (Output projection of the MoE benchmark model, one token: ~15 % faster with 256-1024-row
// slices than with 64. Two tasks per thread rather than eight, once each pair of weight groups
// is requested whole: the MoE model's attention projections -20 % at 1-8 tokens in moe_step,
// served at one client +3 % on that model and +11 % on the default one. A cap of 4096 / m
// rather than 1024 / m: the output projection -4 % at one token and -12 % at 16 in moe_step,
// served +1-2 % at one client and +5 % at 16.)
int64_t slice_rows(int64_t n, int64_t m) {
  const int64_t per = (n + pool_size() * 2 - 1) / (pool_size() * 2);
  return std::clamp<int64_t>(per, 4, std::max<int64_t>(64, 4096 / std::max<int64_t>(m, 1)));
}

void add_bias(const QuantGemmParams& p, int64_t n0, int64_t n1) {
  if (p.bias == nullptr) return;
  for (int64_t r = 0; r < p.m; ++r) {
    float* o = p.out + r * p.out_stride;
    for (int64_t j = n0; j < n1; ++j) o[j] += p.bias[j];
  }
}

// F32 rows: float dot products over the rows as stored.
void float_gemm(const QuantGemmParams& p) {
  const VecOps& ops = p.allow_simd ? vec_ops() : scalar_vec_ops();
  const int64_t per = slice_rows(p.n, p.m);
  const auto* weight = static_cast<const float*>(p.weight);
  parallel_for((p.n + per - 1) / per, [&](int64_t task) {
    const int64_t n0 = task * per, n1 = std::min(p.n, n0 + per);
    for (int64_t j = n0; j < n1; ++j)
      for (int64_t r = 0; r < p.m; ++r)
        p.out[r * p.out_stride + j] = ops.dot(p.input + r * p.input_stride, weight + j * p.k, p.k);
    add_bias(p, n0, n1);
  });
}

void k_quant_gemm(const QuantGemmParams& p) {
  const VecOps& ops = p.allow_simd ? vec_ops() : scalar_vec_ops();
  const int64_t blocks = p.k / 256;
  const int64_t row_bytes = blocks * quant_block_bytes(p.type);
  const int64_t per = slice_rows(p.n, p.m);
  const auto* weight = static_cast<const uint8_t*>(p.weight);
  parallel_for((p.n + per - 1) / per, [&](int64_t task) {
    const int64_t n0 = task * per, n1 = std::min(p.n, n0 + per);
    float* w = scratch(0, p.k);
    for (int64_t j = n0; j < n1; ++j) {
      if (p.type == QuantType::kQ4_K)
        dequantize_q4_k_row(weight + j * row_bytes, blocks, w);
      else
        dequantize_q6_k_row(weight + j * row_bytes, blocks, w);
      for (int64_t r = 0; r < p.m; ++r)
        p.out[r * p.out_stride + j] = ops.dot(p.input + r * p.input_stride, w, p.k);
    }
    add_bias(p, n0, n1);
  });
}

const QuantGemmKernels& pick_kernels(bool allow_simd) {
  if (allow_simd) {
    static const QuantGemmKernels* simd = [] {
      const QuantGemmKernels* k = nullptr;
      // FASTLLM_CPU_ISA caps the path (tests compare the paths, CI runs them all).
      const IsaLevel cap = isa_cap();
#if defined(__x86_64__) || defined(__i386__)
      __builtin_cpu_init();
      if (cap >= IsaLevel::kAvx2 && __builtin_cpu_supports("avx2") &&
          __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
        k = avx2_quant_gemm_kernels();
#ifdef FASTLLM_HAVE_AVXVNNI_FILE
        if (cap >= IsaLevel::kAvxVnni && __builtin_cpu_supports("avxvnni"))
          k = avxvnni_quant_gemm_kernels();
#endif
#ifdef FASTLLM_HAVE_AVX512_FILE
        if (cap >= IsaLevel::kAvx512 && __builtin_cpu_supports("avx512f") &&
            __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
            __builtin_cpu_supports("avx512vnni"))
          k = avx512_quant_gemm_kernels();
#endif
      }
#endif
      return k;
    }();
    if (simd != nullptr) return *simd;
  }
  return kScalarKernels;
}

// This thread's buffer for the int8 blocks of a GEMM's activations, grown as needed.
Q8ActBlock* activation_blocks(int64_t count) {
  thread_local std::vector<Q8ActBlock> blocks;
  if (static_cast<int64_t>(blocks.size()) < count) blocks.resize(static_cast<size_t>(count));
  return blocks.data();
}

// quantize(r) for every row of x: over the pool when there are enough values to pay for it.
void for_each_input_row(const QuantGemmParams& p, const std::function<void(int64_t)>& quantize) {
  if (p.m * p.k >= (1 << 16)) {
    parallel_for(p.m, quantize);
  } else {
    for (int64_t r = 0; r < p.m; ++r) quantize(r);
  }
}

// The x8 layouts: activations quantized row by row, then slices of 8-row groups in parallel.
void quant_gemm_x8(const QuantGemmParams& p) {
  check_arg(p.n % 8 == 0, std::string("quant_gemm: ") + quant_type_name(p.type) +
                              " weights need out_features to be a multiple of 8");
  const int64_t blocks = p.k / 32;
  const int64_t row_bytes = blocks * quant_block_bytes(p.type);
  Q8ActBlock* xq = activation_blocks(p.m * blocks);
  for_each_input_row(p, [&](int64_t r) {
    quantize_x8_row(p.type, p.input + r * p.input_stride, p.k, xq + r * blocks, p.allow_simd);
  });
  const int64_t per = (slice_rows(p.n, p.m) + 7) / 8 * 8;
  const auto* weight = static_cast<const uint8_t*>(p.weight);
  parallel_for((p.n + per - 1) / per, [&](int64_t task) {
    const int64_t n0 = task * per, n1 = std::min(p.n, n0 + per);
    x8_gemm_quantized(p.type, weight + n0 * row_bytes, (n1 - n0) / 8, xq, p.k, p.m, p.out + n0,
                      p.out_stride, p.allow_simd);
    add_bias(p, n0, n1);
  });
}

}  // namespace

const QuantGemmKernels& scalar_quant_gemm_kernels() { return kScalarKernels; }

void quantize_x8_row(QuantType type, const float* x, int64_t k, Q8ActBlock* out, bool allow_simd) {
  const auto& kernels = pick_kernels(allow_simd);
  const auto quantize_row = type == QuantType::kQ7_0x8   ? kernels.quantize_row_u7
                            : type == QuantType::kQ8_0x8 ? kernels.quantize_row_q8_0x8
                                                         : kernels.quantize_row;
  quantize_row(x, k, out);
}

void x8_gemm_quantized(QuantType type, const void* weight, int64_t groups, const Q8ActBlock* xq,
                       int64_t k, int64_t m, float* out, int64_t out_stride, bool allow_simd) {
  pick_kernels(allow_simd)
      .tile_x8(type, static_cast<const uint8_t*>(weight), groups, xq, k / 32, m, out, out_stride);
}

void dequantize_weight_row(QuantType type, const void* weight, int64_t k, int64_t row, float* y) {
  const auto* base = static_cast<const uint8_t*>(weight);
  if (quant_row_group(type) == 1) {
    const int64_t row_bytes = k / quant_block_values(type) * quant_block_bytes(type);
    return dequantize_row(type, base + row * row_bytes, k, y);
  }
  // The row's bytes read in place from its group (the arithmetic of quant_dequantize_block):
  // through quant_read_block's copies this cost 30x a row-major row, and the token embedding
  // reads a tied table this way every step.
  const int64_t blocks = k / 32, group_block = 8 * quant_block_bytes(type);
  const int64_t header = x8_header_bytes(type), r = row % 8;
  const uint8_t* blk = base + (row / 8) * blocks * group_block;
  for (int64_t b = 0; b < blocks; ++b, blk += group_block, y += 32) {
    const float d = half_at(blk + 2 * r);
    if (q8_rows8(type)) {
      for (int c = 0; c < 8; ++c) {
        const auto* q = reinterpret_cast<const int8_t*>(blk + header + 32 * c + 4 * r);
        for (int i = 0; i < 4; ++i) y[4 * c + i] = static_cast<float>(q[i]) * d;
      }
      continue;
    }
    // Chunk c holds source bytes 4c..4c+3: values 4c + i (low nibbles) and 16 + 4c + i (high).
    const bool q4_1 = type == QuantType::kQ4_1x8;
    const float m = q4_1 ? half_at(blk + 16 + 2 * r) : 0.0f;
    for (int c = 0; c < 4; ++c) {
      const uint8_t* q = blk + header + 32 * c + 4 * r;
      for (int i = 0; i < 4; ++i) {
        if (q4_1) {
          y[4 * c + i] = static_cast<float>(q[i] & 0x0F) * d + m;
          y[16 + 4 * c + i] = static_cast<float>(q[i] >> 4) * d + m;
        } else {
          y[4 * c + i] = (static_cast<float>(q[i] & 0x0F) - 8.0f) * d;
          y[16 + 4 * c + i] = (static_cast<float>(q[i] >> 4) - 8.0f) * d;
        }
      }
    }
  }
}

double weight_row_dot_scalar(QuantType type, const uint8_t* weight, int64_t k, int64_t row,
                             const float* x) {
  thread_local std::vector<float> values;
  if (static_cast<int64_t>(values.size()) < k) values.resize(static_cast<size_t>(k));
  float* y = values.data();
  dequantize_weight_row(type, weight, k, row, y);
  double total = 0.0;
  for (int64_t b = 0; b < k; b += 32) {
    float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = b; i < b + 32; i += 8)
      for (int l = 0; l < 8; ++l) lane[l] += x[i + l] * y[i + l];
    total += static_cast<double>(((lane[0] + lane[1]) + (lane[2] + lane[3])) +
                                 ((lane[4] + lane[5]) + (lane[6] + lane[7])));
  }
  return total;
}

double weight_row_dot(QuantType type, const void* weight, int64_t k, int64_t row, const float* x) {
  const auto* w = static_cast<const uint8_t*>(weight);
  const QuantGemmKernels& kernels = pick_kernels(true);
  return kernels.row_dot != nullptr ? kernels.row_dot(type, w, k, row, x)
                                    : weight_row_dot_scalar(type, w, k, row, x);
}

#ifndef FASTLLM_HAVE_AVX2_FILE
const QuantGemmKernels* avx2_quant_gemm_kernels() { return nullptr; }
#endif
#ifndef FASTLLM_HAVE_AVXVNNI_FILE
const QuantGemmKernels* avxvnni_quant_gemm_kernels() { return nullptr; }
#endif
#ifndef FASTLLM_HAVE_AVX512_FILE
const QuantGemmKernels* avx512_quant_gemm_kernels() { return nullptr; }
#endif

}  // namespace cpu

const char* quant_gemm_cpu_isa() { return cpu::pick_kernels(true).name; }

void quant_convert_rows(QuantType type, const void* src, int64_t n, int64_t k, QuantType target,
                        void* dst) {
  const int64_t values = quant_block_values(type);
  check_arg(values > 0 && quant_row_group(type) == 1,
            "quant_convert_rows: the source must be a row-major GGUF type");
  check_arg(n >= 0 && k > 0 && k % values == 0, "quant_convert_rows: bad sizes");
  const int64_t src_row = k / values * quant_block_bytes(type);
  const auto* in = static_cast<const uint8_t*>(src);
  auto* out = static_cast<uint8_t*>(dst);
  if (target == QuantType::kQ4_1) {
    check_arg(type == QuantType::kQ4_K, "quant_convert_rows: only Q4_K converts to Q4_1");
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t b = 0; b < k / 256; ++b) {
        const uint8_t* blk = in + r * src_row + b * 144;
        const float d = half_at(blk), dmin = half_at(blk + 2);
        for (int sub = 0; sub < 8; ++sub, out += 20) {
          int sc, mn;
          cpu::q4_k_scale_min(blk + 4, sub, &sc, &mn);
          const uint16_t dh = float_to_half(d * static_cast<float>(sc));
          const uint16_t mh = float_to_half(-dmin * static_cast<float>(mn));
          std::memcpy(out, &dh, 2);
          std::memcpy(out + 2, &mh, 2);
          // Sub-block 2g holds the low nibbles of bytes 32g..32g+31, 2g+1 their high nibbles.
          const uint8_t* qs = blk + 16 + 32 * (sub / 2);
          const int shift = 4 * (sub % 2);
          for (int j = 0; j < 16; ++j)
            out[4 + j] = static_cast<uint8_t>(((qs[j] >> shift) & 0x0F) |
                                              (((qs[j + 16] >> shift) & 0x0F) << 4));
        }
      }
    }
    return;
  }
  check_arg(target == QuantType::kQ8_0, "quant_convert_rows: targets are Q4_1 and Q8_0");
  std::vector<float> y(static_cast<size_t>(k));
  for (int64_t r = 0; r < n; ++r) {
    cpu::dequantize_row(type, in + r * src_row, k, y.data());
    for (int64_t b = 0; b < k / 32; ++b, out += 34) {
      const float* v = y.data() + b * 32;
      float amax = 0.0f;
      for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(v[i]));
      const uint16_t dh = float_to_half(amax / 127.0f);
      const float d = half_to_float(dh);
      const float inv = d != 0.0f ? 1.0f / d : 0.0f;
      std::memcpy(out, &dh, 2);
      for (int i = 0; i < 32; ++i)
        out[2 + i] = static_cast<uint8_t>(static_cast<int8_t>(clamp_round(v[i] * inv, 127.0f)));
    }
  }
}

void quant_dequantize_rows(QuantType type, const void* weight, int64_t n, int64_t k, float* out) {
  const int64_t values = quant_block_values(type);
  check_arg(values > 0, "quant_dequantize_rows: unknown quantization type");
  check_arg(n >= 0 && k > 0 && k % values == 0 && n % quant_row_group(type) == 0,
            "quant_dequantize_rows: bad sizes");
  cpu::parallel_for(
      n, [&](int64_t r) { cpu::dequantize_weight_row(type, weight, k, r, out + r * k); });
}

void quant_gemm_cpu(const QuantGemmParams& p) {
  const int64_t values = quant_block_values(p.type);
  check_arg(values > 0, "quant_gemm: unknown quantization type");
  check_arg(p.m >= 0 && p.n >= 0 && p.k > 0, "quant_gemm: bad sizes");
  check_arg(p.k % values == 0, std::string("quant_gemm: k must be a multiple of ") +
                                   std::to_string(values) + " for " + quant_type_name(p.type));
  check_arg(p.input_stride >= p.k && p.out_stride >= p.n, "quant_gemm: bad strides");
  if (p.m == 0 || p.n == 0) return;
  if (p.type == QuantType::kF32) return cpu::float_gemm(p);
  if (values == 256) return cpu::k_quant_gemm(p);
  if (quant_row_group(p.type) == 8) return cpu::quant_gemm_x8(p);

  const auto& kernels = cpu::pick_kernels(p.allow_simd);
  const int64_t blocks = p.k / 32;
  const int64_t row_bytes = blocks * quant_block_bytes(p.type);
  constexpr int64_t tile = cpu::kQuantTileRows;
  const int64_t tiles = (p.m + tile - 1) / tile;
  thread_local std::vector<float> tile_scales;   // per tile: d then s, each [blocks][tile]
  thread_local std::vector<int8_t> interleaved;  // per tile: [blocks][8 groups][tile][4]
  const int64_t tile_bytes = blocks * cpu::kInterleavedBlockBytes;
  if (static_cast<int64_t>(tile_scales.size()) < tiles * 2 * blocks * tile)
    tile_scales.resize(static_cast<size_t>(tiles * 2 * blocks * tile));
  // Only kernels that read it get the interleaved copy, for 4-bit weights; decode-sized batches
  // (m <= 2) use the row-major blocks.
  const bool interleave = kernels.reads_interleaved && p.type != QuantType::kQ8_0 && p.m > 2;
  if (interleave && static_cast<int64_t>(interleaved.size()) < tiles * tile_bytes)
    interleaved.resize(static_cast<size_t>(tiles * tile_bytes));
  cpu::Q8ActBlock* xq = cpu::activation_blocks(p.m * blocks);
  float* scales = tile_scales.data();
  int8_t* xi = interleaved.data();
  auto quantize = [&](int64_t r) {
    kernels.quantize_row(p.input + r * p.input_stride, p.k, xq + r * blocks);
    float* xd = scales + (r / tile) * 2 * blocks * tile;
    float* xs = xd + blocks * tile;
    for (int64_t b = 0; b < blocks; ++b) {
      xd[b * tile + r % tile] = xq[r * blocks + b].d;
      xs[b * tile + r % tile] = xq[r * blocks + b].s;
    }
    if (!interleave) return;
    int8_t* dst = xi + (r / tile) * tile_bytes + (r % tile) * 4;
    for (int64_t b = 0; b < blocks; ++b)
      for (int g = 0; g < 8; ++g)
        std::memcpy(dst + b * cpu::kInterleavedBlockBytes + g * 4 * tile,
                    xq[r * blocks + b].q + 4 * g, 4);
  };
  // Rows past m in the last tile read as scale 0 and quants 0.
  std::fill(scales + (tiles - 1) * 2 * blocks * tile, scales + tiles * 2 * blocks * tile, 0.0f);
  if (interleave && p.m % tile != 0)
    std::fill(xi + (tiles - 1) * tile_bytes, xi + tiles * tile_bytes, int8_t{0});
  cpu::for_each_input_row(p, quantize);

  const int64_t per = cpu::slice_rows(p.n, p.m);
  const auto* weight = static_cast<const uint8_t*>(p.weight);
  cpu::parallel_for((p.n + per - 1) / per, [&](int64_t task) {
    const int64_t n0 = task * per, n1 = std::min(p.n, n0 + per);
    for (int64_t t = 0; t < tiles; ++t) {
      const float* xd = scales + t * 2 * blocks * tile;
      kernels.tile(p.type, weight + n0 * row_bytes, n1 - n0, xq + t * tile * blocks, blocks, xd,
                   xd + blocks * tile, interleave ? xi + t * tile_bytes : nullptr,
                   std::min(tile, p.m - t * tile), p.out + t * tile * p.out_stride + n0,
                   p.out_stride);
    }
    cpu::add_bias(p, n0, n1);
  });
}

}  // namespace fastllm::kernels
