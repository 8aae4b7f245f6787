// The CPU paged attention of one decode step, in isolation: seqs sequences of one query token
// each, every one with `context` cached tokens in scattered blocks of 16 (as after churn), float32
// queries against a float16 KV cache (the CPU decoder's layout), on the attention code path
// FASTLLM_CPU_ISA leaves (compare FASTLLM_CPU_ISA=avx2 and avx512 runs).
//
//   attn_step [seqs=16] [context=128] [heads=8] [kv_heads=4] [head_dim=64] [steps=2000] [shared=0]
//
// shared=1: every sequence reads the first one's blocks (which then stay in L1/L2): the kernels'
// arithmetic without the cache misses. FASTLLM_CPU_THREADS=1 times one core.
// Prints microseconds per step (median) and the K/V bytes read per second.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

#include "bench_args.h"
#include "fastllm/kernels/attention.h"
#include "fastllm/kernels/dtype_convert.h"

namespace {

namespace k = fastllm::kernels;

using fastllm::bench::arg;

}  // namespace

int main(int argc, char** argv) {
  const int64_t seqs = arg(argc, argv, 1, 16), context = arg(argc, argv, 2, 128);
  const int64_t heads = arg(argc, argv, 3, 8), kv_heads = arg(argc, argv, 4, 4);
  const int64_t dim = arg(argc, argv, 5, 64), steps = arg(argc, argv, 6, 2000);
  const bool shared = arg(argc, argv, 7, 0) != 0;
  constexpr int64_t kBlock = 16;
  const int64_t blocks_per_seq = (context + kBlock - 1) / kBlock;
  const int64_t num_blocks = seqs * blocks_per_seq + 1;

  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  auto half_cache = [&] {
    std::vector<uint16_t> c(static_cast<size_t>(num_blocks * kBlock * kv_heads * dim));
    for (auto& x : c) x = k::float_to_half(normal(rng));
    return c;
  };
  const std::vector<uint16_t> keys = half_cache(), values = half_cache();
  std::vector<int32_t> ids(static_cast<size_t>(num_blocks - 1));
  std::iota(ids.begin(), ids.end(), 1);
  std::shuffle(ids.begin(), ids.end(), rng);
  std::vector<int32_t> table(ids.begin(), ids.begin() + seqs * blocks_per_seq);
  if (shared)
    for (int64_t s = 1; s < seqs; ++s)
      std::copy_n(table.begin(), blocks_per_seq, table.begin() + s * blocks_per_seq);
  std::vector<float> query(static_cast<size_t>(seqs * heads * dim)), out(query.size());
  for (auto& x : query) x = normal(rng);
  std::vector<int32_t> starts(static_cast<size_t>(seqs + 1)), lens(static_cast<size_t>(seqs));
  std::iota(starts.begin(), starts.end(), 0);
  std::fill(lens.begin(), lens.end(), static_cast<int32_t>(context));

  k::PagedAttentionParams p;
  p.out = out.data();
  p.query = query.data();
  p.key_cache = keys.data();
  p.value_cache = values.data();
  p.query_start_loc = starts.data();
  p.context_lens = lens.data();
  p.block_tables = table.data();
  p.num_tokens = p.num_seqs = seqs;
  p.num_heads = heads;
  p.num_kv_heads = kv_heads;
  p.head_size = dim;
  p.block_size = kBlock;
  p.num_blocks = num_blocks;
  p.max_blocks_per_seq = blocks_per_seq;
  p.query_token_stride = p.out_token_stride = heads * dim;
  p.scale = 1.0f / std::sqrt(static_cast<float>(dim));
  p.dtype = k::DType::kFloat32;
  p.cache_dtype = k::DType::kFloat16;
  p.max_context_len = context;

  for (int i = 0; i < 20; ++i) k::paged_attention_cpu(p);
  std::vector<double> times(static_cast<size_t>(steps));
  for (auto& t : times) {
    const auto t0 = std::chrono::steady_clock::now();
    k::paged_attention_cpu(p);
    t = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  }
  std::nth_element(times.begin(), times.begin() + steps / 2, times.end());
  const double us = times[static_cast<size_t>(steps / 2)];
  const double bytes = 2.0 * seqs * context * kv_heads * dim * sizeof(uint16_t);
  std::printf("attention %s, threads %d: %lld seqs x context %lld, %lld/%lld heads, dim %lld%s\n",
              k::attention_cpu_isa(), k::cpu_num_threads(), static_cast<long long>(seqs),
              static_cast<long long>(context), static_cast<long long>(heads),
              static_cast<long long>(kv_heads), static_cast<long long>(dim),
              shared ? " (shared blocks)" : "");
  std::printf("%.1f us per step (median of %lld), %.1f GB/s of K/V\n", us,
              static_cast<long long>(steps), bytes / us * 1e-3);
  return 0;
}
