// CPU mixture-of-experts: routing and the expert MLPs grouped by expert (see moe.h).
#include "fastllm/kernels/moe.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "fastllm/kernels/activation.h"
#include "parallel.h"
#include "quant_gemm_impl.h"
#include "vec.h"

namespace fastllm::kernels {

void moe_route_cpu(const MoeRouteParams& p) {
  check_arg(p.num_tokens >= 0 && p.num_experts > 0, "moe_route: bad sizes");
  check_arg(p.top_k >= 1 && p.top_k <= p.num_experts,
            "moe_route: top_k must be in [1, num_experts], got " + std::to_string(p.top_k));
  check_arg(p.logits_stride >= p.num_experts, "moe_route: bad logits stride");
  if (p.num_tokens == 0) return;
  check_arg(p.logits != nullptr && p.topk_ids != nullptr && p.topk_weights != nullptr,
            "moe_route: missing arrays");
  thread_local std::vector<float> probs;
  thread_local std::vector<char> taken;
  probs.resize(static_cast<size_t>(p.num_experts));
  taken.resize(static_cast<size_t>(p.num_experts));
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    const float* x = p.logits + t * p.logits_stride;
    float max = x[0];
    for (int64_t e = 1; e < p.num_experts; ++e) max = std::max(max, x[e]);
    float sum = 0.0f;
    for (int64_t e = 0; e < p.num_experts; ++e) {
      probs[e] = std::exp(x[e] - max);
      sum += probs[e];
    }
    const float inv = 1.0f / sum;
    for (int64_t e = 0; e < p.num_experts; ++e) probs[e] *= inv;
    std::fill(taken.begin(), taken.end(), 0);
    int32_t* ids = p.topk_ids + t * p.top_k;
    float* weights = p.topk_weights + t * p.top_k;
    float chosen = 0.0f;
    for (int64_t j = 0; j < p.top_k; ++j) {
      int64_t best = -1;
      for (int64_t e = 0; e < p.num_experts; ++e)
        if (!taken[e] && (best < 0 || probs[e] > probs[best])) best = e;
      taken[best] = 1;
      ids[j] = static_cast<int32_t>(best);
      weights[j] = probs[best];
      chosen += probs[best];
    }
    if (p.renormalize)
      for (int64_t j = 0; j < p.top_k; ++j) weights[j] /= chosen;
  }
}

