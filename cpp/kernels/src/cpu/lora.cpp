// CPU batched LoRA: tokens grouped by slot (segments); each task takes a block of a segment's
// tokens through the shrink and then the expand, so a call is one fork-join on the CPU pool. The
// micro-kernels (lora_simd.h) are picked once per process by instruction set.
#include "fastllm/kernels/lora.h"

#include <algorithm>
#include <string>
#include <vector>

#include "fastllm/kernels/dtype_convert.h"
#include "lora_impl.h"
#include "parallel.h"
#include "vec.h"

namespace fastllm::kernels {
namespace cpu {
namespace {

// Plain C++ (one float per "vector"): the fallback for CPUs without AVX2 and
// FASTLLM_CPU_ISA=scalar.
struct Scalar {
  using Reg = float;
  static constexpr int64_t kWidth = 1;
  static constexpr int kRegs = 16;
  static Reg zero() { return 0.0f; }
  static Reg set1(float v) { return v; }
  static Reg load(const float* p) { return *p; }
  static Reg load_partial(const float* p, int) { return *p; }  // never called: kWidth is 1
  static Reg load(const uint16_t* p) { return half_to_float(*p); }
  static float to_float(uint16_t h) { return half_to_float(h); }
  static Reg load_partial(const uint16_t* p, int) { return half_to_float(*p); }
  static void store(float* p, Reg v) { *p = v; }
  static Reg fma(Reg a, Reg b, Reg c) { return a * b + c; }
  static float fma1(float a, float b, float c) { return a * b + c; }
  static float sum(Reg v) { return v; }
};

}  // namespace
}  // namespace cpu
}  // namespace fastllm::kernels

#include "lora_simd.h"

