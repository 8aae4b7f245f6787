// refine_top_logits_cpu: the leading logits of each row recomputed without activation rounding
// (see quant_gemm.h).
//
// Why: the integer GEMM rounds the final hidden state to 8 bits per 32 values, which moves every
// logit by a few hundredths. Measured against the fp32 model (benchmarks/fidelity.py), that was a
// third of the default model's KL divergence once the output projection kept its 8-bit weights.
// A row's probability mass sits in a handful of entries, so recomputing only those as float dot
// products removes most of it for ~30 dot products of `hidden` values per row, against the
// GEMM's `vocab`.
#include <algorithm>
#include <string>
#include <vector>

#include "fastllm/kernels/quant_gemm.h"
#include "parallel.h"
#include "quant_gemm_impl.h"
#include "vec.h"

namespace fastllm::kernels {

namespace {

// Entries scanned per maximum test: a span whose largest entry is below the current floor (all
// but a few spans of a row) costs one SIMD max and no per-entry branch.
constexpr int64_t kSpan = 64;

// The indices of the `count` largest entries of logits[0, n) at or above floor, largest first
// and the lower index first among equals: one pass that keeps a min-heap of the best so far and
// raises the floor to its smallest entry once full.
void top_entries(const float* logits, int64_t n, int64_t count, float floor,
                 std::vector<int32_t>& heap) {
  // better(a, b): a ranks before b. As std's heap comparator it keeps the worst kept entry on top.
  auto better = [logits](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  heap.clear();
  const auto& ops = cpu::vec_ops();
  for (int64_t start = 0; start < n; start += kSpan) {
    const int64_t end = std::min(n, start + kSpan);
    if (ops.max(logits + start, end - start) < floor) continue;
    for (int64_t j = start; j < end; ++j) {
      // Indices rise, so an entry equal to the worst kept one ranks after it: skip it.
      if (logits[j] < floor ||
          (static_cast<int64_t>(heap.size()) == count && !(logits[j] > logits[heap.front()])))
        continue;
      if (static_cast<int64_t>(heap.size()) == count) {
        std::pop_heap(heap.begin(), heap.end(), better);
        heap.back() = static_cast<int32_t>(j);
      } else {
        heap.push_back(static_cast<int32_t>(j));
      }
      std::push_heap(heap.begin(), heap.end(), better);
      if (static_cast<int64_t>(heap.size()) == count) floor = logits[heap.front()];
    }
  }
}

void refine_row(const RefineLogitsParams& p, int64_t r, std::vector<int32_t>& candidates,
                std::vector<float>& row) {
  float* logits = p.logits + r * p.logits_stride;
  const float* x = p.input + r * p.input_stride;
  top_entries(logits, p.n, p.count, cpu::vec_ops().max(logits, p.n) - kRefineMargin, candidates);
  for (const int32_t j : candidates) {
    cpu::dequantize_weight_row(p.type, p.weight, p.k, j, row.data());
    // Four chains, summed in a fixed order: the same bits for a row in any batch.
    double sum[4] = {0.0, 0.0, 0.0, 0.0};
    int64_t i = 0;
    for (; i + 4 <= p.k; i += 4)
      for (int c = 0; c < 4; ++c) sum[c] += static_cast<double>(x[i + c]) * row[i + c];
    for (; i < p.k; ++i) sum[0] += static_cast<double>(x[i]) * row[i];
    double total = (sum[0] + sum[1]) + (sum[2] + sum[3]);
    if (p.bias != nullptr) total += p.bias[j];
    logits[j] = static_cast<float>(total);
  }
}

}  // namespace

void refine_top_logits_cpu(const RefineLogitsParams& p) {
  const int64_t values = quant_block_values(p.type);
  check_arg(values > 0, "refine_top_logits: unknown quantization type");
  check_arg(p.m >= 0 && p.n >= 0 && p.k > 0 && p.k % values == 0 && p.count >= 0,
            "refine_top_logits: bad sizes");
  check_arg(p.logits_stride >= p.n && p.input_stride >= p.k, "refine_top_logits: bad strides");
  // F32 and the K-quants already run float dot products.
  if (p.m == 0 || p.n == 0 || p.count == 0 || p.type == QuantType::kF32 || values == 256) return;
  check_arg(quant_row_group(p.type) == 1 || p.n % 8 == 0,
            std::string("refine_top_logits: ") + quant_type_name(p.type) +
                " weights need out_features to be a multiple of 8");
  cpu::parallel_for(p.m, [&](int64_t r) {
    thread_local std::vector<int32_t> candidates;
    thread_local std::vector<float> row;
    if (static_cast<int64_t>(row.size()) < p.k) row.resize(static_cast<size_t>(p.k));
    refine_row(p, r, candidates, row);
  });
}

}  // namespace fastllm::kernels
