// CPU activations: gated (SiLU / GeLU-tanh / GeLU-erf times the up projection), plain (those and
// ReLU) and the logit softcap, parallel over rows.
#include "fastllm/kernels/activation.h"

#include <algorithm>
#include <cmath>

#include "parallel.h"
#include "vec.h"

namespace fastllm::kernels {
namespace {

float apply(Activation act, float x) {
  switch (act) {
    case Activation::kSilu:
      return x / (1.0f + std::exp(-x));
    case Activation::kGeluTanh:
      return 0.5f * x * (1.0f + std::tanh(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    case Activation::kGelu:
      return 0.5f * x * (1.0f + std::erf(x * 0.7071067811865476f));
    case Activation::kRelu:
      return x > 0.0f ? x : 0.0f;
  }
  return x;
}

// Runs row(i) for every row, on the pool when there are enough elements to share out.
template <typename RowFn>
void for_rows(int64_t num_tokens, int64_t d, RowFn row) {
  const int64_t per_task = std::max<int64_t>(1, 8192 / d);
  const int64_t tasks = (num_tokens + per_task - 1) / per_task;
  if (tasks <= 1) {
    for (int64_t i = 0; i < num_tokens; ++i) row(i);
    return;
  }
  cpu::parallel_for(tasks, [&](int64_t task) {
    const int64_t end = std::min(num_tokens, (task + 1) * per_task);
    for (int64_t i = task * per_task; i < end; ++i) row(i);
  });
}

}  // namespace

void act_and_mul_cpu(const ActAndMulParams& p) {
  check_arg(p.num_tokens >= 0 && p.d > 0, "act_and_mul: bad sizes");
  check_arg(p.input_stride >= 2 * p.d && p.out_stride >= p.d, "act_and_mul: bad strides");
  check_arg(!is_float8(p.dtype), "act_and_mul: float8 is not supported");
  const auto& ops = cpu::vec_ops();
  const size_t size = dtype_size(p.dtype);
  auto run_row = [&](int64_t i) {
    if (p.dtype == DType::kFloat32 && p.activation == Activation::kSilu) {  // no staging copies
      const float* in = static_cast<const float*>(p.input) + i * p.input_stride;
      ops.silu_mul(in, in + p.d, static_cast<float*>(p.out) + i * p.out_stride, p.d);
      return;
    }
    float* gate = cpu::scratch(0, 2 * p.d);
    float* up = gate + p.d;
    float* out = cpu::scratch(1, p.d);
    ops.load(static_cast<const char*>(p.input) + i * p.input_stride * size, p.dtype, gate, 2 * p.d,
             1.0f);
    if (p.activation == Activation::kSilu) {
      ops.silu_mul(gate, up, out, p.d);
    } else {
      for (int64_t j = 0; j < p.d; ++j) out[j] = apply(p.activation, gate[j]) * up[j];
    }
    ops.store(out, p.dtype, static_cast<char*>(p.out) + i * p.out_stride * size, p.d, 1.0f);
  };
  for_rows(p.num_tokens, p.d, run_row);
}

void activation_cpu(const ActivationParams& p) {
  check_arg(p.num_tokens >= 0 && p.d > 0, "activation: bad sizes");
  check_arg(p.input_stride >= p.d && p.out_stride >= p.d, "activation: bad strides");
  check_arg(!is_float8(p.dtype), "activation: float8 is not supported");
  const auto& ops = cpu::vec_ops();
  const size_t size = dtype_size(p.dtype);
  for_rows(p.num_tokens, p.d, [&](int64_t i) {
    float* x = cpu::scratch(0, p.d);
    ops.load(static_cast<const char*>(p.input) + i * p.input_stride * size, p.dtype, x, p.d, 1.0f);
    for (int64_t j = 0; j < p.d; ++j) x[j] = apply(p.activation, x[j]);
    ops.store(x, p.dtype, static_cast<char*>(p.out) + i * p.out_stride * size, p.d, 1.0f);
  });
}

void softcap_cpu(const SoftcapParams& p) {
  check_arg(p.num_tokens >= 0 && p.d > 0 && p.stride >= p.d, "softcap: bad sizes");
  check_arg(p.cap > 0.0f, "softcap: cap must be > 0");
  check_arg(!is_float8(p.dtype), "softcap: float8 is not supported");
  const auto& ops = cpu::vec_ops();
  const size_t size = dtype_size(p.dtype);
  const float inv = 1.0f / p.cap;
  for_rows(p.num_tokens, p.d, [&](int64_t i) {
    char* row = static_cast<char*>(p.data) + i * p.stride * size;
    float* x = cpu::scratch(0, p.d);
    ops.load(row, p.dtype, x, p.d, 1.0f);
    for (int64_t j = 0; j < p.d; ++j) x[j] = p.cap * std::tanh(x[j] * inv);
    ops.store(x, p.dtype, row, p.d, 1.0f);
  });
}

}  // namespace fastllm::kernels