namespace {

int64_t row_bytes(QuantType type, int64_t k) {
  return k / quant_block_values(type) * quant_block_bytes(type);
}

void check_expert_weights(const void* weight, QuantType type, int64_t rows, int64_t k,
                          const char* name) {
  const std::string where = std::string("moe_experts: ") + name;
  check_arg(weight != nullptr, where + " is missing");
  const int64_t values = quant_block_values(type);
  check_arg(values > 0, where + " has an unknown quantization type");
  check_arg(k % values == 0, where + ": " + std::to_string(k) + " values are not whole " +
                                 quant_type_name(type) + " blocks");
  check_arg(rows % quant_row_group(type) == 0, where + ": " + quant_type_name(type) +
                                                   " needs rows per expert in groups of " +
                                                   std::to_string(quant_row_group(type)));
}

// One GEMM task: rows [n0, n1) of expert e's weight over that expert's block of input rows.
struct GemmTask {
  int64_t expert;
  int64_t n0;
  int64_t n1;
};

// Tasks of at most `per` weight rows over every active expert's rows_per_expert (in the x8 path
// `per` is a multiple of 16: two 8-row groups, which also keeps the SiLU's vector lanes where a
// whole row puts them).
void slice_tasks(const std::vector<int64_t>& counts, int64_t rows_per_expert, int64_t per,
                 std::vector<GemmTask>& tasks) {
  tasks.clear();
  for (size_t e = 0; e < counts.size(); ++e) {
    if (counts[e] == 0) continue;
    for (int64_t n0 = 0; n0 < rows_per_expert; n0 += per)
      tasks.push_back({static_cast<int64_t>(e), n0, std::min(rows_per_expert, n0 + per)});
  }
}

// Tasks covering every active expert's rows_per_expert weight rows, in slices sized so the pool
// gets a few tasks per thread (whole row groups of the layout).
std::vector<GemmTask>& plan_tasks(const std::vector<int64_t>& counts, int64_t rows_per_expert,
                                  int64_t group, std::vector<GemmTask>& tasks) {
  int64_t active = 0;
  for (int64_t c : counts) active += c > 0;
  const int64_t wanted = static_cast<int64_t>(cpu::pool_size()) * 4;
  int64_t per = (rows_per_expert * active + wanted - 1) / std::max<int64_t>(wanted, 1);
  per = std::clamp<int64_t>(per, 16, rows_per_expert);
  per = (per + group - 1) / group * group;
  slice_tasks(counts, rows_per_expert, per, tasks);
  return tasks;
}

// Rows per task of one x8 expert GEMM whose experts see at most max_count tokens each (`base`
// is a multiple of 16): towards two tasks per pool thread, up to base * 8 rows with one or two
// tokens per expert and base * 4 with more, since the GEMMs stream their weights from memory
// and every task starts a cold stream. (MoE benchmark model, moe_step: one token ~20 % faster
// with 704 + 256-row slices than with 128 + 64; 4-256 tokens 4-17 % faster with base * 4
// than with base.)
int64_t expert_slice_rows(int64_t base, int64_t rows_per_expert, int64_t active,
                          int64_t max_count) {
  const int64_t wanted = (rows_per_expert * active + 2 * cpu::pool_size() - 1) /
                         (2 * static_cast<int64_t>(cpu::pool_size()));
  const int64_t cap = max_count <= 2 ? base * 8 : base * 4;
  return (std::clamp(wanted, base, cap) + 15) / 16 * 16;
}

struct Workspace {
  std::vector<int64_t> counts, starts, position;
  std::vector<float> xs, gate_up, act, ys;
  std::vector<GemmTask> tasks;
  std::vector<cpu::Q8ActBlock> xq;
};

// Rows [0, rows) of x (k floats each) quantized for an x8 GEMM into xq, over the pool when there
// are enough values to pay for it.
void quantize_rows(QuantType type, const float* x, int64_t rows, int64_t k, bool allow_simd,
                   std::vector<cpu::Q8ActBlock>& xq) {
  if (static_cast<int64_t>(xq.size()) < rows * (k / 32))
    xq.resize(static_cast<size_t>(rows * k / 32));
  auto row = [&](int64_t r) {
    cpu::quantize_x8_row(type, x + r * k, k, xq.data() + r * (k / 32), allow_simd);
  };
  if (rows * k >= (1 << 15)) {
    cpu::parallel_for(rows, row);
  } else {
    for (int64_t r = 0; r < rows; ++r) row(r);
  }
}

bool x8_layout(QuantType type) { return quant_row_group(type) == 8; }

// The expert MLPs of any layout quant_gemm_cpu reads: each GEMM a set of (expert, weight row
// slice) tasks over that expert's block of rows, SiLU-and-mul between them.
void run_grouped_gemms(const MoeExpertsParams& p, const std::vector<int64_t>& counts,
                       const std::vector<int64_t>& starts, std::vector<GemmTask>& tasks,
                       const std::vector<float>& xs, std::vector<float>& gate_up,
                       std::vector<float>& act, std::vector<float>& ys) {
  const int64_t h = p.hidden, inter = p.intermediate, rows = p.num_tokens * p.top_k;
  auto grouped_gemm = [&](const void* weight, QuantType type, int64_t n, int64_t in_k,
                          const float* x, float* y) {
    const int64_t expert_bytes = n * row_bytes(type, in_k);
    plan_tasks(counts, n, quant_row_group(type), tasks);
    cpu::parallel_for(static_cast<int64_t>(tasks.size()), [&](int64_t i) {
      const GemmTask& task = tasks[i];
      QuantGemmParams g;
      g.m = counts[task.expert];
      g.n = task.n1 - task.n0;
      g.k = in_k;
      g.input = x + starts[task.expert] * in_k;
      g.input_stride = in_k;
      g.out = y + starts[task.expert] * n + task.n0;
      g.out_stride = n;
      g.weight = static_cast<const uint8_t*>(weight) + task.expert * expert_bytes +
                 task.n0 * row_bytes(type, in_k);
      g.type = type;
      g.allow_simd = p.allow_simd;
      quant_gemm_cpu(g);  // runs in this task's thread (the pool does not nest)
    });
  };
  grouped_gemm(p.gate_up, p.gate_up_type, 2 * inter, h, xs.data(), gate_up.data());
  ActAndMulParams silu;
  silu.out = act.data();
  silu.input = gate_up.data();
  silu.num_tokens = rows;
  silu.d = inter;
  silu.input_stride = 2 * inter;
  silu.out_stride = inter;
  act_and_mul_cpu(silu);
  grouped_gemm(p.down, p.down_type, h, inter, act.data(), ys.data());
}

}  // namespace

