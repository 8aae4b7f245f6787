// refine_top_logits_cpu: the leading logits of each row recomputed without activation rounding
// (see quant_gemm.h).
//
// Why: the integer GEMM rounds the final hidden state to 8 bits per 32 values, which moves every
// logit by a few hundredths. Measured against the fp32 model (benchmarks/fidelity.py), that was
// 0.0009 of the default model's mean KL of 0.0029 with an 8-bit output projection. A row's
// probability mass sits in a handful of entries, so recomputing only those as float dot
// products removes most of it (32 per row: 0.0022) for ~32 dot products of `hidden` values per
// row, against the GEMM's `vocab`.
#include <algorithm>
#include <functional>
#include <string>
#include <vector>

#include "fastllm/kernels/quant_gemm.h"
#include "parallel.h"
#include "quant_gemm_impl.h"
#include "vec.h"

namespace fastllm::kernels {

namespace {

// Entries per span: the selection looks at a span's entries only when its maximum could be
// among the row's `count` largest.
constexpr int64_t kSpan = 64;

// The indices of the `count` largest entries of logits[0, n) within kRefineMargin of the
// largest (the lower index first among equals). The spans' maxima are distinct entries, so the
// count-th largest of them is a floor for the `count` largest entries: only the spans that reach
// it (about `count` of them) are gathered, and one partial selection picks among those.
void top_entries(const float* logits, int64_t n, int64_t count, std::vector<float>& span_max,
                 std::vector<float>& scratch, std::vector<int32_t>& out) {
  const auto& ops = cpu::vec_ops();
  const int64_t spans = (n + kSpan - 1) / kSpan;
  span_max.resize(static_cast<size_t>(spans));
  for (int64_t s = 0; s < spans; ++s)
    span_max[s] = ops.max(logits + s * kSpan, std::min(kSpan, n - s * kSpan));
  float floor = *std::max_element(span_max.begin(), span_max.end()) - kRefineMargin;
  if (count <= spans) {
    scratch.assign(span_max.begin(), span_max.end());
    std::nth_element(scratch.begin(), scratch.begin() + (count - 1), scratch.end(),
                     std::greater<float>());
    floor = std::max(floor, scratch[count - 1]);
  }
  out.clear();
  for (int64_t s = 0; s < spans; ++s) {
    if (span_max[s] < floor) continue;
    for (int64_t j = s * kSpan; j < std::min(n, (s + 1) * kSpan); ++j)
      if (logits[j] >= floor) out.push_back(static_cast<int32_t>(j));
  }
  if (static_cast<int64_t>(out.size()) > count) {
    auto better = [logits](int32_t a, int32_t b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    };
    std::nth_element(out.begin(), out.begin() + count, out.end(), better);
    out.resize(static_cast<size_t>(count));
  }
}

// The caller's lists, which the pool threads fill and read through references.
struct RefineScratch {
  std::vector<std::vector<int32_t>> rows;  // each row's candidates
  std::vector<std::pair<int64_t, int32_t>> items;
};

// Row r's logit j recomputed as x . dequantize(W_j) (+ bias): per 32-value block eight float
// lanes summed in a fixed order into a double (cpu::weight_row_dot), so a row's bits do not
// depend on its batch, and float's 2^-24 per block is far below the int8 rounding this removes.
void refine_entry(const RefineLogitsParams& p, int64_t r, int32_t j) {
  double total = cpu::weight_row_dot(p.type, p.weight, p.k, j, p.input + r * p.input_stride);
  if (p.bias != nullptr) total += p.bias[j];
  p.logits[r * p.logits_stride + j] = static_cast<float>(total);
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
  // Each row's candidates first (they read only its own logits), then every (row, candidate)
  // pair as one item: a decode step of one or two rows still shares its candidates' dot
  // products out over the pool. Each logit is computed alone, so the bits are the same.
  thread_local RefineScratch scratch;
  std::vector<std::vector<int32_t>>& candidates = scratch.rows;
  if (static_cast<int64_t>(candidates.size()) < p.m) candidates.resize(static_cast<size_t>(p.m));
  cpu::parallel_for(p.m, [&](int64_t r) {
    thread_local std::vector<float> span_max, spans;  // this pool thread's
    top_entries(p.logits + r * p.logits_stride, p.n, p.count, span_max, spans, candidates[r]);
  });
  std::vector<std::pair<int64_t, int32_t>>& items = scratch.items;
  items.clear();
  for (int64_t r = 0; r < p.m; ++r)
    for (const int32_t j : candidates[r]) items.emplace_back(r, j);
  cpu::parallel_for(static_cast<int64_t>(items.size()),
                    [&](int64_t i) { refine_entry(p, items[i].first, items[i].second); });
}

}  // namespace fastllm::kernels
