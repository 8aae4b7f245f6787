// Batched token sampling over float logits rows, each row with its own parameters.
//
// Per row, in this order (as vLLM's sampler):
//   1. penalties on a float copy of the logits: repetition r on tokens seen in prompt or output
//      (x > 0 ? x / r : x * r), then x -= frequency * count_in_output + presence * (count > 0);
//   2. logit bias (x += bias for each (token, bias) entry);
//   3. allowed token ids: when the row has a non-empty list, every other token becomes -inf;
//   4. temperature < 1e-5: greedy = the lowest-index maximum of the processed logits; stop here;
//   5. x /= temperature; p = softmax(x);
//   6. min-p: drop tokens with p < min_p * max(p);
//   7. top-k (k > 0): keep tokens whose x is >= the k-th largest x (ties at the threshold kept);
//   8. top-p (< 1): over the survivors renormalised, keep tokens whose p is >= t, t the largest
//   value
//      such that the survivors with p >= t hold at least top_p of the mass (ties kept);
//      (typical acceptance: a row given a draft token d returns d when its probability after
//      step 8 exceeds min(typical_threshold, typical_alpha * exp(-entropy)), else the argmax;)
//   9. sample with an exponential race: argmax over survivors of x - log(-log(u_token)), u from
//      Philox4x32-10 (philox.h) keyed by the row's seed, counter = (token / 4, row word, offset).
// Logprobs come from the RAW logits (vLLM's default "raw_logprobs"): logprob of the sampled token
// = log_softmax(raw)[token]; rank = 1 + #tokens with a raw logit strictly greater; the top
// num_top_logprobs tokens by raw logit (ties: lower id first) with their logprobs.
// CPU and CUDA implement the same arithmetic, so a seeded row gives the same token on both.
#pragma once

#include <cstddef>
#include <cstdint>

#include "fastllm/kernels/common.h"

namespace fastllm::kernels {

struct SamplingParamsBatch {
  const float* logits = nullptr;  // [num_rows][vocab], rows logits_row_stride apart
  int64_t num_rows = 0;
  int64_t vocab = 0;
  int64_t logits_row_stride = 0;
  // Per-row parameters, arrays of num_rows (null = the neutral value for every row).
  const float* temperature = nullptr;          // 0 = greedy (null: all greedy)
  const int32_t* top_k = nullptr;              // <= 0: off
  const float* top_p = nullptr;                // >= 1: off
  const float* min_p = nullptr;                // <= 0: off
  const float* repetition_penalty = nullptr;   // 1: off
  const float* presence_penalty = nullptr;     // 0: off
  const float* frequency_penalty = nullptr;    // 0: off
  const int64_t* seeds = nullptr;              // < 0: unseeded (global_seed, row word = row + 1)
  const int64_t* generator_offsets = nullptr;  // the row's output position (or a step counter)
  uint64_t global_seed = 0;
  // CSR token lists: row r owns ids[offsets[r] .. offsets[r+1]); offsets have num_rows + 1 entries.
  // Null offsets = empty for every row.
  const int32_t* prompt_offsets = nullptr;
  const int32_t* prompt_ids = nullptr;
  const int32_t* output_offsets = nullptr;
  const int32_t* output_ids = nullptr;
  const int32_t* bias_offsets = nullptr;
  const int32_t* bias_ids = nullptr;
  const float* bias_values = nullptr;
  const int32_t* allowed_offsets = nullptr;
  const int32_t* allowed_ids = nullptr;
  // Typical acceptance of speculative decoding: per row the draft token it verifies, or -1 (null:
  // no row has one). Greedy rows ignore it (their argmax is compared with the draft as usual).
  const int32_t* draft_ids = nullptr;
  float typical_threshold = 0.0f;
  float typical_alpha = 0.0f;
  // Outputs.
  int32_t* sampled = nullptr;        // [num_rows]
  float* sampled_logprob = nullptr;  // [num_rows] or null
  int32_t* sampled_rank = nullptr;   // [num_rows] or null
  int64_t num_top_logprobs = 0;      // N, 0..vocab
  float* top_logprobs = nullptr;     // [num_rows][N] or null when N = 0
  int32_t* top_ids = nullptr;        // [num_rows][N]
  // CUDA scratch of sampling_workspace_bytes(num_rows, vocab) bytes (the CPU ignores it).
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

// Checks the shape arguments shared by both backends; throws KernelArgumentError.
void check_sampling_params(const SamplingParamsBatch& params);

// CPU sampling (host pointers), parallel over rows.
void sample_cpu(const SamplingParamsBatch& params);

// Scratch bytes the CUDA sampler needs.
size_t sampling_workspace_bytes(int64_t num_rows, int64_t vocab);

#ifdef FASTLLM_WITH_CUDA
// CUDA sampling: every array in device memory, queued on stream.
void sample_cuda(const SamplingParamsBatch& params, void* stream);
#endif

}  // namespace fastllm::kernels
