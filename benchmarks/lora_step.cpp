// The LoRA work of one decode step of the default model, in isolation: for every layer the seven
// projections' calls as the CPU decoder makes them (q/k/v into slices of the fused output), with
// the step's tokens spread over a number of adapters, each with its own weights per layer and
// target (so the step streams them from memory as serving does).
//
//   lora_step [tokens=16] [adapters=4] [rank=16] [steps=200] [f16=1]
//
// Prints microseconds per step (median and best of the steps) and the multiply-adds per second.
// The serving cost of adapters is this time over the step's time without them.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "bench_args.h"
#include "fastllm/kernels/lora.h"

namespace {

using fastllm::kernels::DType;
using fastllm::kernels::LoraParams;

// SmolLM2-135M: hidden 576, 9 heads x 64 (q 576), 3 KV heads (k, v 192), intermediate 1536.
constexpr int64_t kHidden = 576, kKv = 192, kInter = 1536, kLayers = 30;

struct Target {
  int64_t k, n;
};
// q, k, v, o, gate, up, down: (in, out) features.
constexpr Target kTargets[7] = {{kHidden, kHidden}, {kHidden, kKv},    {kHidden, kKv},
                                {kHidden, kHidden}, {kHidden, kInter}, {kHidden, kInter},
                                {kInter, kHidden}};

using fastllm::bench::arg;

}  // namespace

int main(int argc, char** argv) {
  const int64_t tokens = arg(argc, argv, 1, 16), adapters = arg(argc, argv, 2, 4);
  const int64_t rank = arg(argc, argv, 3, 16), steps = arg(argc, argv, 4, 200);
  const bool f16 = arg(argc, argv, 5, 1) != 0;
  const size_t elem = f16 ? 2 : 4;
  // shared=1: every adapter slot points at the first adapter's weights (same arithmetic, a quarter
  // of the memory traffic): tells memory-bound from compute-bound.
  const bool shared = arg(argc, argv, 6, 0) != 0;
  std::mt19937 rng(1);
  std::uniform_int_distribution<int> bits(0x2000, 0x2400);  // small float16 values
  auto fill = [&](std::vector<uint8_t>& buf, int64_t count) {
    buf.resize(static_cast<size_t>(count) * elem);
    if (f16) {
      auto* h = reinterpret_cast<uint16_t*>(buf.data());
      for (int64_t i = 0; i < count; ++i) h[i] = static_cast<uint16_t>(bits(rng));
    } else {
      auto* f = reinterpret_cast<float*>(buf.data());
      for (int64_t i = 0; i < count; ++i) f[i] = 1e-3f * static_cast<float>(bits(rng) - 0x2200);
    }
  };
  // weights[layer][target][adapter] = (A, B transposed)
  std::vector<std::vector<uint8_t>> a(kLayers * 7 * adapters), b(kLayers * 7 * adapters);
  for (int64_t l = 0; l < kLayers; ++l)
    for (int t = 0; t < 7; ++t)
      for (int64_t s = 0; s < adapters; ++s) {
        const size_t i = static_cast<size_t>((l * 7 + t) * adapters + s);
        fill(a[i], rank * kTargets[t].k);
        fill(b[i], rank * kTargets[t].n);
      }
  std::vector<int32_t> slots(static_cast<size_t>(tokens));
  for (int64_t t = 0; t < tokens; ++t) slots[t] = static_cast<int32_t>(t % adapters);
  std::vector<int32_t> ranks(static_cast<size_t>(adapters), static_cast<int32_t>(rank));
  std::vector<float> scales(static_cast<size_t>(adapters), 2.0f);
  std::vector<float> x(static_cast<size_t>(tokens * kInter), 0.01f);
  std::vector<float> qkv(static_cast<size_t>(tokens * (kHidden + 2 * kKv)));
  std::vector<float> hidden(static_cast<size_t>(tokens * kHidden));
  std::vector<float> gate_up(static_cast<size_t>(tokens * 2 * kInter));
  std::vector<const void*> pa(static_cast<size_t>(adapters)), pb(static_cast<size_t>(adapters));

  auto call = [&](int64_t l, int t, float* out, int64_t out_stride) {
    for (int64_t s = 0; s < adapters; ++s) {
      const size_t i = static_cast<size_t>((l * 7 + t) * adapters + (shared ? 0 : s));
      pa[s] = a[i].data();
      pb[s] = b[i].data();
    }
    LoraParams p;
    p.out = out;
    p.out_stride = out_stride;
    p.input = x.data();
    p.input_stride = kTargets[t].k;
    p.num_tokens = tokens;
    p.in_features = kTargets[t].k;
    p.out_features = kTargets[t].n;
    p.token_slots = slots.data();
    p.num_slots = adapters;
    p.lora_a = pa.data();
    p.lora_b = pb.data();
    p.weight_dtype = f16 ? DType::kFloat16 : DType::kFloat32;
    p.b_transposed = true;
    p.ranks = ranks.data();
    p.scales = scales.data();
    p.max_rank = rank;
    fastllm::kernels::lora_cpu(p);
  };
  const int64_t qkv_w = kHidden + 2 * kKv;
  std::vector<double> times;
  for (int64_t it = 0; it < steps; ++it) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t l = 0; l < kLayers; ++l) {
      call(l, 0, qkv.data(), qkv_w);
      call(l, 1, qkv.data() + kHidden, qkv_w);
      call(l, 2, qkv.data() + kHidden + kKv, qkv_w);
      call(l, 3, hidden.data(), kHidden);
      call(l, 4, gate_up.data(), 2 * kInter);
      call(l, 5, gate_up.data() + kInter, 2 * kInter);
      call(l, 6, hidden.data(), kHidden);
    }
    times.push_back(
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(times.begin(), times.end());
  int64_t macs = 0;
  for (const Target& t : kTargets) macs += rank * (t.k + t.n);
  macs *= kLayers * tokens;
  const double median = times[times.size() / 2];
  std::printf(
      "lora_step tokens=%ld adapters=%ld rank=%ld %s isa=%s: median %.0f us, best %.0f us,"
      " %.1f GMAC/s (median)\n",
      static_cast<long>(tokens), static_cast<long>(adapters), static_cast<long>(rank),
      f16 ? "float16" : "float32", fastllm::kernels::lora_cpu_isa(), median, times[0],
      static_cast<double>(macs) / median * 1e-3);
  return 0;
}
