// CPU gated activations (SiLU / GeLU-tanh / GeLU-erf times the up projection), parallel over rows.
#include "fastllm/kernels/activation.h"

#include <algorithm>
#include <cmath>

#include "parallel.h"
#include "vec.h"

namespace fastllm::kernels {

void act_and_mul_cpu(const ActAndMulParams& p) {
  check_arg(p.num_tokens >= 0 && p.d > 0, "act_and_mul: bad sizes");
  check_arg(p.input_stride >= 2 * p.d && p.out_stride >= p.d, "act_and_mul: bad strides");
  check_arg(p.dtype != DType::kFloat8E4M3, "act_and_mul: float8 is not supported");
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
    switch (p.activation) {
      case Activation::kSilu:
        ops.silu_mul(gate, up, out, p.d);
        break;
      case Activation::kGeluTanh: {
        const float k = 0.7978845608028654f;  // sqrt(2 / pi)
        for (int64_t j = 0; j < p.d; ++j) {
          const float x = gate[j];
          out[j] = 0.5f * x * (1.0f + std::tanh(k * (x + 0.044715f * x * x * x))) * up[j];
        }
        break;
      }
      case Activation::kGelu:
        for (int64_t j = 0; j < p.d; ++j) {
          const float x = gate[j];
          out[j] = 0.5f * x * (1.0f + std::erf(x * 0.7071067811865476f)) * up[j];
        }
        break;
    }
    ops.store(out, p.dtype, static_cast<char*>(p.out) + i * p.out_stride * size, p.d, 1.0f);
  };
  const int64_t per_task = std::max<int64_t>(1, 8192 / p.d);
  const int64_t tasks = (p.num_tokens + per_task - 1) / per_task;
  if (tasks <= 1) {
    for (int64_t i = 0; i < p.num_tokens; ++i) run_row(i);
    return;
  }
  cpu::parallel_for(tasks, [&](int64_t task) {
    const int64_t end = std::min(p.num_tokens, (task + 1) * per_task);
    for (int64_t i = task * per_task; i < end; ++i) run_row(i);
  });
}

}  // namespace fastllm::kernels
