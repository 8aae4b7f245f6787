// FakeExecutor: a deterministic stand-in for a model, for engine tests and benchmarks.
//
// It keeps a simulated KV cache in which every slot stores the (token, position) written to it.
// The next token of a sequence is a hash of its whole context read back through its block table,
// so any scheduling, block-table, copy-on-write, swap or prefix-cache error changes the tokens or
// is reported as corruption. With verify_kv off it hashes only the last token and position (cheap,
// for benchmarks). Not thread-safe; used from the engine thread.
#pragma once

#include <cstdint>
#include <vector>

#include "fastllm/executor.h"

namespace fastllm {

struct FakeExecutorConfig {
  int32_t num_gpu_blocks = 0;
  int32_t num_cpu_blocks = 0;
  int32_t block_size = 16;
  int32_t vocab_size = 1000;
  bool verify_kv = true;  // read and check the whole context from the cache every step
  // > 0: a different model that agrees with this one except at about one context length in
  // disagree_every (the next token is shifted by one there): a draft model for tests.
  int32_t disagree_every = 0;
};

class FakeExecutor : public Executor {
 public:
  explicit FakeExecutor(const FakeExecutorConfig& config);

  StepResult execute(const BatchPlan& plan) override;

  // The token the fake model produces after `context` (what verify_kv mode computes); tokens in
  // `banned` (EOS/stop ids while below min_tokens) are skipped over. An unseeded row drawing for
  // child c > 0 of an n > 1 request gets a stream of its own (as a real sampler's unseeded rows
  // differ), so unseeded children differ; seeded rows depend on the seed alone. A LoRA adapter
  // (lora_id != 0) makes another model: other tokens, and KV that others must never read.
  static int32_t next_token(const int32_t* context, int32_t length, int32_t vocab_size,
                            int64_t seed, const int32_t* banned = nullptr, int32_t num_banned = 0,
                            int32_t child = 0, int32_t lora_id = 0);
  // Greedy reference generation without any engine: prompt followed by up to max_tokens tokens,
  // stopping after an eos token (when ignore_eos is false and min_tokens are done).
  static std::vector<int32_t> reference_generate(const std::vector<int32_t>& prompt,
                                                 int32_t max_tokens, int32_t vocab_size,
                                                 const std::vector<int32_t>& eos_token_ids,
                                                 int32_t min_tokens = 0, int64_t seed = -1,
                                                 int32_t child = 0, int32_t lora_id = 0);

  int64_t num_steps() const { return num_steps_; }
  int64_t num_tokens_processed() const { return num_tokens_processed_; }
  int32_t max_batch_tokens_seen() const { return max_batch_tokens_seen_; }

 private:
  struct Slot {
    int32_t token = -1;
    int32_t position = -1;
    int32_t lora = 0;
  };
  void copy_blocks(std::vector<Slot>& from, std::vector<Slot>& to,
                   const std::vector<int32_t>& pairs);

  FakeExecutorConfig config_;
  std::vector<Slot> device_;
  std::vector<Slot> host_;
  std::vector<int32_t> context_;
  std::vector<int32_t> banned_;
  int64_t num_steps_ = 0;
  int64_t num_tokens_processed_ = 0;
  int32_t max_batch_tokens_seen_ = 0;
};

}  // namespace fastllm
