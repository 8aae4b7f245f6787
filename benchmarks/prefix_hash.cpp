// Cost of prefix-cache hashing: the block digests of a 512-token prompt (block_size 16) under
// each algorithm, next to the former unkeyed splitmix64 chain, and a whole prefix-cache lookup
// of that prompt (digests, index, verification of every hit, the partial tail's keys).
// Prints µs per prompt; asserts nothing.
//
//   prefix_hash [iterations]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "fastllm/block_hash.h"
#include "fastllm/kv_cache_manager.h"

using namespace fastllm;
using Clock = std::chrono::steady_clock;

namespace {

constexpr int32_t kBlock = 16;
constexpr int32_t kPromptLen = 512;

// The former scheme, for comparison: splitmix64 folded over parent, salt and tokens.
uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

uint64_t splitmix_block(uint64_t parent, uint64_t salt, const int32_t* t, int32_t n) {
  uint64_t h = mix64(parent) ^ mix64(salt ^ 0x5851f42d4c957f2dull);
  for (int32_t i = 0; i < n; ++i) {
    h = mix64(h ^ (static_cast<uint64_t>(static_cast<uint32_t>(t[i])) |
                   (static_cast<uint64_t>(i) << 32)));
  }
  return h;
}

template <typename F>
double micros_per_call(int iters, F&& f) {
  f();  // warm-up
  const auto t0 = Clock::now();
  for (int i = 0; i < iters; ++i) f();
  return std::chrono::duration<double, std::micro>(Clock::now() - t0).count() / iters;
}

}  // namespace

int main(int argc, char** argv) {
  const int iters = argc > 1 ? std::atoi(argv[1]) : 2000;
  std::mt19937 rng(1);
  std::uniform_int_distribution<int32_t> tok(3, 31999);
  std::vector<int32_t> prompt(kPromptLen + 5);
  for (auto& t : prompt) t = tok(rng);
  std::printf("prefix-cache hashing, %d-token prompt, block_size %d, %d iterations, SHA-256 %s\n",
              kPromptLen, kBlock, iters,
              Sha256::uses_cpu_extensions() ? "with the CPU's SHA instructions" : "portable");

  uint64_t sink = 0;
  const double old_us = micros_per_call(iters, [&] {
    uint64_t h = 0;
    for (int32_t b = 0; b < kPromptLen / kBlock; ++b) {
      h = splitmix_block(h, 0, prompt.data() + b * kBlock, kBlock);
    }
    sink ^= h;
  });
  std::printf("  %-10s block digests  %7.2f us/prompt\n", "splitmix64", old_us);

  struct Variant {
    const char* name;
    PrefixHashAlgo algo;
    bool cpu_sha;
  };
  const bool has_cpu_sha = Sha256::uses_cpu_extensions();
  std::vector<Variant> variants = {{"sha256", PrefixHashAlgo::kSha256, has_cpu_sha}};
  if (has_cpu_sha) variants.push_back({"sha256*", PrefixHashAlgo::kSha256, false});
  variants.push_back({"fast", PrefixHashAlgo::kFast, false});
  for (const Variant& v : variants) {
    const PrefixHashAlgo algo = v.algo;
    Sha256::set_cpu_extensions(v.cpu_sha);
    BlockHasher hasher(algo);
    const double us = micros_per_call(iters, [&] {
      BlockHash h;
      for (int32_t b = 0; b < kPromptLen / kBlock; ++b) {
        h = hasher.hash(h, 0, false, prompt.data() + b * kBlock, kBlock);
      }
      sink ^= h.words[0];
    });
    std::printf("  %-10s block digests  %7.2f us/prompt\n", v.name, us);

    // A lookup that hits every block of the prompt and 4 of its 5 tail tokens.
    KVCacheConfig config{256, 0, kBlock, true};
    config.hash_algo = algo;
    KVCacheManager kv(config);
    Request warm;
    warm.token_ids = prompt;
    warm.num_prompt_tokens = static_cast<int32_t>(prompt.size());
    CachedPrefix none = kv.find_cached_prefix(warm);
    kv.allocate_slots(warm, warm.num_tokens(), &none);
    warm.num_computed_tokens = warm.num_tokens();
    kv.cache_full_blocks(warm);
    int32_t hit = 0;
    const double lookup_us = micros_per_call(iters, [&] {
      Request r;
      r.token_ids = prompt;
      r.num_prompt_tokens = warm.num_prompt_tokens;
      hit = kv.find_cached_prefix(r).num_tokens;
    });
    std::printf("  %-10s full lookup    %7.2f us/prompt (%d tokens hit, %lld collisions)\n", v.name,
                lookup_us, hit, static_cast<long long>(kv.prefix_hash_collisions()));
  }
  if (has_cpu_sha) std::printf("  (sha256*: the portable code, without the SHA instructions)\n");
  return sink == 42 ? 1 : 0;  // keeps the digests alive
}
