// CPU batched sampling; the order of operations and the arithmetic follow sampling.h exactly so
// that the CUDA sampler, which does the same steps, picks the same tokens.
#include "fastllm/kernels/sampling.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "../sampling_common.h"
#include "fastllm/kernels/philox.h"
#include "parallel.h"
#include "vec.h"

namespace fastllm::kernels {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct RowScratch {
  std::vector<int32_t> counts;  // output count | kPromptFlag, zero between rows
  std::vector<uint8_t> allowed;
  std::vector<float> values;
  std::vector<int32_t> order;
};

RowScratch& row_scratch(int64_t vocab) {
  thread_local RowScratch s;
  if (static_cast<int64_t>(s.counts.size()) < vocab) {
    s.counts.assign(static_cast<size_t>(vocab), 0);
    s.allowed.assign(static_cast<size_t>(vocab), 0);
  }
  return s;
}

void check_id(int32_t id, int64_t vocab, const char* what) {
  check_arg(id >= 0 && id < vocab, std::string("sample: ") + what + " token id " +
                                       std::to_string(id) + " outside the vocabulary");
}

// Largest t such that the values >= t sum to at least `need` (values are positive). Reorders a.
float top_p_threshold(float* a, int64_t n, double need) {
  int64_t lo = 0, hi = n;
  float smallest = std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) smallest = std::min(smallest, a[i]);
  while (hi > lo) {
    const float pivot = a[lo + (hi - lo) / 2];
    // Three-way partition of [lo, hi): > pivot, == pivot, < pivot.
    int64_t gt = lo, i = lo, lt = hi;
    while (i < lt) {
      if (a[i] > pivot) {
        std::swap(a[i++], a[gt++]);
      } else if (a[i] < pivot) {
        std::swap(a[i], a[--lt]);
      } else {
        ++i;
      }
    }
    double sum_gt = 0.0, sum_eq = 0.0;
    for (int64_t j = lo; j < gt; ++j) sum_gt += a[j];
    for (int64_t j = gt; j < lt; ++j) sum_eq += a[j];
    if (sum_gt >= need) {
      hi = gt;
    } else if (sum_gt + sum_eq >= need) {
      return pivot;
    } else {
      need -= sum_gt + sum_eq;
      lo = lt;
    }
  }
  return smallest;  // rounding left a sliver of mass unaccounted: keep everything
}

// The sampled token's logprob and rank, and the top logprobs, from the raw logits (those that
// the batch asked for); x is vocab floats of scratch.
void write_logprobs(const SamplingParamsBatch& p, int64_t row, const float* raw, int32_t token,
                    float* x) {
  p.sampled[row] = token;
  if (p.sampled_logprob == nullptr && p.sampled_rank == nullptr && p.num_top_logprobs == 0) return;
  // Vectorised log-sum-exp: a scalar double exp per vocabulary entry cost ~0.5 ms a row, 10 % of
  // a batch-32 step.
  const int64_t vocab = p.vocab;
  const auto& vec = cpu::vec_ops();
  const float raw_max = vec.max(raw, vocab);
  std::copy(raw, raw + vocab, x);
  const double sum = vec.exp_shift_sum(x, vocab, raw_max);
  const float lse = raw_max + static_cast<float>(std::log(sum));
  if (p.sampled_logprob != nullptr) p.sampled_logprob[row] = raw[token] - lse;
  if (p.sampled_rank != nullptr) {
    int32_t greater = 0;
    for (int64_t v = 0; v < vocab; ++v) greater += raw[v] > raw[token];
    p.sampled_rank[row] = greater + 1;
  }
  if (p.num_top_logprobs > 0) {
    auto& order = row_scratch(vocab).order;
    order.resize(static_cast<size_t>(vocab));
    std::iota(order.begin(), order.end(), 0);
    const int64_t n = p.num_top_logprobs;
    std::partial_sort(order.begin(), order.begin() + n, order.end(), [&](int32_t a, int32_t b) {
      return raw[a] > raw[b] || (raw[a] == raw[b] && a < b);
    });
    for (int64_t i = 0; i < n; ++i) {
      p.top_ids[row * n + i] = order[i];
      p.top_logprobs[row * n + i] = raw[order[i]] - lse;
    }
  }
}

