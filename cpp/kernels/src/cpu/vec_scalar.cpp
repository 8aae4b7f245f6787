// Portable row primitives, the run-time dispatch and the thread-local scratch.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "fastllm/kernels/dtype_convert.h"
#include "vec.h"

namespace fastllm::kernels::cpu {
namespace {

void load(const void* src, DType dtype, float* dst, int64_t n, float scale) {
  switch (dtype) {
    case DType::kFloat32:
      if (scale == 1.0f) {
        std::memcpy(dst, src, n * sizeof(float));
      } else {
        for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<const float*>(src)[i] * scale;
      }
      break;
    case DType::kFloat16:
      for (int64_t i = 0; i < n; ++i)
        dst[i] = half_to_float(static_cast<const uint16_t*>(src)[i]) * scale;
      break;
    case DType::kBFloat16:
      for (int64_t i = 0; i < n; ++i)
        dst[i] = bf16_to_float(static_cast<const uint16_t*>(src)[i]) * scale;
      break;
    case DType::kFloat8E4M3:
      for (int64_t i = 0; i < n; ++i)
        dst[i] = fp8e4m3_to_float(static_cast<const uint8_t*>(src)[i]) * scale;
      break;
    case DType::kFloat8E5M2:
      for (int64_t i = 0; i < n; ++i)
        dst[i] = fp8e5m2_to_float(static_cast<const uint8_t*>(src)[i]) * scale;
      break;
  }
}

void store(const float* src, DType dtype, void* dst, int64_t n, float inv_scale) {
  switch (dtype) {
    case DType::kFloat32:
      if (inv_scale == 1.0f) {
        std::memcpy(dst, src, n * sizeof(float));
      } else {
        for (int64_t i = 0; i < n; ++i) static_cast<float*>(dst)[i] = src[i] * inv_scale;
      }
      break;
    case DType::kFloat16:
      for (int64_t i = 0; i < n; ++i)
        static_cast<uint16_t*>(dst)[i] = float_to_half(src[i] * inv_scale);
      break;
    case DType::kBFloat16:
      for (int64_t i = 0; i < n; ++i)
        static_cast<uint16_t*>(dst)[i] = float_to_bf16(src[i] * inv_scale);
      break;
    case DType::kFloat8E4M3:
      for (int64_t i = 0; i < n; ++i)
        static_cast<uint8_t*>(dst)[i] = float_to_fp8e4m3(src[i] * inv_scale);
      break;
    case DType::kFloat8E5M2:
      for (int64_t i = 0; i < n; ++i)
        static_cast<uint8_t*>(dst)[i] = float_to_fp8e5m2(src[i] * inv_scale);
      break;
  }
}

float dot(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

void dots(const float* x, const float* rows, int64_t num_rows, int64_t n, float* out,
          int64_t out_stride) {
  for (int64_t r = 0; r < num_rows; ++r) out[r * out_stride] = dot(rows + r * n, x, n);
}

void axpys(const float* x, const float* weights, int64_t weight_stride, int64_t num_rows,
           float* acc, int64_t n) {
  for (int64_t r = 0; r < num_rows; ++r) {
    const float w = weights[r * weight_stride];
    if (w == 0.0f) continue;
    float* y = acc + r * n;
    for (int64_t i = 0; i < n; ++i) y[i] += w * x[i];
  }
}

void scale(float a, float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] *= a;
}

float sum_squares(const float* x, int64_t n) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += x[i] * x[i];
  return s;
}

void mul_scaled(const float* x, const float* w, float s, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * s * w[i];
}

float max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

float exp_shift_sum(float* x, int64_t n, float shift) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    s += x[i];
  }
  return s;
}