void moe_experts_cpu(const MoeExpertsParams& p) {
  check_arg(p.num_tokens >= 0 && p.hidden > 0 && p.intermediate > 0 && p.num_experts > 0,
            "moe_experts: bad sizes");
  check_arg(p.top_k >= 1 && p.top_k <= p.num_experts,
            "moe_experts: top_k must be in [1, "
            "num_experts]");
  check_arg(p.input_stride >= p.hidden && p.out_stride >= p.hidden, "moe_experts: bad strides");
  check_expert_weights(p.gate_up, p.gate_up_type, 2 * p.intermediate, p.hidden, "gate_up");
  check_expert_weights(p.down, p.down_type, p.hidden, p.intermediate, "down");
  const int64_t t = p.num_tokens, k = p.top_k, h = p.hidden, inter = p.intermediate;
  if (t == 0) return;
  check_arg(
      p.out != nullptr && p.input != nullptr && p.topk_ids != nullptr && p.topk_weights != nullptr,
      "moe_experts: missing arrays");

  // Sort the (token, slot) pairs by expert, stable in token order.
  // This thread's buffers, named through references: the pool threads that run the tasks
  // below must see the caller's instances, not their own thread_local ones.
  thread_local Workspace workspace;
  Workspace& ws = workspace;
  std::vector<int64_t>&counts = ws.counts, &starts = ws.starts, &position = ws.position;
  std::vector<float>&xs = ws.xs, &gate_up = ws.gate_up, &act = ws.act, &ys = ws.ys;
  std::vector<GemmTask>& tasks = ws.tasks;
  counts.assign(static_cast<size_t>(p.num_experts), 0);
  for (int64_t i = 0; i < t * k; ++i) {
    const int32_t e = p.topk_ids[i];
    check_arg(e >= 0 && e < p.num_experts,
              "moe_experts: expert id " + std::to_string(e) + " out of range");
    ++counts[e];
  }
  starts.assign(static_cast<size_t>(p.num_experts) + 1, 0);
  for (int64_t e = 0; e < p.num_experts; ++e) starts[e + 1] = starts[e] + counts[e];
  position.resize(static_cast<size_t>(t * k));
  {
    std::vector<int64_t> next(starts.begin(), starts.end() - 1);
    for (int64_t i = 0; i < t * k; ++i) position[i] = next[p.topk_ids[i]]++;
  }
  const int64_t rows = t * k;
  if (static_cast<int64_t>(xs.size()) < rows * h) xs.resize(static_cast<size_t>(rows * h));
  if (static_cast<int64_t>(gate_up.size()) < rows * 2 * inter)
    gate_up.resize(static_cast<size_t>(rows * 2 * inter));
  if (static_cast<int64_t>(act.size()) < rows * inter)
    act.resize(static_cast<size_t>(rows * inter));
  if (static_cast<int64_t>(ys.size()) < rows * h) ys.resize(static_cast<size_t>(rows * h));
  for (int64_t i = 0; i < rows; ++i)
    std::memcpy(xs.data() + position[i] * h, p.input + (i / k) * p.input_stride,
                static_cast<size_t>(h) * sizeof(float));

  if (x8_layout(p.gate_up_type) && x8_layout(p.down_type) && inter % 16 == 0 && h % 16 == 0) {
    // The x8 layouts: each GEMM's activations quantized once, and every task of the first GEMM
    // takes matching slices of the gate and up rows through SiLU-and-mul while they are in cache.
    const auto& ops = cpu::vec_ops();  // act_and_mul_cpu's, whatever allow_simd says
    const int64_t gu_bytes = row_bytes(p.gate_up_type, h),
                  down_bytes = row_bytes(p.down_type, inter);
    const auto* gate_up_w = static_cast<const uint8_t*>(p.gate_up);
    const auto* down_w = static_cast<const uint8_t*>(p.down);
    int64_t active = 0, max_count = 0;
    for (const int64_t c : counts) {
      active += c > 0;
      max_count = std::max(max_count, c);
    }
    quantize_rows(p.gate_up_type, xs.data(), rows, h, p.allow_simd, ws.xq);
    slice_tasks(counts, inter, expert_slice_rows(128, inter, active, max_count), tasks);
    cpu::parallel_for(static_cast<int64_t>(tasks.size()), [&](int64_t i) {
      const GemmTask& task = tasks[i];
      const int64_t m = counts[task.expert], first = starts[task.expert], n = task.n1 - task.n0;
      const uint8_t* expert = gate_up_w + task.expert * 2 * inter * gu_bytes;
      const cpu::Q8ActBlock* xq = ws.xq.data() + first * (h / 32);
      float* out = gate_up.data() + first * 2 * inter;
      cpu::x8_gemm_quantized(p.gate_up_type, expert + task.n0 * gu_bytes, n / 8, xq, h, m,
                             out + task.n0, 2 * inter, p.allow_simd);
      cpu::x8_gemm_quantized(p.gate_up_type, expert + (inter + task.n0) * gu_bytes, n / 8, xq, h, m,
                             out + inter + task.n0, 2 * inter, p.allow_simd);
      for (int64_t r = 0; r < m; ++r)
        ops.silu_mul(out + r * 2 * inter + task.n0, out + r * 2 * inter + inter + task.n0,
                     act.data() + (first + r) * inter + task.n0, n);
    });
    quantize_rows(p.down_type, act.data(), rows, inter, p.allow_simd, ws.xq);
    slice_tasks(counts, h, expert_slice_rows(64, h, active, max_count), tasks);
    cpu::parallel_for(static_cast<int64_t>(tasks.size()), [&](int64_t i) {
      const GemmTask& task = tasks[i];
      const int64_t first = starts[task.expert];
      cpu::x8_gemm_quantized(p.down_type, down_w + (task.expert * h + task.n0) * down_bytes,
                             (task.n1 - task.n0) / 8, ws.xq.data() + first * (inter / 32), inter,
                             counts[task.expert], ys.data() + first * h + task.n0, h, p.allow_simd);
    });
  } else {
    run_grouped_gemms(p, counts, starts, tasks, xs, gate_up, act, ys);
  }

  // Each token's weighted sum over its slots, in slot order.
  auto combine = [&](int64_t tok) {
    float* o = p.out + tok * p.out_stride;
    for (int64_t j = 0; j < k; ++j) {
      const float w = p.topk_weights[tok * k + j];
      const float* y = ys.data() + position[tok * k + j] * h;
      if (j == 0) {
        for (int64_t c = 0; c < h; ++c) o[c] = w * y[c];
      } else {
        for (int64_t c = 0; c < h; ++c) o[c] += w * y[c];
      }
    }
  };
  if (t * h >= (1 << 15)) {
    cpu::parallel_for(t, combine);
  } else {
    for (int64_t tok = 0; tok < t; ++tok) combine(tok);
  }
}

}  // namespace fastllm::kernels