void sample_row(const SamplingParamsBatch& p, int64_t row) {
  const int64_t vocab = p.vocab;
  const float* raw = p.logits + row * p.logits_row_stride;
  const RowParams rp = RowParams::load(p, row);
  // Validate every id before touching the shared scratch, which must stay zeroed between rows.
  for (int32_t i = rp.output_begin; i < rp.output_end; ++i)
    check_id(p.output_ids[i], vocab, "output");
  for (int32_t i = rp.prompt_begin; i < rp.prompt_end; ++i)
    check_id(p.prompt_ids[i], vocab, "prompt");
  for (int32_t i = rp.bias_begin; i < rp.bias_end; ++i)
    check_id(p.bias_ids[i], vocab, "logit_bias");
  for (int32_t i = rp.allowed_begin; i < rp.allowed_end; ++i)
    check_id(p.allowed_ids[i], vocab, "allowed");
  const auto& vec = cpu::vec_ops();
  float* x = cpu::scratch(0, vocab);
  if (rp.greedy() && !rp.has_penalties() && rp.bias_end == rp.bias_begin &&
      rp.allowed_end == rp.allowed_begin) {
    // Plain greedy: the raw logits' argmax, without a working copy.
    write_logprobs(p, row, raw, static_cast<int32_t>(vec.argmax(raw, vocab)), x);
    return;
  }
  std::copy(raw, raw + vocab, x);
  RowScratch& scratch = row_scratch(vocab);

  // 1. Penalties.
  if (rp.has_penalties()) {
    auto& counts = scratch.counts;
    for (int32_t i = rp.output_begin; i < rp.output_end; ++i) counts[p.output_ids[i]] += 1;
    for (int32_t i = rp.prompt_begin; i < rp.prompt_end; ++i)
      counts[p.prompt_ids[i]] |= kPromptFlag;
    auto apply = [&](int32_t id) {
      if (counts[id] == 0) return;  // already applied (duplicate id)
      x[id] = apply_penalties(x[id], counts[id], rp);
      counts[id] = 0;
    };
    for (int32_t i = rp.output_begin; i < rp.output_end; ++i) apply(p.output_ids[i]);
    for (int32_t i = rp.prompt_begin; i < rp.prompt_end; ++i) apply(p.prompt_ids[i]);
  }
  // 2. Logit bias.
  for (int32_t i = rp.bias_begin; i < rp.bias_end; ++i) x[p.bias_ids[i]] += p.bias_values[i];
  // 3. Allowed token ids.
  if (rp.allowed_end > rp.allowed_begin) {
    auto& allowed = scratch.allowed;
    for (int32_t i = rp.allowed_begin; i < rp.allowed_end; ++i) allowed[p.allowed_ids[i]] = 1;
    for (int64_t v = 0; v < vocab; ++v)
      if (!allowed[v]) x[v] = kNegInf;
    for (int32_t i = rp.allowed_begin; i < rp.allowed_end; ++i) allowed[p.allowed_ids[i]] = 0;
  }

  int32_t token = 0;
  if (rp.greedy()) {
    token = static_cast<int32_t>(vec.argmax(x, vocab));
  } else {
    // 5. Temperature.
    float m = kNegInf;
    for (int64_t v = 0; v < vocab; ++v) {
      x[v] = x[v] / rp.temperature;
      m = std::max(m, x[v]);
    }
    if (m == kNegInf) {
      token = static_cast<int32_t>(std::max_element(raw, raw + vocab) - raw);
    } else {
      // 6. min-p: p_v >= min_p * p_max  <=>  exp(x_v - m) >= min_p.
      if (rp.min_p > 0.0f) {
        for (int64_t v = 0; v < vocab; ++v)
          if (std::exp(x[v] - m) < rp.min_p) x[v] = kNegInf;
      }
      // 7. top-k: the k-th largest surviving value.
      if (rp.top_k > 0) {
        auto& values = scratch.values;
        values.clear();
        for (int64_t v = 0; v < vocab; ++v)
          if (x[v] != kNegInf) values.push_back(x[v]);
        if (static_cast<int64_t>(values.size()) > rp.top_k) {
          std::nth_element(values.begin(), values.begin() + (rp.top_k - 1), values.end(),
                           std::greater<float>());
          const float threshold = values[rp.top_k - 1];
          for (int64_t v = 0; v < vocab; ++v)
            if (x[v] < threshold) x[v] = kNegInf;
        }
      }
      // 8. top-p over the survivors.
      if (rp.top_p < 1.0f) {
        auto& values = scratch.values;
        values.clear();
        double total = 0.0;
        for (int64_t v = 0; v < vocab; ++v) {
          if (x[v] == kNegInf) continue;
          values.push_back(std::exp(x[v] - m));
          total += values.back();
        }
        const float threshold = top_p_threshold(values.data(), static_cast<int64_t>(values.size()),
                                                static_cast<double>(rp.top_p) * total);
        for (int64_t v = 0; v < vocab; ++v)
          if (x[v] != kNegInf && std::exp(x[v] - m) < threshold) x[v] = kNegInf;
      }
      const int32_t draft = p.draft_ids != nullptr ? p.draft_ids[row] : -1;
      if (draft >= 0 && draft < vocab) {
        // Typical acceptance: the draft if the target finds it likely enough for how spread out
        // the target's distribution is, else the target's most likely token.
        double z = 0.0, weighted = 0.0;
        for (int64_t v = 0; v < vocab; ++v) {
          if (x[v] == kNegInf) continue;
          const double e = std::exp(static_cast<double>(x[v] - m));
          z += e;
          weighted += e * static_cast<double>(x[v] - m);
        }
        const double entropy = std::log(z) - weighted / z;
        const double p_draft =
            x[draft] == kNegInf ? 0.0 : std::exp(static_cast<double>(x[draft] - m)) / z;
        const double bar = std::min(static_cast<double>(p.typical_threshold),
                                    p.typical_alpha * std::exp(-entropy));
        token = p_draft > bar ? draft : static_cast<int32_t>(vec.argmax(x, vocab));
        write_logprobs(p, row, raw, token, x);
        return;
      }
      // 9. Exponential race. Gumbel noise lies in [-2.8, 16.6], so a token more than kRaceMargin
      // below the maximum cannot win; skipping it saves its random numbers and logarithms.
      const SamplingStream stream =
          SamplingStream::make(rp.seed, p.global_seed, rp.generator_offset, row);
      const float floor = m - kRaceMargin;
      float best = kNegInf;
      int64_t best_index = -1;
      int64_t cached_group = -1;
      Philox4 bits{};
      for (int64_t v = 0; v < vocab; ++v) {
        if (!(x[v] >= floor)) continue;
        if (v / 4 != cached_group) {
          cached_group = v / 4;
          bits = stream.block(static_cast<uint32_t>(cached_group));
        }
        const float score = race_score(x[v], bits.v[v % 4]);
        if (score > best) {
          best = score;
          best_index = v;
        }
      }
      token =
          static_cast<int32_t>(best_index >= 0 ? best_index : (std::max_element(x, x + vocab) - x));
    }
  }
  write_logprobs(p, row, raw, token, x);
}

}  // namespace

