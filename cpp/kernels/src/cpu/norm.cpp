// CPU RMSNorm, fused residual-add + RMSNorm and LayerNorm, parallel over rows.
#include "fastllm/kernels/norm.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "parallel.h"
#include "vec.h"

namespace fastllm::kernels {
namespace {

void check_common(int64_t num_tokens, int64_t hidden, DType dtype, const char* op) {
  check_arg(num_tokens >= 0 && hidden > 0, std::string(op) + ": bad sizes");
  check_arg(!is_float8(dtype), std::string(op) + ": float8 is not supported");
}

// Rows per parallel task: enough work per task to amortise the hand-off.
int64_t rows_per_task(int64_t hidden) { return hidden >= 4096 ? 1 : 4096 / hidden; }

template <typename RowFn>
void for_rows(int64_t num_tokens, int64_t hidden, RowFn fn) {
  const int64_t per_task = rows_per_task(hidden);
  const int64_t tasks = (num_tokens + per_task - 1) / per_task;
  if (tasks <= 1 || num_tokens * hidden < 16384) {
    for (int64_t i = 0; i < num_tokens; ++i) fn(i);
    return;
  }
  cpu::parallel_for(tasks, [&](int64_t task) {
    const int64_t end = std::min(num_tokens, (task + 1) * per_task);
    for (int64_t i = task * per_task; i < end; ++i) fn(i);
  });
}

}  // namespace

void rms_norm_cpu(const RmsNormParams& p) {
  check_common(p.num_tokens, p.hidden, p.dtype, "rms_norm");
  check_arg(p.input_stride >= p.hidden && p.out_stride >= p.hidden, "rms_norm: bad strides");
  const auto& ops = cpu::vec_ops();
  const size_t size = dtype_size(p.dtype);
  for_rows(p.num_tokens, p.hidden, [&](int64_t i) {
    float* x = cpu::scratch(0, p.hidden);
    float* w = cpu::scratch(1, p.hidden);
    ops.load(static_cast<const char*>(p.input) + i * p.input_stride * size, p.dtype, x, p.hidden,
             1.0f);
    ops.load(p.weight, p.dtype, w, p.hidden, 1.0f);
    const float inv_rms = 1.0f / std::sqrt(ops.sum_squares(x, p.hidden) / p.hidden + p.eps);
    ops.mul_scaled(x, w, inv_rms, x, p.hidden);
    ops.store(x, p.dtype, static_cast<char*>(p.out) + i * p.out_stride * size, p.hidden, 1.0f);
  });
}

void fused_add_rms_norm_cpu(const FusedAddRmsNormParams& p) {
  check_common(p.num_tokens, p.hidden, p.dtype, "fused_add_rms_norm");
  check_arg(p.input_stride >= p.hidden && p.residual_stride >= p.hidden,
            "fused_add_rms_norm: bad strides");
  const auto& ops = cpu::vec_ops();
  const size_t size = dtype_size(p.dtype);
  if (p.dtype == DType::kFloat32) {  // in place, no staging copies
    const auto* w = static_cast<const float*>(p.weight);
    for_rows(p.num_tokens, p.hidden, [&](int64_t i) {
      float* x = static_cast<float*>(p.input) + i * p.input_stride;
      ops.add_residual(x, static_cast<float*>(p.residual) + i * p.residual_stride, p.hidden);
      const float inv_rms = 1.0f / std::sqrt(ops.sum_squares(x, p.hidden) / p.hidden + p.eps);
      ops.mul_scaled(x, w, inv_rms, x, p.hidden);
    });
    return;
  }
  for_rows(p.num_tokens, p.hidden, [&](int64_t i) {
    float* x = cpu::scratch(0, p.hidden);
    float* w = cpu::scratch(1, p.hidden);
    float* r = cpu::scratch(2, p.hidden);
    char* input = static_cast<char*>(p.input) + i * p.input_stride * size;
    char* residual = static_cast<char*>(p.residual) + i * p.residual_stride * size;
    ops.load(input, p.dtype, x, p.hidden, 1.0f);
    ops.load(residual, p.dtype, r, p.hidden, 1.0f);
    for (int64_t j = 0; j < p.hidden; ++j) x[j] += r[j];
    ops.store(x, p.dtype, residual, p.hidden, 1.0f);
    if (p.dtype != DType::kFloat32) ops.load(residual, p.dtype, x, p.hidden, 1.0f);
    ops.load(p.weight, p.dtype, w, p.hidden, 1.0f);
    const float inv_rms = 1.0f / std::sqrt(ops.sum_squares(x, p.hidden) / p.hidden + p.eps);
    ops.mul_scaled(x, w, inv_rms, x, p.hidden);
    ops.store(x, p.dtype, input, p.hidden, 1.0f);
  });
}

void layer_norm_cpu(const LayerNormParams& p) {
  check_common(p.num_tokens, p.hidden, p.dtype, "layer_norm");
  check_arg(p.input_stride >= p.hidden && p.out_stride >= p.hidden, "layer_norm: bad strides");
  const auto& ops = cpu::vec_ops();
  const size_t size = dtype_size(p.dtype);
  for_rows(p.num_tokens, p.hidden, [&](int64_t i) {
    float* x = cpu::scratch(0, p.hidden);
    float* w = cpu::scratch(1, p.hidden);
    float* b = cpu::scratch(2, p.hidden);
    ops.load(static_cast<const char*>(p.input) + i * p.input_stride * size, p.dtype, x, p.hidden,
             1.0f);
    ops.load(p.weight, p.dtype, w, p.hidden, 1.0f);
    // Two passes (mean, then the centred squares) in double: one-pass E[x^2] - E[x]^2 loses
    // the variance of rows with a large mean.
    double sum = 0.0;
    for (int64_t j = 0; j < p.hidden; ++j) sum += x[j];
    const float mean = static_cast<float>(sum / p.hidden);
    double squares = 0.0;
    for (int64_t j = 0; j < p.hidden; ++j) {
      x[j] -= mean;
      squares += static_cast<double>(x[j]) * x[j];
    }
    const float inv_std = static_cast<float>(1.0 / std::sqrt(squares / p.hidden + p.eps));
    ops.mul_scaled(x, w, inv_std, x, p.hidden);
    if (p.bias != nullptr) {
      ops.load(p.bias, p.dtype, b, p.hidden, 1.0f);
      for (int64_t j = 0; j < p.hidden; ++j) x[j] += b[j];
    }
    ops.store(x, p.dtype, static_cast<char*>(p.out) + i * p.out_stride * size, p.hidden, 1.0f);
  });
}

}  // namespace fastllm::kernels
