// FP8 weight GEMM on the CPU (fp8_gemm.h): a table of the 256 e4m3 values, then float dot
// products per (row of x, weight row), parallel over slices of weight rows so each slice is read
// from memory once for all rows of x.
#include "fastllm/kernels/fp8_gemm.h"

#include <algorithm>

#include "fastllm/kernels/dtype_convert.h"
#include "parallel.h"

namespace fastllm::kernels {

void check_fp8_gemm_params(const Fp8GemmParams& p) {
  check_arg(p.m >= 0 && p.n >= 0 && p.k > 0, "fp8_gemm: sizes must be positive");
  check_arg(p.input_stride >= p.k && p.out_stride >= p.n, "fp8_gemm: strides shorter than rows");
  check_arg(
      p.n == 0 || p.m == 0 ||
          (p.out != nullptr && p.input != nullptr && p.weight != nullptr && p.scale != nullptr),
      "fp8_gemm: out, input, weight and scale are required");
}

void fp8_gemm_cpu(const Fp8GemmParams& p) {
  check_fp8_gemm_params(p);
  if (p.m == 0 || p.n == 0) return;
  static const auto table = [] {
    struct Table {
      float v[256];
    } t{};
    for (int i = 0; i < 256; ++i) t.v[i] = fp8e4m3_to_float(static_cast<uint8_t>(i));
    return t;
  }();
  constexpr int64_t kRowsPerTask = 16;
  const int64_t tasks = (p.n + kRowsPerTask - 1) / kRowsPerTask;
  cpu::parallel_for(tasks, [&](int64_t task) {
    const int64_t first = task * kRowsPerTask, last = std::min(p.n, first + kRowsPerTask);
    for (int64_t r = 0; r < p.m; ++r) {
      const float* x = p.input + r * p.input_stride;
      for (int64_t col = first; col < last; ++col) {
        const uint8_t* w = p.weight + col * p.k;
        float acc[8] = {};
        int64_t i = 0;
        for (; i + 8 <= p.k; i += 8)
          for (int j = 0; j < 8; ++j) acc[j] += table.v[w[i + j]] * x[i + j];
        float sum =
            ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        for (; i < p.k; ++i) sum += table.v[w[i]] * x[i];
        p.out[r * p.out_stride + col] =
            sum * p.scale[col] + (p.bias != nullptr ? p.bias[col] : 0.0f);
      }
    }
  });
}

}  // namespace fastllm::kernels
