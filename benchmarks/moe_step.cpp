// The quantized GEMM work of one decode step of the MoE serving benchmark's model
// (benchmarks/make_moe_gguf.py: hidden 512, 8 experts top-2, intermediate 1408, 8 layers, vocab
// 49152, Q4_0 repacked to Q4_0x8 as the CPU decoder holds it), in isolation: per layer the
// attention projections (qkv, o) and the expert MLPs (moe_experts_cpu, tokens routed at random,
// each layer with its own weights so the step streams them from memory as serving does), then the
// output projection.
//
//   moe_step [tokens=16] [steps=200] [shared=0]
//
// shared=1: every layer reads the first layer's weights (which then stay in cache): the time
// without the memory traffic, which tells memory-bound parts from compute-bound ones.
// Prints microseconds per step (median) for each part and the multiply-adds per second.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "bench_args.h"
#include "fastllm/kernels/moe.h"
#include "fastllm/kernels/quant_gemm.h"

namespace {

namespace k = fastllm::kernels;

constexpr int64_t kHidden = 512, kKv = 256, kInter = 1408, kExperts = 8, kTopK = 2;
constexpr int64_t kLayers = 8, kVocab = 49152;

// n random Q4_0 rows of kcols values (scale ~0.01) in the Q4_0x8 layout.
std::vector<uint8_t> q4_rows(int64_t n, int64_t kcols, std::mt19937& rng) {
  const int64_t blocks = kcols / 32;
  std::vector<uint8_t> w(static_cast<size_t>(n * blocks * 18));
  std::uniform_int_distribution<int> byte(0, 255);
  for (int64_t b = 0; b < n * blocks; ++b) {
    uint8_t* blk = w.data() + b * 18;
    blk[0] = 0x1F;  // fp16 0x211F ~ 0.01
    blk[1] = 0x21;
    for (int i = 2; i < 18; ++i) blk[i] = static_cast<uint8_t>(byte(rng));
  }
  k::quant_repack_rows8(k::QuantType::kQ4_0, w.data(), n, kcols);
  return w;
}

double gemm_us(const std::vector<uint8_t>& w, int64_t m, int64_t n, int64_t kcols,
               const std::vector<float>& x, std::vector<float>& y) {
  k::QuantGemmParams p;
  p.out = y.data();
  p.input = x.data();
  p.weight = w.data();
  p.m = m;
  p.n = n;
  p.k = kcols;
  p.input_stride = kcols;
  p.out_stride = n;
  p.type = k::QuantType::kQ4_0x8;
  const auto t0 = std::chrono::steady_clock::now();
  k::quant_gemm_cpu(p);
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
}

using fastllm::bench::arg;

using fastllm::bench::median;

}  // namespace

int main(int argc, char** argv) {
  const int64_t tokens = arg(argc, argv, 1, 16), steps = arg(argc, argv, 2, 200);
  const bool shared = arg(argc, argv, 3, 0) != 0;
  std::mt19937 rng(1);
  struct Layer {
    std::vector<uint8_t> qkv, o, gate_up, down;
  };
  std::vector<Layer> layers(kLayers);
  for (auto& l : layers) {
    l.qkv = q4_rows(kHidden + 2 * kKv, kHidden, rng);
    l.o = q4_rows(kHidden, kHidden, rng);
    l.gate_up = q4_rows(kExperts * 2 * kInter, kHidden, rng);
    l.down = q4_rows(kExperts * kHidden, kInter, rng);
  }
  const std::vector<uint8_t> head = q4_rows(kVocab, kHidden, rng);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(tokens * kInter)),
      y(static_cast<size_t>(tokens * kVocab));
  for (float& v : x) v = normal(rng);
  std::vector<int32_t> ids(static_cast<size_t>(tokens * kTopK));
  std::vector<float> weights(ids.size(), 0.5f);
  std::uniform_int_distribution<int> expert(0, kExperts - 1);

  std::vector<double> attn_t, moe_t, head_t, total_t;
  for (int64_t s = 0; s < steps + 10; ++s) {
    double attn = 0, moe = 0;
    for (auto& layer : layers) {
      const Layer& l = shared ? layers[0] : layer;
      attn += gemm_us(l.qkv, tokens, kHidden + 2 * kKv, kHidden, x, y);
      attn += gemm_us(l.o, tokens, kHidden, kHidden, x, y);
      for (int64_t t = 0; t < tokens; ++t) {
        const int a = expert(rng);
        int b = expert(rng);
        while (b == a) b = expert(rng);
        ids[t * kTopK] = a;
        ids[t * kTopK + 1] = b;
      }
      k::MoeExpertsParams p;
      p.out = y.data();
      p.input = x.data();
      p.num_tokens = tokens;
      p.hidden = kHidden;
      p.intermediate = kInter;
      p.num_experts = kExperts;
      p.top_k = kTopK;
      p.input_stride = kHidden;
      p.out_stride = kHidden;
      p.topk_ids = ids.data();
      p.topk_weights = weights.data();
      p.gate_up = l.gate_up.data();
      p.gate_up_type = k::QuantType::kQ4_0x8;
      p.down = l.down.data();
      p.down_type = k::QuantType::kQ4_0x8;
      const auto t0 = std::chrono::steady_clock::now();
      k::moe_experts_cpu(p);
      moe +=
          std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    }
    const double h = gemm_us(head, tokens, kVocab, kHidden, x, y);
    if (s < 10) continue;
    attn_t.push_back(attn);
    moe_t.push_back(moe);
    head_t.push_back(h);
    total_t.push_back(attn + moe + h);
  }
  const double attn_mac = 2.0 * kLayers * tokens * kHidden * (kHidden + kKv);
  const double moe_mac = 3.0 * kLayers * tokens * kTopK * kHidden * kInter;
  const double head_mac = 1.0 * tokens * kVocab * kHidden;
  auto row = [](const char* name, double us, double mac) {
    std::printf("%-12s %9.1f us  %6.1f GMAC/s\n", name, us, mac / us * 1e-3);
  };
  std::printf("tokens %lld, %lld steps (median per step)\n", static_cast<long long>(tokens),
              static_cast<long long>(steps));
  row("attn proj", median(attn_t), attn_mac);
  row("experts", median(moe_t), moe_mac);
  row("output", median(head_t), head_mac);
  row("total", median(total_t), attn_mac + moe_mac + head_mac);
  return 0;
}