void check_sampling_params(const SamplingParamsBatch& p) {
  check_arg(p.num_rows >= 0 && p.vocab > 0, "sample: bad sizes");
  check_arg(p.logits_row_stride >= p.vocab, "sample: logits row stride smaller than vocab");
  check_arg(p.sampled != nullptr || p.num_rows == 0, "sample: missing output array");
  check_arg(p.num_top_logprobs >= 0 && p.num_top_logprobs <= p.vocab,
            "sample: num_top_logprobs outside [0, vocab]");
  check_arg(p.num_top_logprobs == 0 || (p.top_logprobs != nullptr && p.top_ids != nullptr),
            "sample: top logprob outputs missing");
  check_arg((p.prompt_offsets == nullptr) == (p.prompt_ids == nullptr) &&
                (p.output_offsets == nullptr) == (p.output_ids == nullptr) &&
                (p.allowed_offsets == nullptr) == (p.allowed_ids == nullptr) &&
                (p.bias_offsets == nullptr) == (p.bias_ids == nullptr) &&
                (p.bias_ids == nullptr) == (p.bias_values == nullptr),
            "sample: CSR offsets and ids must be given together");
}

size_t sampling_workspace_bytes(int64_t num_rows, int64_t vocab) {
  return static_cast<size_t>(num_rows * vocab) * (sizeof(float) + sizeof(int32_t));
}

void sample_cpu(const SamplingParamsBatch& p) {
  check_sampling_params(p);
  if (p.num_rows == 1) {
    sample_row(p, 0);
    return;
  }
  cpu::parallel_for(p.num_rows, [&](int64_t row) { sample_row(p, row); });
}

}  // namespace fastllm::kernels