namespace fastllm::kernels {
namespace cpu {
namespace {

const LoraKernels kScalarLora = make_lora_kernels<Scalar>("scalar");

const LoraKernels& pick_lora_kernels() {
  static const LoraKernels* picked = [] {
    const IsaLevel cap = isa_cap();  // FASTLLM_CPU_ISA: tests run every path on one machine
    const LoraKernels* kernels = &kScalarLora;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (cap >= IsaLevel::kAvx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c") && avx2_lora_kernels() != nullptr)
      kernels = avx2_lora_kernels();
    if (cap >= IsaLevel::kAvx512 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("fma") && avx512_lora_kernels() != nullptr)
      kernels = avx512_lora_kernels();
#else
    (void)cap;
#endif
    return kernels;
  }();
  return *picked;
}

// The tokens of one slot, at order[begin, begin + count) and h rows [begin, begin + count).
struct Segment {
  int64_t begin = 0;
  int64_t count = 0;
  const void* a = nullptr;  // float or float16 (LoraParams::weight_dtype)
  const void* b = nullptr;
  int64_t rank = 0;
  float scale = 0.0f;
};

// One task: tokens [t0, t1) of a segment, shrunk to their rank values and expanded into every
// output column. Tasks share nothing, so a call is one fork-join on the pool.
struct Task {
  int32_t segment;
  int64_t t0, t1;
};

// Multiply-adds a task aims at: big enough to pay for claiming it, small enough that a decode step
// (a few tokens per adapter) still spreads over the pool.
constexpr int64_t kMinTaskWork = int64_t{1} << 15;
constexpr int64_t kMaxTaskWork = int64_t{1} << 20;
// Below this much work in a call, one thread does it all: a call with one task (a single decode
// token: ~20-35 k multiply-adds at rank 16) only pays the pool's hand-over. Above it, both passes
// of a task run in one fork-join, which the layer's other kernels keep warm (the workers spin
// between back-to-back calls): measured on the default model's decode shapes (benchmarks/
// lora_step.cpp), 16 tokens over 4 adapters ran ~1.7x faster on two threads than on one, since
// the adapters' weights then stream through two cores.
constexpr int64_t kSerialWork = int64_t{1} << 16;
// Tokens of a task are tiled by 4 in the shrink (lora_simd.h): blocks are multiples of it.
constexpr int64_t kTokenTile = 4;

// This thread's float buffer `which` of at least n floats. Kept apart from cpu::scratch so a
// LoRA call never shares a buffer with the kernel that produced its input.
float* lora_scratch(int which, int64_t n) {
  thread_local std::vector<float> buffers[2];
  auto& buffer = buffers[which];
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(static_cast<size_t>(n));
  return buffer.data();
}

}  // namespace

const LoraKernels& scalar_lora_kernels() { return kScalarLora; }

#ifndef FASTLLM_HAVE_LORA_AVX2_FILE
const LoraKernels* avx2_lora_kernels() { return nullptr; }
#endif
#ifndef FASTLLM_HAVE_LORA_AVX512_FILE
const LoraKernels* avx512_lora_kernels() { return nullptr; }
#endif

}  // namespace cpu

int64_t lora_workspace_bytes(int64_t num_tokens, int64_t max_rank) {
  check_arg(num_tokens >= 0 && max_rank >= 0 && max_rank <= kMaxLoraRank,
            "lora_workspace_bytes: num_tokens must be >= 0 and max_rank in [0, " +
                std::to_string(kMaxLoraRank) + "]");
  return num_tokens * (max_rank > 0 ? max_rank : kMaxLoraRank) *
         static_cast<int64_t>(sizeof(float));
}

void check_lora_shapes(const LoraParams& p) {
  check_arg(p.num_tokens >= 0, "lora: num_tokens must be >= 0");
  check_arg(p.in_features > 0 && p.out_features > 0,
            "lora: in_features and out_features must be positive");
  check_arg(p.num_slots >= 0, "lora: num_slots must be >= 0");
  check_arg(p.weight_dtype == DType::kFloat32 || p.weight_dtype == DType::kFloat16,
            "lora: weights must be float32 or float16");
  check_arg(p.max_rank >= 0 && p.max_rank <= kMaxLoraRank,
            "lora: max_rank must be in [0, " + std::to_string(kMaxLoraRank) +
                "] (0 = " + std::to_string(kMaxLoraRank) + ")");
  if (p.num_tokens > 0) {
    check_arg(p.out != nullptr && p.input != nullptr && p.token_slots != nullptr,
              "lora: out, input and token_slots must not be null");
    // Rows of out must not overlap, since each is written by one task; out may be a slice of a
    // wider row, so out_stride can be anything from n up.
    check_arg(p.input_stride >= p.in_features, "lora: input_stride must be >= in_features");
    check_arg(p.out_stride >= p.out_features, "lora: out_stride must be >= out_features");
  }
  if (p.num_slots > 0) {
    check_arg(
        p.lora_a != nullptr && p.lora_b != nullptr && p.ranks != nullptr && p.scales != nullptr,
        "lora: lora_a, lora_b, ranks and scales must not be null when num_slots > 0");
  }
}

void check_lora_params(const LoraParams& p) {
  check_lora_shapes(p);
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    check_arg(p.token_slots[t] < p.num_slots,
              "lora: token " + std::to_string(t) + " has slot " + std::to_string(p.token_slots[t]) +
                  ", but there are " + std::to_string(p.num_slots) + " slots");
  }
  const int64_t bound = lora_max_rank(p);
  for (int64_t s = 0; s < p.num_slots; ++s) {
    if (p.lora_a[s] == nullptr) continue;
    check_arg(p.lora_b[s] != nullptr,
              "lora: slot " + std::to_string(s) + " has an A matrix but no B matrix");
    check_arg(p.ranks[s] >= 1 && p.ranks[s] <= bound,
              "lora: slot " + std::to_string(s) + " has rank " + std::to_string(p.ranks[s]) +
                  ", outside [1, " + std::to_string(bound) + "]");
  }
}

const char* lora_cpu_isa() { return cpu::pick_lora_kernels().name; }

void lora_cpu(const LoraParams& p) {
  using cpu::Segment;
  using cpu::Task;
  check_lora_params(p);
  if (p.num_tokens == 0 || p.num_slots == 0) return;
  const cpu::LoraKernels& kernels = cpu::pick_lora_kernels();
  const bool f16 = p.weight_dtype == DType::kFloat16;
  const auto shrink = f16 ? kernels.shrink_f16 : kernels.shrink;
  const auto expand = f16 ? kernels.expand_f16 : kernels.expand;
  const int64_t k = p.in_features, n = p.out_features;

  // Group the tokens of each slot (a stable counting sort): order[] lists the tokens segment by
  // segment.
  thread_local std::vector<int64_t> first, order;
  thread_local std::vector<Segment> segments;
  thread_local std::vector<Task> tasks;
  first.assign(static_cast<size_t>(p.num_slots) + 1, 0);
  auto active = [&](int32_t slot) { return slot >= 0 && p.lora_a[slot] != nullptr; };
  for (int64_t t = 0; t < p.num_tokens; ++t)
    if (active(p.token_slots[t])) ++first[p.token_slots[t] + 1];
  for (int64_t s = 0; s < p.num_slots; ++s) first[s + 1] += first[s];
  const int64_t num_active = first[p.num_slots];
  if (num_active == 0) return;
  order.resize(static_cast<size_t>(num_active));
  {
    std::vector<int64_t> next(first.begin(), first.end() - 1);
    for (int64_t t = 0; t < p.num_tokens; ++t)
      if (active(p.token_slots[t])) order[next[p.token_slots[t]]++] = t;
  }
  segments.clear();
  int64_t work = 0, max_rank = 0;
  for (int64_t s = 0; s < p.num_slots; ++s) {
    const int64_t count = first[s + 1] - first[s];
    if (count == 0) continue;
    segments.push_back({first[s], count, p.lora_a[s], p.lora_b[s], p.ranks[s], p.scales[s]});
    max_rank = std::max<int64_t>(max_rank, p.ranks[s]);
    work += count * p.ranks[s] * (k + n);
  }
  const bool serial = work < cpu::kSerialWork || cpu::pool_size() == 1;
  // Aim for a few tasks per thread. Task boundaries never change a result (see lora_simd.h), so
  // this may depend on the whole batch.
  const int64_t task_work = std::clamp<int64_t>(work / (4 * static_cast<int64_t>(cpu::pool_size())),
                                                cpu::kMinTaskWork, cpu::kMaxTaskWork);
  tasks.clear();
  for (int32_t g = 0; g < static_cast<int32_t>(segments.size()); ++g) {
    const Segment& seg = segments[g];
    const int64_t per_token = seg.rank * (k + n);
    const int64_t block =
        serial ? seg.count
               : cpu::kTokenTile * std::max<int64_t>(1, task_work / (per_token * cpu::kTokenTile));
    for (int64_t t0 = 0; t0 < seg.count; t0 += block)
      tasks.push_back({g, t0, std::min(seg.count, t0 + block)});
  }
  // The tasks run on pool threads, where the names above are other (empty) thread_locals: they
  // reach this call's buffers through these pointers only. Each task's rank values live in its
  // thread's own scratch.
  const int64_t* tokens = order.data();
  const Segment* segs = segments.data();
  const Task* task_list = tasks.data();
  auto run = [&](int64_t i) {
    const Task& task = task_list[i];
    const Segment& seg = segs[task.segment];
    const int64_t count = task.t1 - task.t0;
    const int64_t* task_tokens = tokens + seg.begin + task.t0;
    float* h = cpu::lora_scratch(0, count * max_rank);
    shrink(p.input, p.input_stride, task_tokens, count, seg.a, k, 0, seg.rank, h, max_rank);
    float* bt = p.b_transposed ? nullptr : cpu::lora_scratch(1, seg.rank * cpu::kLoraColumnTile);
    expand(p.out, p.out_stride, task_tokens, count, h, max_rank, seg.b, seg.rank, 0, n, seg.scale,
           bt, p.b_transposed ? n : 0);
  };
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  if (serial || num_tasks == 1) {
    for (int64_t i = 0; i < num_tasks; ++i) run(i);
  } else {
    cpu::parallel_for(num_tasks, run);
  }
}

}  // namespace fastllm::kernels
