// Executor: runs one BatchPlan (KV writes, forward pass, sampling) and returns the sampled tokens.
// Implementations: the Python model executor (through the bindings) and FakeExecutor for tests.
// Called on the engine thread only, one step at a time.
#pragma once

#include <cstdint>
#include <vector>

#include "fastllm/batch_plan.h"

namespace fastllm {

struct StepResult {
  std::vector<int32_t> sampled_token_ids;  // [num_samples]
  std::vector<float> sampled_logprobs;     // [num_samples] or empty
  int32_t num_top_logprobs = 0;            // K: top entries per sample row
  std::vector<int32_t> top_token_ids;      // [num_samples * K] or empty
  std::vector<float> top_logprobs;         // [num_samples * K] or empty

  // Prompt logprobs, one entry per scored prompt position, grouped by sequence in plan order
  // (positions ascending): the sequence index, the scored token's logprob and the top-K.
  int32_t num_prompt_top_logprobs = 0;  // K'
  std::vector<int32_t> prompt_seq_indices;
  std::vector<float> prompt_token_logprobs;
  std::vector<int32_t> prompt_top_token_ids;  // [entries * K']
  std::vector<float> prompt_top_logprobs;     // [entries * K']
};

class Executor {
 public:
  virtual ~Executor() = default;
  // Applies plan.block_ops, writes the new tokens' K/V into their slots, runs the model and
  // samples one token per sample row. Throwing fails the requests of this step only.
  virtual StepResult execute(const BatchPlan& plan) = 0;
};

}  // namespace fastllm