void silu_mul(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

void attn_scores(const void* keys, int64_t key_stride, DType dtype, int64_t n, const float* q,
                 int64_t rows, int64_t d, float* scores, int64_t score_stride) {
  float row[256];
  const size_t size = dtype_size(dtype);
  for (int64_t j = 0; j < n; ++j) {
    load(static_cast<const char*>(keys) + j * key_stride * size, dtype, row, d, 1.0f);
    for (int64_t r = 0; r < rows; ++r) scores[r * score_stride + j] = dot(q + r * d, row, d);
  }
}

void attn_values(const void* values, int64_t value_stride, DType dtype, int64_t n,
                 const float* weights, int64_t weight_stride, int64_t rows, int64_t d, float* acc) {
  float row[256];
  const size_t size = dtype_size(dtype);
  for (int64_t j = 0; j < n; ++j) {
    load(static_cast<const char*>(values) + j * value_stride * size, dtype, row, d, 1.0f);
    axpys(row, weights + j, weight_stride, rows, acc, d);
  }
}

int64_t argmax(const float* x, int64_t n) { return std::max_element(x, x + n) - x; }

void add_residual(float* x, float* residual, int64_t n) {
  for (int64_t i = 0; i < n; ++i) residual[i] = x[i] += residual[i];
}

void rotate_half(float* x, const float* cos, const float* sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    x[i] = x1 * cos[i] - x2 * sin[i];
    x[i + half] = x2 * cos[i] + x1 * sin[i];
  }
}

const VecOps kScalar = {"scalar",    load,        store,      dot,          dots,          axpys,
                        scale,       sum_squares, mul_scaled, max,          exp_shift_sum, silu_mul,
                        attn_scores, attn_values, argmax,     add_residual, rotate_half};

const VecOps& pick() {
  const IsaLevel cap = isa_cap();
#if defined(FASTLLM_HAVE_AVX2_FILE) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  if (cap >= IsaLevel::kAvx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c") && avx2_vec_ops() != nullptr) {
    if (cap >= IsaLevel::kAvx512 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        avx512_vec_ops() != nullptr)
      return *avx512_vec_ops();
    return *avx2_vec_ops();
  }
#endif
  return kScalar;
}

}  // namespace

IsaLevel isa_cap() {
  const char* env = std::getenv("FASTLLM_CPU_ISA");
  const std::string value = env != nullptr ? env : "";
  if (value.empty() || value == "avx512") return IsaLevel::kAvx512;
  if (value == "avx_vnni") return IsaLevel::kAvxVnni;
  if (value == "avx2") return IsaLevel::kAvx2;
  if (value == "scalar") return IsaLevel::kScalar;
  throw KernelArgumentError("FASTLLM_CPU_ISA='" + value +
                            "' is not one of scalar, avx2, avx_vnni, avx512 (unset: the best the "
                            "CPU has)");
}

const VecOps& scalar_vec_ops() { return kScalar; }

// Picked once (a bad FASTLLM_CPU_ISA throws at every call instead: the static stays unset).
const VecOps& vec_ops() {
  static const VecOps& ops = pick();
  return ops;
}

#ifndef FASTLLM_HAVE_AVX2_FILE
const VecOps* avx2_vec_ops() { return nullptr; }
#endif
#ifndef FASTLLM_HAVE_AVX512_VEC_FILE
const VecOps* avx512_vec_ops() { return nullptr; }
#endif

float* scratch(int slot, int64_t n) {
  thread_local std::vector<float> buffers[6];
  auto& buffer = buffers[slot];
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(static_cast<size_t>(n));
  return buffer.data();
}

}  // namespace fastllm::kernels::cpu

namespace fastllm::kernels {
const char* cpu_isa() { return cpu::vec_ops().name; }

const char* attention_cpu_isa() {
  const cpu::VecOps& ops = cpu::vec_ops();
  return &ops == cpu::avx512_vec_ops() ? "avx512" : ops.name;
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "float32";
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
    case DType::kFloat8E4M3:
      return "float8_e4m3";
    case DType::kFloat8E5M2:
      return "float8_e5m2";
  }
  return "unknown";
}
}  // namespace fastllm::kernels
