// Token-level sampling parameters of one request. Text-level rules (stop strings, detokenization)
// live in Python; everything here acts on token ids and is carried into the BatchPlan per row.
// best_of is a front-end notion: the engine generates n sequences and ranks none of them; pass
// n = best_of (with logprobs) and keep the best by RequestOutput::cumulative_logprob.
#pragma once

#include <cstdint>
#include <vector>

namespace fastllm {

struct SamplingParams {
  int32_t n = 1;                    // sequences for the prompt, <= max_num_seqs (see request.h)
  int32_t max_tokens = 16;          // output tokens at most; -1 = until max_model_len
  int32_t min_tokens = 0;           // EOS and stop_token_ids are ignored before this many outputs
  float temperature = 1.0f;         // 0 = greedy
  float top_p = 1.0f;               // nucleus mass in (0, 1]
  int32_t top_k = -1;               // <= 0 = off
  float min_p = 0.0f;               // in [0, 1]
  float presence_penalty = 0.0f;    // in [-2, 2]
  float frequency_penalty = 0.0f;   // in [-2, 2]
  float repetition_penalty = 1.0f;  // > 0; 1 = off
  int64_t seed = -1;                // -1 = unseeded
  int32_t priority = 0;             // lower value is served first under the priority policy
  bool ignore_eos = false;          // keep generating past the model's EOS tokens
  // Speculative decoding may propose tokens for this request (off for requests whose logits a
  // hook edits step by step, e.g. guided decoding, whose state cannot follow a draft).
  bool speculate = true;
  std::vector<int32_t> stop_token_ids;     // finish (reason "stop") when one of these is sampled
  std::vector<int32_t> logit_bias_ids;     // added to the logits before sampling: token ids ...
  std::vector<float> logit_bias_values;    // ... and their biases, in [-100, 100]
  std::vector<int32_t> allowed_token_ids;  // when non-empty, only these tokens can be sampled
  int32_t logprobs = -1;                   // -1 = none; N = logprob of the sampled token plus top-N
  int32_t prompt_logprobs = -1;            // -1 = none; N = top-N logprobs at each prompt position

  // Throws InvalidRequestError naming the first bad field. max_logprobs bounds logprobs counts.
  void validate(int32_t max_logprobs) const;
  // Throws InvalidRequestError when a token id list names ids >= vocab_size (0 = unchecked).
  void check_vocab(int32_t vocab_size) const;

  // True when the row needs the request's token history (repetition/presence/frequency).
  bool uses_penalties() const {
    return presence_penalty != 0.0f || frequency_penalty != 0.0f || repetition_penalty != 1.0f;
  }
};

}  // namespace fastllm
